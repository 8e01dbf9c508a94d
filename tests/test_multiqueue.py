"""Several reader threads or processes on duplicates of the /dev/fuse descriptor (queues=4), on
real mounts with passthrough=off: every byte through the daemon (session/queues.py,
session/processes.py, session/direct.py).

What it proves:
- files complete in the cache, read at once by read(), pread() at odd offsets, mmap and
  O_DIRECT (from the start, and mid-page: requests that span a page more than their size,
  which a reader process must still splice or copy whole), with the cache on disk and on
  tmpfs: every byte is the source's, and every byte the daemon served came from the reader
  threads (bytes_served_direct);
- a handle open on a file the source replaced keeps reading the version it opened (also
  through the threads), while a new open reads the new one;
- a file opened before it was complete is read through the trio thread (its bytes right,
  none served by the threads) until it completes; then that open's reads, and a new open's,
  go to the threads;
- a cache file written behind the daemon's back while a handle has it open: the threads stop
  serving it, and the engine checks it again and serves the source's bytes;
- with the cache on disk, a file read through the mount does not stay in the page cache a
  second time as its cache file's pages (with either queue), even where the page cache holds
  files in large folios, which a drop of each reply's own range leaves in place;
- (a read waiting for the source interrupted when its reader is killed, the INTERRUPT reaching
  the request through whichever thread reads it: test_session, with queues=1 and 4);
- unmounting, by `fusecache umount` or by umount(8) from outside, ends the daemon while its
  threads wait for requests;
- `fusecache restart` hands the connection over under live readers: no error, no wrong byte;
  a handle open across it is served by the new daemon's threads;
- the same with reader processes (readers=processes, where a cache in memory gets them by
  default) for an open that completes, a foreign write, a restart and a handle open across
  it; and a reader process killed under live readers is replaced, what it held sent again
  (NOTIFY_RESEND): no error, no wrong byte.
"""

from __future__ import annotations

import glob
import mmap
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import SESSION, file_bytes, is_mounted, run_cli, wait_gone
from .helpers import fill, reader_processes, resident_fraction, wait_until
from .readers import Readers

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(SESSION != "kernel", reason="the reader threads are fusecache's own session's")]

MiB = 1 << 20
QUEUES = "queues=4"
READERS = ["readers=threads", "readers=processes"]
WAIT = 60.0  # a failure bound only


def dropped(fd: int) -> int:
    """fd, with the mount's page cache of its file dropped: the next reads reach the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def read_all(path: Path, kind: str, size: int) -> bytes:
    """The file's bytes as one kind of reader gets them."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if kind.startswith("direct") else 0))
    try:
        dropped(fd)
        if kind == "mmap":
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                return m[:]
        if kind == "pread":  # odd sizes at odd offsets, in a shuffled order
            rng = random.Random(size)
            cuts = sorted({0, size, *(rng.randrange(size) for _ in range(40))})
            pieces = list(zip(cuts, cuts[1:]))
            rng.shuffle(pieces)
            got = bytearray(size)
            for start, end in pieces:
                got[start:end] = os.pread(fd, end - start, start)
            return bytes(got)
        buf = mmap.mmap(-1, MiB)  # aligned, for O_DIRECT
        out = bytearray()
        if kind == "direct-odd":  # reads of 1 MiB that start mid-page: each spans a page more
            out += os.pread(fd, 1, 0)
        while n := os.preadv(fd, [buf], len(out)):
            out += buf[:n]
        return bytes(out)
    finally:
        os.close(fd)


def test_complete_files_are_served_by_the_threads_byte_for_byte(tmp_path, make_mount, cache_location):
    src = tmp_path / "src"
    contents = fill(src, {"a.bin": 9 * MiB + 123, "b.bin": 5 * MiB, "c.bin": 4095})
    m = make_mount(src, [QUEUES], cache_dir=cache_location)
    for name, data in contents.items():  # the fill: through the trio thread
        assert file_bytes(m.mountpoint / name) == data
    before = m.metrics()
    errors: list[str] = []

    def reader(name: str, kind: str) -> None:
        for _ in range(3):
            if read_all(m.mountpoint / name, kind, len(contents[name])) != contents[name]:
                errors.append(f"{kind} {name}: wrong bytes")

    with ThreadPoolExecutor(max_workers=15) as pool:  # .result(): a reader's exception fails the test
        for done in [pool.submit(reader, name, kind)
                     for name in contents for kind in ("read", "pread", "mmap", "direct", "direct-odd")]:
            done.result(timeout=120)
    assert errors == []
    after = m.metrics()
    served = after["bytes_served"] - before["bytes_served"]
    assert served > 0 and after["bytes_served_direct"] - before["bytes_served_direct"] == served
    assert after["bytes_served_from_cache"] - before["bytes_served_from_cache"] == served
    m.unmount()


