"""The user's contract (docs/semantics.md): what a reader sees, call by call and when the
source, the cache or the daemon misbehaves. Each test here backs a statement of that page
that no other test did; the page names the test next to the statement."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusecache import linux, mounts

from .conftest import HERE, SESSION, file_bytes, run_cli
from .conftest import mount_in
from .helpers import NOBODY, as_user, encode, entries, fill, waits_in_fuse

pytestmark = pytest.mark.fuse

MiB = 1 << 20
ROOT = HERE.parent


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def in_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Python code in another process (as a second local reader would)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---- open -----------------------------------------------------------------------------------

OPEN_FLAGS = [
    ("O_RDONLY", os.O_RDONLY, None),
    ("O_NONBLOCK", os.O_RDONLY | os.O_NONBLOCK, None),
    ("O_NOATIME", os.O_RDONLY | os.O_NOATIME, None),
    ("O_SYNC", os.O_RDONLY | os.O_SYNC, None),
    ("O_CLOEXEC", os.O_RDONLY | os.O_CLOEXEC, None),
    ("O_DIRECT", os.O_RDONLY | os.O_DIRECT, None),
    ("O_PATH", os.O_PATH, None),
    ("O_CREAT of an existing file", os.O_RDONLY | os.O_CREAT, None),
    ("O_CREAT|O_EXCL of an existing file", os.O_RDONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST),
    ("O_CREAT of a new name", os.O_RDONLY | os.O_CREAT, errno.EROFS),
    ("O_WRONLY", os.O_WRONLY, errno.EROFS),
    ("O_RDWR", os.O_RDWR, errno.EROFS),
    ("O_WRONLY|O_APPEND", os.O_WRONLY | os.O_APPEND, errno.EROFS),
    ("O_RDONLY|O_TRUNC", os.O_RDONLY | os.O_TRUNC, errno.EROFS),
    ("O_TMPFILE", os.O_TMPFILE | os.O_RDWR, errno.EROFS),
]


def test_open_flags(tmp_path, make_mount):
    """Each flag an open may carry, on one mount (none of them changes it)."""
    source = tmp_path / "src"
    data = fill(source, {"f.bin": 100_000}, seed=1)["f.bin"]
    m = make_mount(source, ["readahead=off"])
    wrong = []
    for name, flags, expected in OPEN_FLAGS:
        target = {"O_CREAT of a new name": "new.bin", "O_TMPFILE": ""}.get(name, "f.bin")
        try:
            fd = os.open(m.mountpoint / target, flags)
        except OSError as e:
            if e.errno != expected:
                wrong.append((name, e))
            continue
        try:
            if expected is not None:
                wrong.append((name, "opened"))
            elif not flags & os.O_PATH and os.pread(fd, 1000, 500) != data[500:1500]:
                wrong.append((name, "wrong bytes"))
        finally:
            os.close(fd)
        if sorted(os.listdir(m.mountpoint)) != ["f.bin"]:
            wrong.append((name, os.listdir(m.mountpoint)))
    assert wrong == []


def test_o_direct_reads_skip_the_page_cache_not_the_cache(counting_source, make_mount):
    """O_DIRECT is not special-cased by the daemon: the kernel sends every O_DIRECT read to
    it (even unaligned ones), and it answers from its cache like any other read."""
    data = fill(counting_source.real, {"d.bin": 8 * MiB}, seed=2)["d.bin"]
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M"])
    assert file_bytes(m.mountpoint / "d.bin") == data  # now in the page cache and the cache
    served = m.metrics()["bytes_served"]
    fd = os.open(m.mountpoint / "d.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        aligned = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [aligned], 2 * MiB) == MiB and aligned[:] == data[2 * MiB:3 * MiB]
        assert os.pread(fd, 1000, 12345) == data[12345:13345]  # no alignment needed
    finally:
        os.close(fd)
    assert m.metrics()["bytes_served"] == served + MiB + 1000  # the daemon answered both reads
    assert counting_source.total() == len(data)  # from its cache: the source was read once


# ---- read and mmap: one page cache per file ----------------------------------------------

def test_reads_at_and_past_the_end(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"e.bin": MiB + 7}, seed=16)["e.bin"]
    m = make_mount(source, ["readahead=off"])
    fd = os.open(m.mountpoint / "e.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, len(data) - 3) == data[-3:]  # short: the end of the file
        assert os.pread(fd, 100, len(data)) == b""
        assert os.pread(fd, 100, len(data) + 5 * MiB) == b""
    finally:
        os.close(fd)


def test_processes_share_one_page_cache_and_mmap_is_private_or_read_only(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"w.bin": 8 * MiB}, seed=3)["w.bin"]
    m = make_mount(source, ["readahead=off"])
    assert file_bytes(m.mountpoint / "w.bin") == data
    served = m.metrics()["bytes_served"]
    assert served == len(data)
    digest = hashlib.sha256(data).hexdigest()
    other = in_child(f"""
