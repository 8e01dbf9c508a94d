"""Kernel passthrough on real mounts: complete cache files are read by the kernel itself, and
no wrong byte is ever served across crashes, corrupted caches, eviction and source changes."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from .conftest import SESSION, file_bytes, run_cli

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(SESSION != "kernel", reason="passthrough needs fusecache's own session")]

MiB = 1 << 20
ON = ["session=kernel", "passthrough=on"]


def write(path: Path, size: int, seed: int) -> bytes:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    data = bytes((b + seed) % 256 for b in data[:4096]) + data[4096:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def data_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.data"))


def file_state(m, name: str) -> dict:
    return next(f for f in m.status()["files"] if f["path"] == name)


def test_a_complete_file_is_read_by_the_kernel(tmp_path, make_mount):
    src = tmp_path / "src"
    data = write(src / "m" / "w.bin", 9 * MiB + 5, seed=1)
    m = make_mount(src, options=ON)
    assert m.status()["passthrough"] == "on"
    assert file_bytes(m.mountpoint / "m" / "w.bin") == data  # fills the cache, served by the daemon
    served = m.metrics()["bytes_served"]
    with open(m.mountpoint / "m" / "w.bin", "rb") as f:
        assert file_state(m, "m/w.bin")["passthrough"] == 1
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:] == data
        f.seek(0)
        assert f.read() == data
    metrics = m.metrics()
    assert metrics["passthrough_opens"] >= 1 and metrics["bytes_served"] == served  # not a byte through us
    table = run_cli("status", m.mountpoint).stdout
    assert "passthrough:  on" in table


def test_a_reload_from_the_cache_counts_as_hits(tmp_path, make_mount):
    """The kernel's reads never reach the daemon: status used to say "hit ratio 0.0%" after a
    load served entirely from the cache. Each passthrough open counts its file's size."""
    src = tmp_path / "src"
    data = write(src / "w.bin", 6 * MiB, seed=3)
    m = make_mount(src, options=ON)
    assert file_bytes(m.mountpoint / "w.bin") == data  # fills the cache
    m.unmount()
    m.mount()
    for _ in range(2):
        assert file_bytes(m.mountpoint / "w.bin") == data
    metrics = m.metrics()
    assert metrics["bytes_served"] == 0 and metrics["bytes_from_source"] == 0
    assert metrics["passthrough_opens"] == 2 and metrics["passthrough_bytes"] == 2 * len(data)
    assert metrics["hit_ratio"] == 1.0
    table = run_cli("status", m.mountpoint).stdout
    assert "hit ratio:    100.0%" in table and "12.0 MiB opened through passthrough" in table


def test_kill9_and_a_corrupted_cache_file_serve_no_wrong_byte(counting_source, make_mount):
    data = write(counting_source.real / "w.bin", 12 * MiB, seed=2)
    counting_source.start()
    m = make_mount(counting_source.path, options=ON)
    fuse_path = os.open(m.mountpoint / "w.bin", os.O_RDONLY)
    assert os.read(fuse_path, len(data) + 1) == data
    passthrough = os.open(m.mountpoint / "w.bin", os.O_RDONLY)  # held across the crash
    assert os.pread(passthrough, MiB, 0) == data[:MiB]
    m.kill9()
    assert os.pread(passthrough, MiB, MiB) == data[MiB:2 * MiB]  # the kernel reads the cache file itself
    for fd in (fuse_path, passthrough):
        os.close(fd)
    run_cli("umount", m.mountpoint, check=False)
    (cache_file,) = data_files(m.cache_dir)
    with open(cache_file, "r+b") as f:  # a flipped byte in a chunk recorded as good
        f.seek(5 * MiB + 7)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    fetched_before = counting_source.total()
    m.mount()
    with open(m.mountpoint / "w.bin", "rb") as f:
        assert f.read() == data
    metrics = m.metrics()
    assert metrics["checksum_failures"] >= 1, metrics  # caught before the first passthrough open
    assert metrics["passthrough_opens"] >= 1, metrics
    # only the bad chunk came again: the rest was verified, not refetched
    assert counting_source.total() - fetched_before <= 8 * MiB
    with open(m.mountpoint / "w.bin", "rb") as f:
        assert f.read() == data