def test_a_handle_on_a_replaced_file_keeps_its_version(tmp_path, make_mount):
    src = tmp_path / "src"
    old = fill(src, {"w.bin": 3 * MiB + 5})["w.bin"]
    # no stream: the test's own opens alone make and unlink the file's cache entries
    m = make_mount(src, [QUEUES, "readahead=off"])
    assert file_bytes(m.mountpoint / "w.bin") == old

    def by_threads(read):
        """read(), checking that what the daemon served meanwhile (the mount's page cache may
        still hold a page or two through a DONTNEED) came from the threads, all of it."""
        before = m.metrics()
        got = read()
        after = m.metrics()
        served = after["bytes_served"] - before["bytes_served"]
        assert served > 0 and after["bytes_served_direct"] - before["bytes_served_direct"] == served
        return got

    with open(m.mountpoint / "w.bin", "rb") as f:  # complete at open: served by the threads
        new = bytes(reversed(old))
        (src / "w.bin.new").write_bytes(new)
        os.replace(src / "w.bin.new", src / "w.bin")
        os.stat(m.mountpoint / "w.bin")  # a lookup: the daemon retires the old version
        assert by_threads(lambda: os.pread(dropped(f.fileno()), len(old) + 1, 0)) == old
        assert file_bytes(m.mountpoint / "w.bin") == new  # a new open reads the new version
        assert by_threads(lambda: os.pread(dropped(f.fileno()), len(old) + 1, 0)) == old
    m.unmount()