import hashlib, mmap
with open({str(m.mountpoint / "w.bin")!r}, "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest())
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        print(hashlib.sha256(mm).hexdigest())
""")
    assert other.stdout.split() == [digest, digest], other.stderr
    assert m.metrics()["bytes_served"] == served  # another process's reads and mmap: page cache hits
    with open(m.mountpoint / "w.bin", "rb") as f:
        with pytest.raises(PermissionError):  # a shared writable mapping needs a writable file
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_SHARED)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_PRIVATE) as mm:
            mm[:4] = b"MINE"  # copy-on-write: nobody else sees it
            assert file_bytes(m.mountpoint / "w.bin") == data
    assert file_bytes(source / "w.bin") == data


# ---- stat ------------------------------------------------------------------------------------

def test_stat_is_the_sources_with_the_mounts_own_inode_numbers(tmp_path, make_mount):
    source = tmp_path / "src"
    fill(source, {"f.bin": 3 * MiB + 5, "sub/g.txt": 10})
    os.link(source / "f.bin", source / "hardlink.bin")
    os.chmod(source / "sub" / "g.txt", 0o4755)
    m = make_mount(source, ["readahead=off"])
    for name in ("f.bin", "hardlink.bin", "sub", "sub/g.txt"):
        ours, theirs = os.lstat(m.mountpoint / name), os.lstat(source / name)
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                      "st_mtime_ns", "st_ctime_ns"):
            assert getattr(ours, field) == getattr(theirs, field), (name, field)
        assert ours.st_ino != theirs.st_ino and ours.st_dev != theirs.st_dev
        assert ours.st_blksize == MiB
    # hard links of the source are separate files of the mount
    assert os.lstat(m.mountpoint / "f.bin").st_nlink == 2
    assert os.lstat(m.mountpoint / "f.bin").st_ino != os.lstat(m.mountpoint / "hardlink.bin").st_ino
    # set-id bits are shown, never honoured: the mount is nosuid, nodev and read-only
    assert os.lstat(m.mountpoint / "sub" / "g.txt").st_mode & stat.S_ISUID
    flags = os.statvfs(m.mountpoint).f_flag
    assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV


def test_hard_links_are_fetched_once_per_name(counting_source, make_mount):
    data = fill(counting_source.real, {"a.bin": 2 * MiB}, seed=4)["a.bin"]
    os.link(counting_source.real / "a.bin", counting_source.real / "b.bin")
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off"])
    assert file_bytes(m.mountpoint / "a.bin") == data
    assert file_bytes(m.mountpoint / "b.bin") == data
    assert counting_source.counts() == {"a.bin": len(data), "b.bin": len(data)}


def test_fstat_of_a_file_whose_path_became_a_directory_is_not_eio(tmp_path, make_mount):
    """An O_PATH descriptor of f (no OPEN: no handle in the daemon); in the source a directory
    takes f's path. fstat sends GETATTR for f's inode, which the daemon answered with the
    directory's attributes: the kernel found the inode's type changed, marked it bad and
    failed the fstat with EIO (fs/fuse/dir.c, fuse_do_getattr). (Found by review.)"""
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"x" * 100)
    m = make_mount(source, ["readahead=off", "attr_timeout=0"])
    fd = os.open(m.mountpoint / "f", os.O_PATH)
    try:
        assert os.fstat(fd).st_size == 100
        (source / "f").unlink()
        (source / "f").mkdir()
        try:
            os.fstat(fd)
        except OSError as e:
            assert e.errno != errno.EIO, "fstat failed EIO: the daemon gave a directory's attributes to a file's inode"
    finally:
        os.close(fd)


@pytest.mark.parametrize("change", ["modified in place", "replaced", "deleted"])
def test_fstat_of_an_open_handle_reports_the_version_it_reads(tmp_path, make_mount, change):
    source = tmp_path / "src"
    old = fill(source, {"f.bin": 3 * MiB}, seed=5)["f.bin"]
    os.utime(source / "f.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    m = make_mount(source, ["readahead=off", "attr_timeout=0"])
    with open(m.mountpoint / "f.bin", "rb") as held:
        before = os.fstat(held.fileno())
        if change == "modified in place":
            with open(source / "f.bin", "ab") as f:
                f.write(b"more")
        elif change == "replaced":
            (source / "new").write_bytes(b"another version")
            os.rename(source / "new", source / "f.bin")
        else:
            (source / "f.bin").unlink()
        after = os.fstat(held.fileno())
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, len(old), before.st_mtime_ns)
        if change == "modified in place":  # the old version's bytes it had not read are gone: EIO
            assert os.stat(m.mountpoint / "f.bin").st_size == len(old) + 4
        else:  # the handle keeps reading its version
            assert held.read() == old


def test_opens_see_the_current_version_at_once_stat_may_lag(tmp_path, make_mount):
    """attr_timeout bounds how long stat may show an older version; opens and listings go to
    the source every time."""
    source = tmp_path / "src"
    old = fill(source, {"f.bin": 3 * MiB, "gone.txt": 5, "p.txt": 5}, seed=6)["f.bin"]
    m = make_mount(source, ["readahead=off", "attr_timeout=60"])
    assert file_bytes(m.mountpoint / "f.bin") == old
    assert os.stat(m.mountpoint / "gone.txt").st_size == 5
    assert file_bytes(m.mountpoint / "p.txt") == (source / "p.txt").read_bytes()
    new = random.Random(7).randbytes(MiB)
    (source / "tmp").write_bytes(new)
    os.rename(source / "tmp", source / "f.bin")
    (source / "gone.txt").unlink()
    (source / "created.txt").write_text("created")
    with open(source / "p.txt", "ab") as f:  # modified in place
        f.write(b"+more")
    # within attr_timeout stat still shows what the kernel cached...
    assert os.stat(m.mountpoint / "f.bin").st_size == len(old)
    assert os.stat(m.mountpoint / "gone.txt").st_size == 5
    assert os.stat(m.mountpoint / "p.txt").st_size == 5
    # ...but an open gets the version the source holds now, and stat follows it
    assert file_bytes(m.mountpoint / "f.bin") == new
    assert os.stat(m.mountpoint / "f.bin").st_size == len(new)
    assert file_bytes(m.mountpoint / "p.txt") == (source / "p.txt").read_bytes()
    with pytest.raises(FileNotFoundError):
        open(m.mountpoint / "gone.txt", "rb")
    assert (m.mountpoint / "created.txt").read_text() == "created"
    assert sorted(os.listdir(m.mountpoint)) == ["created.txt", "f.bin", "p.txt"]


def test_a_metadata_change_in_the_source_is_a_new_version(counting_source, make_mount):
    """chmod moves the ctime, which is part of a file's version: the file is fetched again."""
    data = fill(counting_source.real, {"c.bin": 2 * MiB}, seed=8)["c.bin"]
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "attr_timeout=0"])
    before = os.stat(m.mountpoint / "c.bin")
    assert file_bytes(m.mountpoint / "c.bin") == data
    os.chmod(counting_source.real / "c.bin", 0o600)
    after = os.stat(m.mountpoint / "c.bin")
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_ino != before.st_ino
    assert file_bytes(m.mountpoint / "c.bin") == data
    assert counting_source.counts() == {"c.bin": 2 * len(data)}


