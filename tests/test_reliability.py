"""Faults tried hard: crashes mid-stream, a source that changes or fails, a cache that is
damaged or removed, other users, load. The one thing that must never happen is a wrong byte."""

from __future__ import annotations

import errno
import hashlib
import os
import json
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusecache.control import socket_path
from fusecache.store import summarize_index

from .conftest import Mount, file_bytes, run_cli
from .helpers import deep_tree, fill, settled

pytestmark = pytest.mark.fuse

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).parent.parent


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_kill9_mid_stream_then_remount(counting_source, make_mount):
    contents = fill(counting_source.real, {"big.safetensors": 48 * MiB}, seed=31)
    counting_source.start()
    counting_source.set_faults({"big.safetensors": {"delay": 0.01}})
    m = make_mount(counting_source.path, ["chunk_size=1M", "stream_read_size=4M", "streams=1", "fill_reads_max=1"])
    with open(m.mountpoint / "big.safetensors", "rb") as f:
        f.read(1)  # starts the stream
    wait_until(lambda: 8 * MiB < counting_source.total())
    m.kill9()
    # a read of the source in flight at the kill is counted when countingfs answers it, after
    read_before = settled(counting_source.total)
    [index] = m.cache_dir.rglob("*.idx")
    cached_at_crash = summarize_index(index)["cached"]
    assert 0 < cached_at_crash < 48 * MiB
    counting_source.set_faults({})
    # what the kernel read ahead of the source before the kill is not the remount's to count
    fd = os.open(counting_source.path / "big.safetensors", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    m.mount()
    assert hashlib.sha256(file_bytes(m.mountpoint / "big.safetensors")).digest() == \
        hashlib.sha256(contents["big.safetensors"]).digest()
    # the remount fetched exactly what the crash had not recorded
    assert counting_source.total() - read_before == 48 * MiB - cached_at_crash


def test_replaced_file_one_open_sees_one_version(tmp_path, make_mount):
    source = tmp_path / "src"
    old = fill(source, {"f.bin": 16 * MiB}, seed=32)["f.bin"]
    new = random.Random(33).randbytes(16 * MiB)
    m = make_mount(source, ["readahead=off", "chunk_size=1M", "attr_timeout=0"])
    with open(m.mountpoint / "f.bin", "rb") as held:
        assert held.read(3 * MiB) == old[:3 * MiB]
        (source / "f.bin.new").write_bytes(new)
        os.rename(source / "f.bin.new", source / "f.bin")  # replaced while open
        assert file_bytes(m.mountpoint / "f.bin") == new  # a new open sees the new version
        assert held.read() == old[3 * MiB:]  # the old open still reads only the old version
    assert file_bytes(m.mountpoint / "f.bin") == new


def test_deleted_file_keeps_serving_its_open_handle(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"d.bin": 8 * MiB}, seed=34)["d.bin"]
    m = make_mount(source, ["readahead=off", "attr_timeout=0"])
    with open(m.mountpoint / "d.bin", "rb") as held:
        assert held.read(MiB) == data[:MiB]
        (source / "d.bin").unlink()
        assert held.read() == data[MiB:]
    with pytest.raises(FileNotFoundError):
        open(m.mountpoint / "d.bin", "rb")


def test_file_modified_in_place_is_never_mixed(tmp_path, make_mount):
    source = tmp_path / "src"
    old = fill(source, {"p.bin": 8 * MiB}, seed=35)["p.bin"]
    m = make_mount(source, ["readahead=off", "chunk_size=1M", "attr_timeout=0"])
    with open(m.mountpoint / "p.bin", "rb") as held:
        assert held.read(MiB) == old[:MiB]
        with open(source / "p.bin", "r+b") as f:  # same inode, same size, new bytes
            f.seek(4 * MiB)
            f.write(b"\x00" * MiB)
        held.seek(4 * MiB)
        try:
            got = held.read(MiB)
        except OSError as e:
            assert e.errno == errno.EIO  # refusing is fine; serving new bytes to an old open is not
        else:
            assert got == old[4 * MiB:5 * MiB]
    assert file_bytes(m.mountpoint / "p.bin") == (source / "p.bin").read_bytes()


