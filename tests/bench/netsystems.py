"""The systems the network benchmark compares, each behind the same small interface.

- direct:    ranks mmap the checkpoint on the remote mount itself;
- prefetch:  the same, plus the engines' prefetch in every rank (see netload.start_prefetch);
- rclone:    `rclone mount --vfs-cache-mode full --read-only` over the remote mount;
- fusecache: `fusecache mount` over the remote mount.

A system is started `fresh` (its persistent cache emptied) or not (a restart that keeps it);
the benchmark decides which. Daemons run outside the ranks' cgroup, as system services do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.netbed import TestbedError, is_mounted, stop_process, unmount

SYSTEM_NAMES = ("direct", "prefetch", "rclone", "fusecache")
PREFETCH_THREADS = 4  # SGLang's default for --weight-loader-prefetch-num-threads


class System:
    """Direct access to the remote mount: nothing to start, no daemon, no cache of its own."""

    name = "direct"
    prefetch_threads = 0

    def __init__(self, remote: Path, work: Path) -> None:
        self.remote = remote
        self.work = work
        self.mountpoint = remote

    def start(self, fresh: bool) -> None:
        """Bring the system up; `fresh` empties its persistent cache first."""

    def stop(self) -> None:
        """Take it down, keeping its persistent cache."""

    def daemon_pid(self) -> int | None:
        return None

    def cache_dirs(self) -> list[Path]:
        """Local files whose page cache a restart must drop."""
        return []

    def counters(self) -> dict:
        """The system's own traffic counters, as a cross-check of the link counters."""
        return {}


class Prefetch(System):
    """Direct access, plus the engines' own prefetch thread in every rank."""

    name = "prefetch"
    prefetch_threads = PREFETCH_THREADS


class Rclone(System):
    """rclone's full VFS cache: the general-purpose way to put a disk cache in front of a mount."""

    name = "rclone"

    def __init__(self, remote: Path, work: Path) -> None:
        super().__init__(remote, work)
        self.mountpoint = work / "mnt" / "rclone"
        self.cache = work / "cache" / "rclone"
        self._proc: subprocess.Popen | None = None

    def start(self, fresh: bool) -> None:
        if fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        config = self.work / "state" / "rclone.conf"
        config.touch()
        log = self.work / "state" / "rclone.log"
        # --vfs-fast-fingerprint: without it rclone's local backend puts an MD5 of the whole
        # file in the fingerprint of every cached file, reading it once more over the link on
        # every first open, restarts included; rclone's documentation recommends the flag
        # for a cache over `local`, which is how it mirrors an NFS or Lustre mount.
        self._proc = subprocess.Popen(
            ["rclone", "mount", str(self.remote), str(self.mountpoint), "--read-only",
             "--vfs-cache-mode", "full", "--vfs-fast-fingerprint", "--cache-dir", str(self.cache),
             "--config", str(config), "--log-file", str(log), "--log-level", "NOTICE"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while not is_mounted(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise TestbedError(f"rclone mount failed; see {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        unmount(self.mountpoint)
        stop_process(self._proc, timeout=30)
        self._proc = None

    def daemon_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def cache_dirs(self) -> list[Path]:
        return [self.cache]


class Fusecache(System):
    """The system under test, with its default options unless -o says otherwise."""

    name = "fusecache"

    def __init__(self, remote: Path, work: Path, options: list[str]) -> None:
        super().__init__(remote, work)
        self.mountpoint = work / "mnt" / "fusecache"
        self.cache = work / "cache" / "fusecache"
        self.options = options
        self._pid: int | None = None

    def start(self, fresh: bool) -> None:
        if fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        args = ["mount", str(self.remote), str(self.mountpoint), "--cache-dir", str(self.cache)]
        for option in self.options:
            args += ["-o", option]
        _fusecache(*args)
        self._pid = self._status()["pid"]

    def stop(self) -> None:
        if is_mounted(self.mountpoint) and subprocess.run(
                [sys.executable, "-m", "fusecache", "umount", str(self.mountpoint)], capture_output=True).returncode:
            unmount(self.mountpoint)
        if self._pid is not None:
            _wait_gone(self._pid, timeout=30)
        self._pid = None

    def daemon_pid(self) -> int | None:
        return self._pid

    def cache_dirs(self) -> list[Path]:
        return [self.cache]

    def counters(self) -> dict:
        metrics = self._status()["metrics"]
        return {key: metrics[key] for key in ("bytes_from_source", "bytes_served", "bytes_served_from_cache")}

    def _status(self) -> dict:
        return json.loads(_fusecache("status", str(self.mountpoint), "--json"))


def _fusecache(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fusecache", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise TestbedError(f"fusecache {args[0]}: {result.stderr.strip()}")
    return result.stdout


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for a process that is not our child to exit; SIGKILL it if it does not."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that may never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def make_systems(names: list[str], remote: Path, work: Path, fusecache_options: list[str]) -> list[System]:
    if "rclone" in names and shutil.which("rclone") is None:
        raise TestbedError("rclone is not installed: apt-get install -y rclone (or leave it out with --systems)")
    factories = {"direct": lambda: System(remote, work), "prefetch": lambda: Prefetch(remote, work),
                 "rclone": lambda: Rclone(remote, work),
                 "fusecache": lambda: Fusecache(remote, work, fusecache_options)}
    return [factories[name]() for name in names]