# ---- readdir, readlink, xattrs, special files -----------------------------------------------

def raw_names(directory: Path) -> list[bytes]:
    """Every name getdents64 returns, in order, '.' and '..' included."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        while batch := linux.getdents64(fd, 4096):
            names += [name for name, _offset, _type in batch]
    finally:
        os.close(fd)
    return names


def test_readdir_is_the_sources_order_without_dot_entries(tmp_path, make_mount):
    source = tmp_path / "src"
    big = source / "big"
    big.mkdir(parents=True)
    rng = random.Random(9)
    for i in range(3000):
        (big / f"{rng.randrange(10**9):09d}-{i}").touch()
    m = make_mount(source)
    listed = raw_names(m.mountpoint / "big")  # in many requests, each resumed at an offset
    assert listed == [n for n in raw_names(big) if n not in (b".", b"..")]
    assert b"." not in listed and b".." not in listed
    assert os.listdir(m.mountpoint / "big") == os.listdir(big)
    assert os.stat(m.mountpoint / "big" / "..").st_ino == os.stat(m.mountpoint).st_ino  # the names still work


def test_absolute_links_resolve_on_the_reading_machine(tmp_path, make_mount):
    """Links are returned verbatim: an absolute one into the source leads the reader to the
    source itself, past the cache."""
    source = tmp_path / "src"
    data = fill(source, {"f.bin": MiB}, seed=10)["f.bin"]
    os.symlink(source / "f.bin", source / "abs-link")
    m = make_mount(source, ["readahead=off"])
    assert os.readlink(m.mountpoint / "abs-link") == str(source / "f.bin")
    assert file_bytes(m.mountpoint / "abs-link") == data
    assert not list(m.cache_dir.rglob("*.idx")) and m.metrics()["bytes_served"] == 0


def test_xattrs_and_acls_of_the_source_are_not_shown(tmp_path, make_mount):
    source = tmp_path / "src"
    fill(source, {"f": 100})
    try:
        os.setxattr(source / "f", "user.origin", b"lustre")
        os.setxattr(source / "f", "system.posix_acl_access", encode(entries("u::rw-,u:65534:---,g::r--,m::r--,o::r--")))
    except OSError as e:
        pytest.skip(f"no user xattrs or ACLs on {source}: {e}")
    m = make_mount(source)
    assert os.listxattr(m.mountpoint / "f") == []
    for name in ("user.origin", "system.posix_acl_access", "security.capability"):
        with pytest.raises(OSError) as info:
            os.getxattr(m.mountpoint / "f", name)
        assert info.value.errno == errno.ENODATA, name
        with pytest.raises(OSError) as info:
            os.removexattr(m.mountpoint / "f", name)
        assert info.value.errno == errno.EROFS, name


def test_special_files_are_listed_but_not_the_sources(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(source / "fifo")
    os.mknod(source / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    m = make_mount(source)
    assert stat.S_ISFIFO(os.lstat(m.mountpoint / "fifo").st_mode)
    assert stat.S_ISCHR(os.lstat(m.mountpoint / "null").st_mode)
    with pytest.raises(PermissionError):  # nodev
        open(m.mountpoint / "null", "rb")
    # a FIFO of the mount is a pipe of this machine, never connected to the source's
    theirs = os.open(source / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    reader = os.open(m.mountpoint / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(m.mountpoint / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"local")
        assert os.read(reader, 10) == b"local"
        assert os.read(theirs, 10) == b""  # no writer ever opened the source's FIFO
    finally:
        for fd in (writer, reader, theirs):
            os.close(fd)


def test_remaining_write_calls_fail_with_erofs(tmp_path, make_mount):
    """The calls test_filesystem::test_writes_fail_with_erofs does not try."""
    source = tmp_path / "src"
    fill(source, {"f": 100})
    os.symlink("f", source / "link")
    m = make_mount(source)
    mp = m.mountpoint
    for call in (lambda: os.chown(mp / "f", 1, 1), lambda: os.lchown(mp / "link", 1, 1),
                 lambda: os.mkfifo(mp / "fifo"), lambda: os.mknod(mp / "node"),
                 lambda: os.removexattr(mp / "f", "user.x"), lambda: os.utime(mp / "f", ns=(0, 0))):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EROFS
    assert sorted(os.listdir(mp)) == ["f", "link"]


# ---- access: mode bits by the kernel, ACLs by the daemon -----------------------------------

def test_access_is_the_mode_bits_acls_only_take_away(world):  # noqa: F811 - the fixture
    base, _ = world
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    for path, mode in ((src / "denied", 0o644), (src / "granted", 0o640), (src / "dir" / "g", 0o644)):
        path.write_text("data")
        path.chmod(mode)
    try:
        # nobody is named and denied; nobody is named and granted, but "other" may not read
        os.setxattr(src / "denied", "system.posix_acl_access",
                    encode(entries(f"u::rw-,u:{NOBODY}:---,g::r--,m::r--,o::r--")))
        os.setxattr(src / "granted", "system.posix_acl_access",
                    encode(entries(f"u::rw-,u:{NOBODY}:r--,g::r--,m::r--,o::---")))
        os.setxattr(src / "dir", "system.posix_acl_access",
                    encode(entries(f"u::rwx,u:{NOBODY}:---,g::r-x,m::r-x,o::r-x")))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on {src}: {e}")
    assert as_user(f"print(open({str(src / 'granted')!r}).read())") == "data\n"  # the source grants it
    m = mount_in(world, src, ["attr_timeout=60"])
    assert (m.mountpoint / "dir" / "g").read_text() == "data"  # root looked it up: the entry is cached
    out = as_user(f"""
        import os
        mnt = {str(m.mountpoint)!r}
        for name in ("denied", "granted", "dir/g"):
            try:
                open(f"{{mnt}}/{{name}}").read()
                opened = "ok"
            except OSError as e:
                opened = e.errno
            print(name, os.access(f"{{mnt}}/{{name}}", os.R_OK), opened)
        print("stat", os.stat(f"{{mnt}}/dir/g").st_size)
    """)
    assert out.splitlines() == [
        f"denied True {errno.EACCES}",  # access(2) answers from the mode bits; open applies the ACL
        f"granted False {errno.EACCES}",  # a named user's grant is not honoured past the mode bits
        f"dir/g True {errno.EACCES}",
        "stat 4",  # attributes below a denied directory, while root's lookup is cached
    ]


# ---- the source fails -----------------------------------------------------------------------

def test_open_handles_keep_their_cached_bytes_while_the_source_is_gone(counting_source, make_mount):
    """attr_timeout=0: the kernel asks for the attributes at every fstat, and on the pyfuse3
    session (libfuse negotiates AUTO_INVAL_DATA) before every read too; those of an open file
    are its version's while the source cannot be reached."""
    data = fill(counting_source.real, {"a.bin": 32 * MiB, "b.bin": 1000}, seed=11)["a.bin"]
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M", "attr_timeout=0"])
    fd = os.open(m.mountpoint / "a.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * MiB, 0) == data[:4 * MiB]
        opened = os.fstat(fd)
        counting_source.stop()  # the network filesystem is gone (ENOTCONN for the daemon)
        drop_page_cache()
        assert os.pread(fd, 4 * MiB, 0) == data[:4 * MiB]  # from the cache
        gone = os.fstat(fd)
        assert (gone.st_size, gone.st_mtime_ns, gone.st_mode) == (opened.st_size, opened.st_mtime_ns, opened.st_mode)
        with pytest.raises(OSError) as info:
            os.pread(fd, MiB, 24 * MiB)  # never fetched
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    for path in (m.mountpoint / "a.bin", m.mountpoint / "b.bin"):
        with pytest.raises(OSError) as info:
            open(path, "rb")  # every open asks the source, cached or not
        assert info.value.errno == errno.ENOTCONN
    with pytest.raises(OSError):
        os.listdir(m.mountpoint)
    assert m.status()["pid"] == m.pid


CTIMELESS_SOURCE = """
import sys
sys.path.insert(0, sys.argv[1])
import countingfs
plain = countingfs.CountingFS._attr
def _attr(self, rel):
    attr = plain(self, rel)
    attr.st_ctime_ns = attr.st_mtime_ns  # as sshfs: SFTP has no ctime
    return attr
countingfs.CountingFS._attr = _attr
sys.argv = sys.argv[1:]
countingfs.main()
"""


def test_a_rewrite_that_changes_no_stat_field_is_not_seen(counting_source, make_mount):
    """The limit of the contract: a source that reports no ctime, a rewrite in place with the
    size kept and the mtime put back. Nothing tells the versions apart, so the cache serves
    the old bytes, after a remount too."""
    old = fill(counting_source.real, {"f.bin": 2 * MiB}, seed=12)["f.bin"]
    new = random.Random(13).randbytes(2 * MiB)
    counting_source.process = subprocess.Popen(
        [sys.executable, "-c", CTIMELESS_SOURCE, str(HERE), str(counting_source.real), str(counting_source.path),
         str(counting_source.state)])
    wait_until(lambda: (counting_source.state / "ready").exists())
    m = make_mount(counting_source.path, ["readahead=off", "attr_timeout=0"])
    assert file_bytes(m.mountpoint / "f.bin") == old
    st = os.stat(counting_source.real / "f.bin")
    with open(counting_source.real / "f.bin", "r+b") as f:
        f.write(new)
    os.utime(counting_source.real / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    drop_page_cache()
    assert file_bytes(m.mountpoint / "f.bin") == old
    m.unmount()
    m.mount()
    assert file_bytes(m.mountpoint / "f.bin") == old
    assert counting_source.total() == len(old)


# ---- the daemon dies or stops ---------------------------------------------------------------

def test_after_kill9_open_files_stay_broken_and_mappings_fault(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"k.bin": 64 * MiB}, seed=14)["k.bin"]
    m = make_mount(source, ["readahead=off"])
    # a mapping: pages it had stay readable, any other page is SIGBUS
    child = in_child(f"""
import mmap, os, signal, time
f = open({str(m.mountpoint / "k.bin")!r}, "rb")
mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
first = mm[:100]
for pid in {[p for p in (m.supervisor_pid, m.pid) if p]!r}:  # the supervisor first (if any): the mount dies
    os.kill(pid, signal.SIGKILL)
time.sleep(1)
print(mm[:100] == first, flush=True)
mm[48 << 20]
print("unreachable", flush=True)
""")
    assert child.returncode == -signal.SIGBUS and child.stdout.split() == ["True"], child
    m.pid = m.supervisor_pid = None
    with pytest.raises(OSError) as info:
        os.listdir(m.mountpoint)
    assert info.value.errno == errno.ENOTCONN
    m.mount()  # at once: test_remount_right_after_kill9_cleans_the_stale_mount
    held = open(m.mountpoint / "k.bin", "rb")
    assert held.read(4096) == data[:4096]
    m.kill9()
    m.mount()
    try:
        held.seek(32 * MiB)
        with pytest.raises(OSError) as info:
            held.read(4096)  # a descriptor of the dead mount stays dead after the remount
        assert info.value.errno == errno.ENOTCONN
    finally:
        try:
            held.close()
        except OSError:
            pass
    assert hashlib.sha256(file_bytes(m.mountpoint / "k.bin")).digest() == hashlib.sha256(data).digest()


def test_fusecache_umount_cleans_a_stale_mount(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"f": 1000})["f"]
    m = make_mount(source, ["attr_timeout=60"])
    os.stat(m.mountpoint)
    m.kill9()
    run_cli("umount", m.mountpoint)
    assert not mounts.find_mount(str(m.mountpoint))
    m.mount()
    assert (m.mountpoint / "f").read_bytes() == data