def test_file_rewritten_with_its_size_and_mtime_kept_is_never_mixed(tmp_path, make_mount):
    """Only the ctime tells this rewrite from the version an open handle holds: the rest of
    that open fails rather than serve bytes of the new version (audit 2, item 2)."""
    source = tmp_path / "src"
    old = fill(source, {"p.bin": 8 * MiB}, seed=36)["p.bin"]
    m = make_mount(source, ["readahead=off", "chunk_size=1M", "attr_timeout=0", "passthrough_wait=0"])
    path = source / "p.bin"
    before = os.stat(path)
    with open(m.mountpoint / "p.bin", "rb") as held:
        assert held.read(MiB) == old[:MiB]
        time.sleep(0.05)  # past the tick of coarse timestamps: the rewrite moves the ctime
        with open(path, "r+b") as f:
            f.write(bytes(b ^ 0xFF for b in old[:4 * MiB]) * 2)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        assert after.st_ctime_ns != before.st_ctime_ns
        held.seek(4 * MiB)
        with pytest.raises(OSError) as info:
            held.read(MiB)
        assert info.value.errno == errno.EIO
    assert file_bytes(m.mountpoint / "p.bin") == path.read_bytes()


def test_file_modified_in_place_new_opens_never_see_old_pages(tmp_path, make_mount):
    """Same source inode, same size, new bytes: the kernel must not hand a new open the
    pages it cached for the old version (each version gets its own inode number)."""
    source = tmp_path / "src"
    old = fill(source, {"q.bin": 4 * MiB}, seed=38)["q.bin"]
    new = random.Random(39).randbytes(4 * MiB)
    m = make_mount(source, ["readahead=off", "attr_timeout=0"])
    with open(m.mountpoint / "q.bin", "rb") as held:
        assert held.read() == old  # every page of the old version is now in the page cache
        before = os.stat(source / "q.bin")
        with open(source / "q.bin", "r+b") as f:
            f.write(new)
        os.utime(source / "q.bin", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        assert os.stat(m.mountpoint / "q.bin").st_ino != os.fstat(held.fileno()).st_ino
        assert file_bytes(m.mountpoint / "q.bin") == new
        assert os.fstat(held.fileno()).st_size == len(old)
    assert file_bytes(m.mountpoint / "q.bin") == new


def test_open_close_churn_over_more_files_than_are_kept_idle(tmp_path, make_mount):
    """Opens racing the closing of idle files (more files than the idle LRU keeps)."""
    source = tmp_path / "src"
    contents = fill(source, {f"d/{i:03}.bin": 2000 + i for i in range(300)}, seed=40)
    m = make_mount(source, ["readahead=off"])
    failures: list[str] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            name = f"d/{rng.randrange(300):03}.bin"
            try:
                with open(m.mountpoint / name, "rb") as f:
                    if f.read() != contents[name]:
                        failures.append(f"{name}: wrong bytes")
            except OSError as e:
                failures.append(f"{name}: {e}")
                return

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert m.status()["pid"] == m.pid  # the daemon is still the one we started


def test_replaced_while_streaming(counting_source, make_mount):
    old = fill(counting_source.real, {"s.safetensors": 24 * MiB}, seed=36)["s.safetensors"]
    counting_source.start()
    counting_source.set_faults({"s.safetensors": {"delay": 0.01}})
    m = make_mount(counting_source.path, ["chunk_size=1M", "stream_read_size=2M", "streams=1", "fill_reads_max=1",
                                          "attr_timeout=0"])
    with open(m.mountpoint / "s.safetensors", "rb") as held:
        assert held.read(MiB) == old[:MiB]
        wait_until(lambda: counting_source.total() > 4 * MiB)
        new = random.Random(37).randbytes(24 * MiB)
        (counting_source.real / "tmp").write_bytes(new)
        os.rename(counting_source.real / "tmp", counting_source.real / "s.safetensors")
        counting_source.set_faults({})
        # countingfs, like sshfs, answers fstat of an old open with the new file's attributes:
        # fusecache cannot prove the bytes are old ones and refuses (EIO) what it had not cached.
        # What the old open gets is old bytes or EIO, never new bytes.
        served_old = 0
        for offset in range(MiB, 24 * MiB, MiB):
            try:
                held.seek(offset)
                got = held.read(MiB)
            except OSError as e:
                assert e.errno == errno.EIO
            else:
                assert got == old[offset:offset + MiB], f"bytes of another version at {offset}"
                served_old += 1
        assert served_old >= 3  # at least what the stream had cached before the replacement
    assert file_bytes(m.mountpoint / "s.safetensors") == new


def test_cache_file_overwritten_or_truncated_while_mounted(tmp_path, make_mount, cache_location):
    source = tmp_path / "src"
    data = fill(source, {"c.bin": 12 * MiB}, seed=38)["c.bin"]
    m = make_mount(source, ["readahead=off", "chunk_size=1M"], cache_dir=cache_location)
    assert file_bytes(m.mountpoint / "c.bin") == data
    [data_file] = m.cache_dir.rglob("*.data")
    # A foreign write is noticed by the data file's ctime moving past the one our own last
    # write left; the kernel's timestamps are clock-tick (ms) grained, so let one tick pass.
    time.sleep(0.05)
    with open(data_file, "r+b") as f:
        f.seek(3 * MiB + 100)
        f.write(b"\xee" * 5000)
    drop_page_cache()
    assert file_bytes(m.mountpoint / "c.bin") == data
    assert m.metrics()["checksum_failures"] >= 1
    time.sleep(0.05)
    os.truncate(data_file, 5 * MiB)
    drop_page_cache()
    assert file_bytes(m.mountpoint / "c.bin") == data


def test_cache_dir_removed_while_mounted(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {"a.bin": 6 * MiB, "b.bin": 6 * MiB}, seed=39)
    m = make_mount(source, ["readahead=off"])
    assert file_bytes(m.mountpoint / "a.bin") == contents["a.bin"]
    shutil.rmtree(m.cache_dir)
    drop_page_cache()
    assert file_bytes(m.mountpoint / "a.bin") == contents["a.bin"]
    assert file_bytes(m.mountpoint / "b.bin") == contents["b.bin"]
    assert any(m.cache_dir.rglob("*.idx"))  # the layout was recreated for new entries


def test_cache_dir_made_untrusted_while_mounted_reads_through(tmp_path, make_mount):
    """A directory above the cache dir made writable by others after the mount: files not
    cached yet are read straight from the source, with one line in the log, no traceback
    (audit 2, item 14)."""
    source = tmp_path / "src"
    contents = fill(source, {f"f{i}.bin": MiB for i in range(8)}, seed=40)
    outer = tmp_path / "outer"
    outer.mkdir(mode=0o755)
    m = make_mount(source, ["readahead=off"], cache_dir=outer / "cache")
    assert file_bytes(m.mountpoint / "f0.bin") == contents["f0.bin"]
    outer.chmod(0o777)
    try:
        for name in sorted(contents)[1:]:
            assert file_bytes(m.mountpoint / name) == contents[name]
    finally:
        outer.chmod(0o755)
    log = next(m.cache_dir.rglob("daemon.log")).read_text()
    assert "Traceback" not in log and "unexpected" not in log
    assert "is writable by group or others; reading f1.bin straight from the source" in log
    assert sorted(p.stem for p in m.cache_dir.rglob("*.idx")) == [next(m.cache_dir.rglob("*.idx")).stem]


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
                          capture_output=True, text=True, errors="replace", cwd="/")


