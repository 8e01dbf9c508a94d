"""Fixtures that mount real filesystems: fusecache itself (through its CLI, as a user would)
and, where a test must count or break what fusecache reads, countingfs as its source."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fusecache
from fusecache import control, mounts

from .helpers import supports_acls

HERE = Path(__file__).parent
CHECKOUT = HERE.parent
# The FUSE session the real-mount tier runs on: ours by default; CI runs the tier again with
# FUSECACHE_TEST_SESSION=pyfuse3 for the fallback.
SESSION = os.environ.get("FUSECACHE_TEST_SESSION", "kernel")
# Mounts serve every byte through the daemon unless a test asks for passthrough=on: what most
# tests check (bytes served, reads, eviction) happens there; tests/test_passthrough.py covers
# the kernel's own path.
DEFAULT_OPTIONS = [f"session={SESSION}", "passthrough=off"]
FUSE_AVAILABLE = os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def pytest_report_header(config) -> str:
    return f"fusecache {fusecache.__version__} from {Path(fusecache.__file__).parent}"


def pytest_configure(config) -> None:
    """CI tests the package pip installed (a wheel), not the checkout's sources: a module
    missing from the wheel must fail there, as it would for a user."""
    installed = Path(fusecache.__file__).resolve()
    if os.environ.get("CI") == "true" and installed.is_relative_to(CHECKOUT.resolve()):
        raise pytest.UsageError(f"CI=true but fusecache is imported from the checkout ({installed}), "
                                "not from an installed wheel: run .ci/setup")


def pytest_collection_modifyitems(config, items):
    """Tests marked `fuse` need root and /dev/fuse. Under CI (CI=true) a machine without them
    fails loudly instead of skipping the tests that matter most."""
    if FUSE_AVAILABLE:
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError("CI=true but root, /dev/fuse or fusermount3 is missing")
    skip = pytest.mark.skip(reason="needs root, /dev/fuse and fusermount3")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)


def run_cli(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fusecache", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"fusecache {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
    return result


def is_mounted(path: Path) -> bool:
    """Asked of the mount table, never of the mountpoint: a stat of it (realpath() makes one)
    waits for its daemon, forever where the test itself holds the connection (test_fdstore)."""
    return mounts.find_mount(mounts.resolve_mountpoint(str(path))) is not None


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    assert mounts.wait_for_exit(pid, timeout), f"process {pid} still running"


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """One fusecache mount driven through the `fusecache` command."""

    def __init__(self, source: Path, mountpoint: Path, cache_dir: Path, options: list[str]) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.options = options
        self.pid: int | None = None
        self.supervisor_pid: int | None = None  # supervisor.py: holds the connection, restarts the daemon

    def mount(self, *extra: str) -> "Mount":
        args = ["mount", self.source, self.mountpoint, "--cache-dir", self.cache_dir]
        for option in DEFAULT_OPTIONS + self.options + list(extra):
            args += ["-o", option]
        run_cli(*args)
        status = self.status()
        self.pid, self.supervisor_pid = status["pid"], status["supervisor_pid"]
        return self

    def status(self) -> dict:
        """The daemon's status report, asked in process (what `fusecache status --json` prints;
        a CLI process per question would cost the suite minutes)."""
        return control.call(str(self.mountpoint), {"command": "status"})

    def metrics(self) -> dict:
        return self.status()["metrics"]

    def unmount(self) -> None:
        run_cli("umount", self.mountpoint)
        for pid in (self.pid, self.supervisor_pid):
            if pid:
                wait_gone(pid)
        self.pid = self.supervisor_pid = None

    def kill9(self) -> None:
        """Kill the mount's processes, the supervisor first: the mount dies (what a crash did
        before the supervisor; kill9_serving() is a crash the supervisor survives)."""
        self.kill9_supervisor()
        self.kill9_serving()

    def kill9_supervisor(self) -> None:
        if self.supervisor_pid:
            os.kill(self.supervisor_pid, signal.SIGKILL)
            wait_gone(self.supervisor_pid)
        self.supervisor_pid = None

    def kill9_serving(self) -> None:
        assert self.pid
        os.kill(self.pid, signal.SIGKILL)
        wait_gone(self.pid)
        self.pid = None

    def cleanup(self) -> None:
        if self.supervisor_pid:
            try:
                os.kill(self.supervisor_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        force_unmount(self.mountpoint)
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(params=["disk", "tmpfs"])
def cache_location(request, tmp_path):
    """A cache dir on disk (replies read by worker threads) or on tmpfs (replies mapped)."""
    if request.param == "disk":
        yield tmp_path / "cache"
        return
    path = Path(tempfile.mkdtemp(prefix="fusecache-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(source, options=[...]) -> Mount (mounted). All are torn down."""
    made: list[Mount] = []

    def factory(source: Path, options: list[str] | None = None, cache_dir: Path | None = None,
                mount: bool = True) -> Mount:
        mountpoint = tmp_path / f"mnt{len(made)}"
        mountpoint.mkdir()
        m = Mount(source, mountpoint, cache_dir or tmp_path / "cache", options or [])
        made.append(m)
        return m.mount() if mount else m

    yield factory
    for m in made:
        m.cleanup()