def test_remount_right_after_kill9_cleans_the_stale_mount(tmp_path, make_mount):
    """The kernel answers a stat of the mountpoint from attributes it cached (attr_timeout)
    even for a dead connection: the check asks with statfs, which reaches the daemon."""
    source = tmp_path / "src"
    fill(source, {"f": 1000})
    m = make_mount(source, ["attr_timeout=60"])
    os.stat(m.mountpoint)
    m.kill9()
    result = run_cli("mount", source, m.mountpoint, "--cache-dir", m.cache_dir, check=False)
    assert result.returncode == 0, result.stderr


def abort_connection(mountpoint: Path) -> None:
    """What an operator does to a hung FUSE mount: abort its connection through fusectl."""
    connections = Path("/sys/fs/fuse/connections")
    if not os.path.ismount(connections):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", connections], check=True)
    st_dev = os.stat(mountpoint).st_dev
    (connections / str(os.major(st_dev) << 20 | os.minor(st_dev)) / "abort").write_text("1")


def test_an_aborted_connection_ends_the_daemon_and_frees_the_mountpoint(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"a.bin": 8 * MiB}, seed=16)["a.bin"]
    m = make_mount(source, ["readahead=off"])
    held = open(m.mountpoint / "a.bin", "rb", buffering=0)
    assert held.read(4096) == data[:4096]
    abort_connection(m.mountpoint)
    with pytest.raises(OSError) as info:
        os.pread(held.fileno(), 4096, 7 * MiB)  # beyond the kernel's readahead of the first read
    assert info.value.errno == errno.ENOTCONN
    try:
        held.close()
    except OSError:
        pass
    for pid in (m.pid, m.supervisor_pid):  # the daemon saw its device closed, unmounted and exited
        assert pid is None or mounts.wait_for_exit(pid, 15), pid
    m.pid = m.supervisor_pid = None
    assert mounts.find_mount(str(m.mountpoint)) is None
    m.mount()
    assert hashlib.sha256(file_bytes(m.mountpoint / "a.bin")).digest() == hashlib.sha256(data).digest()


