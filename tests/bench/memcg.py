"""A memory-capped cgroup for the ranks, on the v1 memory controller or on cgroup v2.

The cap counts page cache as well as the ranks' own memory: pages a rank faults in are charged
to its cgroup and reclaimed from it when the cgroup reaches the cap, which is what happens to
inference ranks in a memory-limited container. Daemons (fusecache, rclone, sshfs) stay outside,
as system services do.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class CgroupError(RuntimeError):
    """No usable memory controller."""


def find_controller() -> tuple[Path, bool]:
    """(root of the memory hierarchy, whether it is cgroup v2); v1 first, as on this machine."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return V1_ROOT, False
    if "memory" in _read(V2_ROOT / "cgroup.controllers").split():
        return V2_ROOT, True
    raise CgroupError("no memory cgroup controller (neither v1 at /sys/fs/cgroup/memory nor v2)")


class MemoryCgroup:
    """A fresh cgroup capped at `limit` bytes; a context manager that removes it on exit."""

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        root, self.v2 = find_controller()
        self.path = root / name

    @classmethod
    def remove_stale(cls, prefix: str) -> None:
        """Remove cgroups named prefix* that a SIGKILLed run left, with whatever is in them."""
        root, _v2 = find_controller()
        for path in root.glob(f"{prefix}*"):
            cls(path.name, 0).remove()

    def __enter__(self) -> MemoryCgroup:
        if self.path.exists():
            self.remove()  # left by a run that was SIGKILLed
        if self.v2 and "memory" not in _read(self.path.parent / "cgroup.subtree_control").split():
            (self.path.parent / "cgroup.subtree_control").write_text("+memory\n")
        self.path.mkdir()
        try:
            if self.v2:
                (self.path / "memory.max").write_text(f"{self.limit}\n")
                (self.path / "memory.swap.max").write_text("0\n")
            else:
                (self.path / "memory.limit_in_bytes").write_text(f"{self.limit}\n")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def procs(self) -> Path:
        """The file a process writes 0 to, to join."""
        return self.path / "cgroup.procs"

    def peak(self) -> int | None:
        """Highest usage (page cache included) since creation, where the kernel reports it."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        text = _read(self.path / name)
        return int(text) if text else None

    def oom_kills(self) -> int:
        events = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in _read(events).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Kill whatever is still inside (an interrupted run), then remove the directory; the
        kernel refuses (EBUSY) until the last process has fully exited, so retry a while."""
        for _ in range(100):
            for pid in [int(p) for p in _read(self.procs).split()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            time.sleep(0.1)
        raise CgroupError(f"cannot remove {self.path}: still busy")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