def test_eviction_waits_for_an_open_passthrough_reader(tmp_path, make_mount):
    src = tmp_path / "src"
    data = write(src / "w.bin", 8 * MiB, seed=3)
    m = make_mount(src, options=ON)
    assert file_bytes(m.mountpoint / "w.bin") == data
    with open(m.mountpoint / "w.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert file_state(m, "w.bin")["passthrough"] == 1
        run_cli("cache", "clear", m.mountpoint)
        assert mapped[:] == data and len(data_files(m.cache_dir)) == 1  # kept, never truncated under it
    deadline = time.monotonic() + 5
    while data_files(m.cache_dir) and time.monotonic() < deadline:  # the release comes after close()
        run_cli("cache", "clear", m.mountpoint)
        time.sleep(0.05)
    assert data_files(m.cache_dir) == []
    assert file_bytes(m.mountpoint / "w.bin") == data


def test_a_source_change_under_a_passthrough_reader(tmp_path, make_mount):
    src = tmp_path / "src"
    old = write(src / "w.bin", 8 * MiB, seed=4)
    m = make_mount(src, options=ON + ["attr_timeout=0"])
    assert file_bytes(m.mountpoint / "w.bin") == old
    with open(m.mountpoint / "w.bin", "rb") as reader:
        assert reader.read(MiB) == old[:MiB]
        time.sleep(0.01)
        new = write(src / "w.bin.tmp", 8 * MiB, seed=5)
        os.replace(src / "w.bin.tmp", src / "w.bin")
        assert file_bytes(m.mountpoint / "w.bin") == new  # new opens: the new version
        status = m.status()
        assert status["pending_bytes"] == len(old), status["pending_bytes"]  # unlinked, still open
        assert reader.read() == old[MiB:]  # the old open: the old version, whole
    deadline = time.monotonic() + 5
    while m.status()["pending_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the release reaches the daemon after close() returns
    assert m.status()["pending_bytes"] == 0
    assert file_bytes(m.mountpoint / "w.bin") == new


def test_a_file_completed_under_a_fuse_path_open_moves_to_a_new_inode(tmp_path, make_mount):
    """The open that finds the file complete under a FUSE-path open is served on that inode
    (never refused); the next lookup (attr_timeout=0: every open looks the path up again) gives
    a new inode, opened in passthrough."""
    src = tmp_path / "src"
    data = write(src / "w.bin", 6 * MiB, seed=6)
    m = make_mount(src, options=ON + ["readahead=off", "passthrough_wait=0", "attr_timeout=0"])
    with open(m.mountpoint / "w.bin", "rb") as first:  # nothing cached: the FUSE path
        assert first.read(MiB) == data[:MiB]
        assert file_state(m, "w.bin")["passthrough"] == 0
        assert first.read() == data[MiB:]  # now complete in the cache
        with open(m.mountpoint / "w.bin", "rb") as second:  # served on the inode it looked up
            assert os.fstat(second.fileno()).st_ino == os.fstat(first.fileno()).st_ino
            assert file_state(m, "w.bin")["passthrough"] == 0
            with open(m.mountpoint / "w.bin", "rb") as third:  # looked up again: a new inode
                assert os.fstat(third.fileno()).st_ino != os.fstat(first.fileno()).st_ino
                assert file_state(m, "w.bin")["passthrough"] == 1
                assert third.read() == data
            assert second.read() == data
        first.seek(0)
        assert first.read() == data


@pytest.mark.parametrize("options, reason", [
    (["passthrough=off"], "turned off"),
    (["session=pyfuse3", "passthrough=on"], "pyfuse3 session has none"),
])
def test_without_passthrough_the_daemon_serves_and_says_why(tmp_path, make_mount, options, reason):
    src = tmp_path / "src"
    data = write(src / "w.bin", 3 * MiB, seed=7)
    m = make_mount(src, options=options)
    for _ in range(2):
        assert file_bytes(m.mountpoint / "w.bin") == data
    state = m.status()
    assert reason in state["passthrough"] and state["metrics"]["passthrough_opens"] == 0
    assert state["metrics"]["bytes_served"] >= len(data)
    log = next(m.cache_dir.rglob("daemon.log")).read_text()
    assert sum("passthrough off:" in line for line in log.splitlines()) == 1, log


def _sealed(cache: Path) -> bool:
    from fusecache.store import SEAL_MAGIC  # the seal's own marker, at the end of the index
    return any(index.read_bytes()[-48:].startswith(SEAL_MAGIC) for index in cache.rglob("*.idx"))


def _daemon_read_bytes(pid: int) -> int:
    """Bytes the daemon has read with read/pread since it started (page cache hits included)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"])


@pytest.mark.parametrize("verify, reads_the_file", [("sealed", False), ("always", True)])
def test_a_restart_serves_a_sealed_file_without_reading_it(tmp_path, make_mount, verify, reads_the_file):
    """Issue 20: a complete file is sealed; after a restart the kernel is given it at once,
    where it used to be read and hashed whole first (verify=always still does that)."""
    src = tmp_path / "src"
    data = write(src / "w.bin", 24 * MiB, seed=4)
    m = make_mount(src, options=ON + [f"verify={verify}"])
    assert file_bytes(m.mountpoint / "w.bin") == data
    deadline = time.monotonic() + 30
    while not _sealed(m.cache_dir):
        assert time.monotonic() < deadline, "the complete file was never sealed"
        time.sleep(0.05)
    m.unmount()
    m.mount()
    before = _daemon_read_bytes(m.pid)
    with open(m.mountpoint / "w.bin", "rb") as f:
        assert f.read() == data
    read = _daemon_read_bytes(m.pid) - before
    metrics = m.metrics()
    assert metrics["passthrough_opens"] == 1 and metrics["bytes_served"] == 0, metrics
    assert (read >= len(data)) == reads_the_file, read