def test_readers_of_a_stopped_daemon_wait_and_resume(tmp_path, make_mount):
    source = tmp_path / "src"
    data = fill(source, {"s.bin": 16 * MiB}, seed=15)["s.bin"]
    m = make_mount(source, ["readahead=off"])
    os.kill(m.pid, signal.SIGSTOP)
    try:  # this process holds nothing open on the mount: a close() would wait for the daemon too
        reader = subprocess.Popen([sys.executable, "-c", "import hashlib, sys; "
                                   "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
                                   str(m.mountpoint / "s.bin")], stdout=subprocess.PIPE, text=True)
        wait_until(lambda: waits_in_fuse(reader.pid), 30)  # the reader waits for the daemon
        time.sleep(0.2)
        assert reader.poll() is None  # waiting for the daemon
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert reader.communicate(timeout=60)[0].strip() == hashlib.sha256(data).hexdigest()
    assert reader.returncode == 0


def test_umount_with_a_file_open_is_refused(tmp_path, make_mount):
    source = tmp_path / "src"
    fill(source, {"f": 1000})
    m = make_mount(source)
    with open(m.mountpoint / "f", "rb"):
        result = run_cli("umount", m.mountpoint, check=False)
        assert result.returncode == 1 and "busy" in result.stderr, result
        assert mounts.find_mount(str(m.mountpoint))
    assert (m.mountpoint / "f").read_bytes() == (source / "f").read_bytes()  # still serving
    m.unmount()
    assert not mounts.find_mount(str(m.mountpoint))