# What a local user can do against the control socket: connect, and send a request.
# Run by the system's python3, whose standard library any user can read.
CONTROL_PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("connect refused"); sys.exit(0)
s.sendall(json.dumps({"command": sys.argv[2], "paths": [""]}).encode() + b"\\n")
print(s.makefile().readline().strip())
"""


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="fusecache-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_permissions_with_allow_other(public_dir, tmp_path):
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("setpriv or the system python3 missing")
    source, mountpoint = public_dir / "src", public_dir / "mnt"
    fill(source, {"public.txt": 100, "secret.txt": 100})
    os.chmod(source / "secret.txt", 0o600)
    mountpoint.mkdir()
    m = Mount(source, mountpoint, tmp_path / "cache", ["allow_other"])
    try:
        m.mount()
        assert as_nobody("cat", str(m.mountpoint / "public.txt")).returncode == 0
        denied = as_nobody("cat", str(m.mountpoint / "secret.txt"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        check_control_channel_refuses_others(m)
    finally:
        m.cleanup()


def check_control_channel_refuses_others(m: Mount) -> None:
    sock = socket_path(str(m.mountpoint), 0)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    probe = as_nobody("/usr/bin/python3", "-c", CONTROL_PROBE, str(sock), "status")
    assert probe.stdout.strip() == "connect refused", probe
    # even with the socket opened up, the daemon checks the peer's uid (SO_PEERCRED)
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o777)
    try:
        for command in ("status", "prefetch", "pin", "cache_clear"):
            probe = as_nobody("/usr/bin/python3", "-c", CONTROL_PROBE, str(sock), command)
            reply = json.loads(probe.stdout) if probe.stdout.strip() else {}
            assert "permission denied" in reply.get("error", ""), probe
    finally:
        os.chmod(sock.parent, 0o700)
        os.chmod(sock, 0o600)
    assert m.status()["pins"] == []


def test_sixty_four_concurrent_readers(counting_source, make_mount):
    contents = fill(counting_source.real, {f"f{i}.safetensors": 3 * MiB + i for i in range(8)}, seed=40)
    counting_source.start()
    m = make_mount(counting_source.path, ["chunk_size=1M"])
    errors: list[str] = []

    def reader(n: int) -> None:
        rng = random.Random(n)
        for name in rng.sample(sorted(contents), len(contents)):
            with open(m.mountpoint / name, "rb") as f:
                offset = rng.randrange(len(contents[name]))
                f.seek(offset)
                if f.read(256 * 1024) != contents[name][offset:offset + 256 * 1024]:
                    errors.append(f"{name}@{offset}")

    with ThreadPoolExecutor(max_workers=64) as pool:  # .result(): a reader's exception or hang fails the test
        for done in [pool.submit(reader, n) for n in range(64)]:
            done.result(timeout=120)
    assert not errors
    assert counting_source.counts() == {name: len(data) for name, data in contents.items()}  # each byte read once


def test_many_small_files_deep_dirs_odd_names_and_a_sparse_file(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(10_000):
        sub = source / f"d{i % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}").write_bytes(f"{i}\n".encode())
    deep = source.joinpath(*[f"level{i}" for i in range(20)])
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("deep")
    odd = ["with space", "ünïcødé ✓", "new\nline", "tab\there", "trailing ", "-dash", "#hash"]
    for name in odd:
        (source / name).write_text(name)
    with open(source / "sparse.img", "wb") as f:
        f.truncate(4 * GiB)
        f.seek(2 * GiB)
        f.write(b"middle")
        f.seek(4 * GiB - 3)
        f.write(b"end")
    m = make_mount(source, ["readahead=off"])
    mp = m.mountpoint
    assert sum(len(files) for _, _, files in os.walk(mp)) == 10_000 + 1 + len(odd) + 1
    for i in range(0, 10_000, 7):
        assert (mp / f"d{i % 100:02d}" / f"f{i}").read_bytes() == f"{i}\n".encode()
    assert mp.joinpath(*[f"level{i}" for i in range(20)], "bottom.txt").read_text() == "deep"
    for name in odd:
        assert (mp / name).read_text() == name
    assert os.path.getsize(mp / "sparse.img") == 4 * GiB
    with open(mp / "sparse.img", "rb") as f:
        f.seek(2 * GiB - 10)
        assert f.read(16) == b"\0" * 10 + b"middle"
        f.seek(4 * GiB - 5)
        assert f.read() == b"\0\0end"
    peak_kib = int(next(line.split()[1] for line in open(f"/proc/{m.pid}/status") if line.startswith("VmHWM")))
    print(f"daemon peak RSS after 10,000 files: {peak_kib / 1024:.0f} MiB")
    assert peak_kib * 1024 < 250 * MiB


def test_paths_longer_than_path_max_are_served(tmp_path, make_mount):
    """Depth 24 of 200-byte names below the root (4.8 KB, past PATH_MAX): lookup, stat, open,
    read, readdir and readlink work through the mount as on the source (audit 2, item 6)."""
    source = tmp_path / "src"
    source.mkdir()
    data = random.Random(37).randbytes(3 * MiB)
    deep = deep_tree(source, data)
    m = make_mount(source, ["readahead=off", "attr_timeout=0"])
    fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)  # each lookup from its parent
    try:
        for name in deep.split("/"):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        assert sorted(os.listdir(fd)) == ["f", "link"]
        assert os.stat("f", dir_fd=fd).st_size == len(data)
        assert os.readlink("link", dir_fd=fd) == "f"
        file_fd = os.open("f", os.O_RDONLY, dir_fd=fd)
        with os.fdopen(file_fd, "rb") as f:
            assert f.read() == data
        file_fd = os.open("link", os.O_RDONLY, dir_fd=fd)  # the kernel follows it, inside the mount
        with os.fdopen(file_fd, "rb") as f:
            assert f.read() == data
    finally:
        os.close(fd)


def test_names_with_dotdot_or_slash_are_rejected():
    from fusecache.source import Source

    src = Source(ROOT)
    for bad in ("..", ".", "a/b", "", "x\0y"):
        with pytest.raises(OSError):
            src.child("", bad)
    assert src.child("a", "b") == "a/b"


def test_symlink_escaping_source_is_not_followed_by_the_daemon(tmp_path, make_mount):
    outside = tmp_path / "outside-secret"
    outside.write_text("outside")
    source = tmp_path / "src"
    source.mkdir()
    os.symlink("../outside-secret", source / "escape")
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "f.safetensors").write_text("outside, below a linked directory")
    os.symlink("../outside-dir", source / "dirlink")
    m = make_mount(source)
    assert os.readlink(m.mountpoint / "escape") == "../outside-secret"
    # the kernel resolves the link relative to the mount (here, as it happens, the same parent);
    # the daemon itself opens nothing through it, asked by path (prefetch) or not
    assert (m.mountpoint / "escape").read_text() == "outside"
    for asked in ("escape", "dirlink/f.safetensors"):
        result = run_cli("prefetch", m.mountpoint / asked, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert not list(m.cache_dir.rglob("*.idx")), "the daemon read through a symlink"