@pytest.mark.parametrize("readers", READERS)
def test_an_incomplete_file_is_read_through_the_trio_thread_until_it_completes(tmp_path, make_mount, readers):
    src = tmp_path / "src"
    data = fill(src, {"slow.bin": 6 * MiB})["slow.bin"]
    m = make_mount(src, [QUEUES, readers, "readahead=off", "sequential_window=0"])
    with open(m.mountpoint / "slow.bin", "rb") as f:  # nothing cached at open
        assert os.pread(f.fileno(), MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
        assert m.metrics()["bytes_served_direct"] == 0
        assert f.read() == data  # completes the file, through the trio thread
        metrics = m.metrics()
        assert metrics["bytes_served"] >= len(data) and metrics["bytes_served_direct"] == 0
        # complete now: the same open's next reads are the threads'
        assert os.pread(dropped(f.fileno()), len(data), 0) == data
    assert m.metrics()["bytes_served_direct"] == len(data)
    assert read_all(m.mountpoint / "slow.bin", "read", len(data)) == data  # complete at this open
    assert m.metrics()["bytes_served_direct"] == 2 * len(data)
    m.unmount()


@pytest.mark.parametrize("readers", READERS)
def test_a_cache_file_written_behind_the_daemons_back_is_checked_again(tmp_path, make_mount, readers):
    src = tmp_path / "src"
    data = fill(src, {"v.bin": 8 * MiB})["v.bin"]
    m = make_mount(src, [QUEUES, readers])
    assert file_bytes(m.mountpoint / "v.bin") == data
    with open(m.mountpoint / "v.bin", "rb") as f:  # complete at open: served by the threads
        assert os.pread(dropped(f.fileno()), MiB, 0) == data[:MiB]
        (cache_file,) = glob.glob(str(m.cache_dir / "fusecache-v1" / "*" / "objects" / "*" / "*.data"))
        filled = os.stat(cache_file).st_ctime_ns
        fd = os.open(cache_file, os.O_WRONLY)
        try:
            for _ in range(100):  # a write within the fill's clock tick is not seen (reliability.md): a later one
                os.pwrite(fd, b"\xff" * 4096, 5 * MiB)
                if os.fstat(fd).st_ctime_ns != filled:
                    break
                time.sleep(0.002)
        finally:
            os.close(fd)
        assert os.pread(dropped(f.fileno()), len(data), 0) == data
    assert m.metrics()["checksum_failures"] >= 1
    m.unmount()


@pytest.mark.parametrize("queues", ["queues=1", QUEUES])
def test_a_disk_caches_pages_are_dropped_after_the_replies(tmp_path, make_mount, queues):
    src = tmp_path / "src"
    data = fill(src, {"d.bin": 128 * MiB})["d.bin"]
    m = make_mount(src, [queues], cache_dir=tmp_path / "cache")
    assert file_bytes(m.mountpoint / "d.bin") == data  # the fill: its pages are written back...
    # (128 MiB: past the first few readahead windows, where the page cache takes large folios)
    (cache_file,) = glob.glob(str(m.cache_dir / "fusecache-v1" / "*" / "objects" / "*" / "*.data"))
    fd = os.open(cache_file, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # ... and dropped: what follows is the reads'
    os.close(fd)
    assert resident_fraction(cache_file) == 0
    assert read_all(m.mountpoint / "d.bin", "direct", len(data)) == data  # 1 MiB reads, one at a time
    assert resident_fraction(cache_file) <= 0.1
    m.unmount()


@pytest.mark.parametrize("how", ["fusecache", "umount"])
def test_unmounting_ends_the_daemon_while_its_threads_wait(tmp_path, make_mount, how):
    src = tmp_path / "src"
    data = fill(src, {"x.bin": MiB})["x.bin"]
    m = make_mount(src, [QUEUES])
    assert file_bytes(m.mountpoint / "x.bin") == data
    time.sleep(0.2)  # every thread back in its wait
    pid = m.pid
    if how == "fusecache":
        m.unmount()
    else:
        subprocess.run(["umount", str(m.mountpoint)], check=True)
        wait_gone(pid)
    assert not is_mounted(m.mountpoint)


@pytest.mark.parametrize("readers", READERS)
def test_restart_hands_over_under_readers(tmp_path, make_mount, readers):
    src = tmp_path / "src"
    contents = fill(src, {"r/a.bin": 6 * MiB + 17, "r/b.bin": 3 * MiB})
    m = make_mount(src, [QUEUES, readers])
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data

    def restart() -> None:
        old = m.pid
        run_cli("restart", m.mountpoint)
        m.pid = m.status()["pid"]
        assert m.pid != old
        wait_gone(old)

    with Readers(m.mountpoint, contents) as readers:
        readers.around(restart)
    assert readers.errors == []
    assert m.metrics()["bytes_from_source"] == 0
    served_by_readers(m, contents)
    m.unmount()


def served_by_readers(m, contents: dict[str, bytes]) -> None:
    """Every file read once more (no reader holds a mapping now, whose pages the page cache
    would keep): all of it served by the readers."""
    before = m.metrics()["bytes_served_direct"]
    for name, data in contents.items():
        assert read_all(m.mountpoint / name, "read", len(data)) == data
    assert m.metrics()["bytes_served_direct"] - before == sum(map(len, contents.values()))


def test_a_reader_process_killed_under_readers_is_replaced(tmp_path, make_mount):
    src = tmp_path / "src"
    contents = fill(src, {"k/a.bin": 6 * MiB + 5, "k/b.bin": 4 * MiB})
    m = make_mount(src, [QUEUES, "readers=processes"])
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    killed: list[int] = []

    def kill_one() -> None:
        pids = reader_processes(m.pid)
        assert len(pids) == 4
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])
        wait_until(lambda: len(set(reader_processes(m.pid)) - set(killed)) == 4, "a new reader process", WAIT)

    with Readers(m.mountpoint, contents) as readers:
        readers.around(kill_one)
    assert readers.errors == []
    served_by_readers(m, contents)
    # they run a copy of the daemon's own code, made as it started: a replacement started
    # after an upgrade (a pip install under a running daemon) runs no other release's
    environ = Path(f"/proc/{reader_processes(m.pid)[0]}/environ").read_bytes().split(b"\0")
    code = Path(os.fsdecode(next(v for v in environ if v.startswith(b"PYTHONPATH=")))[len("PYTHONPATH="):]
                .split(os.pathsep)[0])
    assert code.name.startswith("fusecache-readers-") and (code / "fusecache" / "session" / "reader_process.py").exists()
    assert os.stat(code).st_mode & 0o077 == 0
    m.unmount()
    assert not code.exists()  # removed with the session


@pytest.mark.parametrize("readers", READERS)
def test_handles_open_across_a_restart_are_served_by_the_new_daemons_threads(tmp_path, make_mount, readers):
    src = tmp_path / "src"
    data = fill(src, {"h.bin": 5 * MiB + 3})["h.bin"]
    m = make_mount(src, [QUEUES, readers])
    assert file_bytes(m.mountpoint / "h.bin") == data
    with open(m.mountpoint / "h.bin", "rb") as f:
        old = m.pid
        run_cli("restart", m.mountpoint)
        m.pid = m.status()["pid"]
        wait_gone(old)
        before = m.metrics()
        assert os.pread(dropped(f.fileno()), len(data) + 1, 0) == data
        after = m.metrics()
    served = after["bytes_served"] - before["bytes_served"]
    assert served > 0 and after["bytes_served_direct"] - before["bytes_served_direct"] == served
    m.unmount()