class CountingSource:
    """countingfs mounted over a real directory: the 'network filesystem' of a test."""

    def __init__(self, real: Path, mountpoint: Path, state: Path) -> None:
        self.real = real
        self.path = mountpoint
        self.state = state
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(HERE / "countingfs.py"),
                                         str(self.real), str(self.path), str(self.state)])
        deadline = time.monotonic() + 20
        while not (self.state / "ready").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("countingfs did not start")
            time.sleep(0.05)

    def counts(self) -> dict[str, int]:
        try:
            return json.loads((self.state / "counts.json").read_text())
        except FileNotFoundError:
            return {}

    def total(self) -> int:
        return sum(self.counts().values())

    def wait_held(self, timeout: float = 30.0) -> None:
        """Until a delayed read waits in the source (see countingfs's "delay")."""
        deadline = time.monotonic() + timeout
        while not (self.state / "held").exists():
            assert time.monotonic() < deadline, "no read came to wait in the source"
            time.sleep(0.02)

    def set_faults(self, faults: dict) -> None:
        tmp = self.state / "faults.json.tmp"
        tmp.write_text(json.dumps(faults))
        tmp.replace(self.state / "faults.json")

    def stop(self) -> None:
        force_unmount(self.path)
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        (self.state / "ready").unlink(missing_ok=True)  # so that start() waits for a new one


@pytest.fixture
def counting_source(tmp_path):
    """A CountingSource over tmp_path/real (fill `real` first, then call start())."""
    real, mountpoint, state = tmp_path / "real", tmp_path / "counted", tmp_path / "state"
    for d in (real, mountpoint, state):
        d.mkdir()
    source = CountingSource(real, mountpoint, state)
    yield source
    source.stop()


def file_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def acl_dir(tmp_path):
    """A directory that everyone may search, on a filesystem with POSIX ACLs."""
    if supports_acls(tmp_path):
        tmp_path.chmod(0o755)
        yield tmp_path
        return
    if os.path.isdir("/dev/shm"):
        shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="fusecache-acl-"))
        try:
            if supports_acls(shm):
                shm.chmod(0o755)
                yield shm
                return
        finally:
            shutil.rmtree(shm)
    pytest.skip("neither tmp_path's filesystem nor /dev/shm supports POSIX ACLs")


@pytest.fixture
def world():
    """A directory every user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fusecache-hostile-", dir="/tmp"))
    path.chmod(0o755)
    made: list[Mount] = []
    yield path, made
    for m in made:
        m.cleanup()
    shutil.rmtree(path, ignore_errors=True)


def mount_in(world, source: Path, options: list[str] | None = None, cache_dir: Path | None = None) -> Mount:
    """A root allow_other mount whose mountpoint other users can reach."""
    base, made = world
    mountpoint = base / f"mnt{len(made)}"
    mountpoint.mkdir()
    m = Mount(source, mountpoint, cache_dir or base / "cache", ["allow_other", *(options or [])])
    made.append(m)
    return m.mount()
