"""fusecache.source over real temp dirs, in process: no mount, no root.

What it proves: paths resolve beneath the source root only, with no symlink followed in any
component (with openat2, and with the one-openat-per-component fallback of older kernels);
names that could escape are refused; only regular files are opened (a FIFO neither hangs nor
opens); a directory is read in batches from any offset cookie; read_small refuses what is
larger than its limit; read_exact refuses bytes of a file that changed under it;
regular_files lists a tree without following links; acl_chain gives every level's ACL.
Everything the engine trusts about the source rests on these; a mount only shows them
indirectly.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time

import pytest

from fusecache import linux
from fusecache.source import Identity, Source, SourceChanged, check_name, is_under_any, is_valid_name, regular_files

from .helpers import deep_tree, encode, entries


@pytest.fixture(params=["openat2", "per-component"])
def tree(request, tmp_path, monkeypatch):
    """A source tree with a file, a nested file, a symlink to a dir and one to a file outside,
    and a FIFO; and a Source over it (resolving with openat2 or without)."""
    if request.param == "per-component":
        monkeypatch.setattr(linux, "has_openat2", lambda fd: False)  # as on kernels before 5.6
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    (root / "f").write_bytes(b"top")
    (root / "a" / "b" / "deep").write_bytes(b"deep")
    (root / "dirlink").symlink_to("a")
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "out").symlink_to(tmp_path / "secret")
    os.mkfifo(root / "pipe")
    source = Source(root)
    yield source
    source.close()


def read(source: Source, relpath: str) -> bytes:
    fd, opened = source.open(relpath)
    identity = source.identity(opened)
    try:
        buf = bytearray(identity.size)
        source.read_exact(fd, memoryview(buf), 0, relpath, identity)
        return bytes(buf)
    finally:
        os.close(fd)


def test_paths_resolve_beneath_the_root_without_following_symlinks(tree):
    assert read(tree, "f") == b"top"
    assert read(tree, "a/b/deep") == b"deep"
    assert stat.S_ISDIR(tree.lstat("").st_mode) and stat.S_ISDIR(tree.lstat("a/b").st_mode)
    assert stat.S_ISLNK(tree.lstat("dirlink").st_mode)  # reported as a link
    assert tree.readlink("out").endswith("secret")
    for path in ("dirlink/b/deep", "out", "dirlink"):
        with pytest.raises(OSError) as info:
            tree.open(path)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR), path
    with pytest.raises(OSError):
        tree.lstat("dirlink/b")
    for path in ("../secret", "a/../f", "a//f", "a/./b", "a/.."):
        for call in (tree.lstat, tree.open, tree.readlink):
            with pytest.raises(OSError) as info:
                call(path)
            assert info.value.errno == errno.EINVAL, (call, path)
    with pytest.raises(FileNotFoundError):
        tree.open("missing")


def test_only_regular_files_are_opened(tree):
    for path in ("pipe", "a"):
        with pytest.raises(OSError, match="not a regular file") as info:
            tree.open(path)  # checked before it is opened: a FIFO without a writer does not hang the thread
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="not a regular file"):
        tree.read_small("pipe", 100)


def test_a_fifo_is_never_opened_even_with_a_writer_waiting_on_it(tmp_path):
    """The type was checked on the opened file: a FIFO (or a device node: a tape rewinds at
    close, a tty becomes the daemon's controlling terminal) was opened first, letting a writer
    waiting on the FIFO through. It is checked on an O_PATH descriptor. (Found by review.)"""
    root = tmp_path / "src"
    root.mkdir()
    os.mkfifo(root / "pipe")
    source = Source(root)
    released = threading.Event()

    def writer() -> None:
        fd = os.open(root / "pipe", os.O_WRONLY)  # blocks until someone opens it for reading
        released.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)  # the writer waits in its open
        with pytest.raises(OSError, match="not a regular file"):
            source.open("pipe")
        assert not released.wait(0.5), "the daemon opened the FIFO: its writer got through"
    finally:
        if not released.is_set():
            os.close(os.open(root / "pipe", os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
        source.close()


def test_names(tree):
    assert tree.child("", "x") == "x" and tree.child("a/b", "x") == "a/b/x"
    for name in ("", ".", "..", "a/b", "a\0"):
        assert not is_valid_name(name)
        with pytest.raises(OSError):
            check_name(name)
    assert is_under_any("a/b", {"a"}) and is_under_any("a", {"z", "a"}) and is_under_any("x", {""})
    assert not is_under_any("ab", {"a"}) and not is_under_any("a", {"a/b"}) and not is_under_any("a", set())


def test_a_directory_is_read_in_batches_from_any_offset(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    names = [f"file-{i:04d}-" + "x" * 100 for i in range(800)]  # more than one getdents64 buffer
    for name in names:
        (root / name).touch()
    source = Source(root)
    fd = source.opendir("")
    try:
        listed, offset, batches = [], 0, 0
        while batch := source.readdir(fd, offset):
            batches += 1
            listed += batch
            offset = batch[-1][1]
        assert batches > 1
        assert sorted(name for name, _, _ in listed) == names
        assert all(stat.S_ISREG(st.st_mode) for _, _, st in listed)
        # resuming from the cookie of any entry gives exactly the entries after it
        k = 500
        resumed = []
        offset = listed[k][1]
        while batch := source.readdir(fd, offset):
            resumed += batch
            offset = batch[-1][1]
        assert [name for name, _, _ in resumed] == [name for name, _, _ in listed[k + 1:]]
        assert source.readdir(fd, 0)[0][0] == listed[0][0]  # and back to the start
    finally:
        os.close(fd)
    assert [name for name, _ in source.listdir("", 1000)] == names


def test_two_listings_of_one_open_directory_at_once_each_get_their_own_entries(tmp_path):
    """A directory descriptor has one position: a READDIR the kernel sent again (a reader
    process died) while the daemon still answers the first seeks and reads it alongside. The
    two interleaved, and a listing got the entries from the other's offset: some skipped,
    silently. Two threads list from two offsets a few thousand times. (Found by review.)"""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(400):
        (root / f"file-{i:04d}").touch()
    source = Source(root)
    fd = source.opendir("")
    try:
        first = source.readdir(fd, 0)
        middle = first[len(first) // 2][1]
        expected = {0: first[0][0], middle: source.readdir(fd, middle, 64)[0][0]}
        wrong: list[tuple[int, str]] = []

        def list_from(offset: int) -> None:
            for _ in range(10000):  # an entry or two each: the seek and the read are most of it
                if (name := source.readdir(fd, offset, 64)[0][0]) != expected[offset]:
                    wrong.append((offset, name))

        threads = [threading.Thread(target=list_from, args=(offset,)) for offset in expected]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
    finally:
        os.close(fd)
    source.close()


def test_read_small_refuses_what_is_larger_than_its_limit(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "index.json").write_bytes(b"x" * 1000)
    source = Source(root)
    assert source.read_small("index.json", 1000) == b"x" * 1000
    with pytest.raises(OSError) as info:
        source.read_small("index.json", 999)
    assert info.value.errno == errno.EFBIG

    class Growing(Source):  # a file that grows between the fstat and the read
        def open(self, relpath):
            fd, opened = super().open(relpath)
            with open(root / relpath, "ab") as f:
                f.write(b"y" * 10)
            return fd, opened

    with pytest.raises(OSError) as info:
        Growing(root).read_small("index.json", 1005)
    assert info.value.errno == errno.EFBIG
    source.close()


@pytest.mark.parametrize("change", ["shrunk", "rewritten"])
def test_read_exact_refuses_bytes_of_another_version(tmp_path, change):
    root = tmp_path / "src"
    root.mkdir()
    path = root / "f"
    path.write_bytes(b"a" * 4096)
    source = Source(root)
    fd, opened = source.open("f")
    identity = source.identity(opened)
    try:
        if change == "shrunk":
            os.truncate(path, 100)
        else:
            with open(path, "r+b") as f:
                f.write(b"b" * 10)
            os.utime(path, ns=(0, identity.mtime_ns + 1))
        with pytest.raises(SourceChanged) as info:
            source.read_exact(fd, memoryview(bytearray(4096)), 0, "f", identity)
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    source.close()


def test_identity(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    st = os.stat(root)
    assert Source(root).identity(st) == Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    unstable = Source(root, stable_inodes=False).identity(st)
    assert unstable.ino == 0
    moved = Identity(st.st_size, st.st_mtime_ns, 0, st.st_ctime_ns + 1)
    assert unstable.same_content(moved) and unstable != moved  # ctime: not content, but a version


def test_regular_files_walks_a_tree_without_following_links(tree):
    assert regular_files(tree, "") == [("f", 3), ("a/b/deep", 4)]  # top-down, by name in each directory
    assert regular_files(tree, "a") == [("a/b/deep", 4)]
    assert regular_files(tree, "f") == [("f", 3)]
    with pytest.raises(OSError) as info:
        regular_files(tree, "pipe")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        regular_files(tree, "dirlink")


def test_a_directory_swapped_for_a_fifo_or_a_link_while_walked_is_left_out(tmp_path):
    """The walk of a prefetch or a pin opens each directory it listed; one swapped meanwhile
    for a FIFO hung the walk (and the request, and a thread) for good, and one swapped for a
    link to elsewhere was opened outside the source. It is left out. (Found by review.)"""
    root = tmp_path / "src"
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
        (root / sub / "f").write_bytes(b"xyz")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret").write_bytes(b"outside")

    class SwappedAsOpened(Source):
        def opendir(self, relpath: str) -> int:
            if relpath in ("b", "c"):
                (root / relpath).rename(root / f"{relpath}.old")
                if relpath == "b":
                    os.mkfifo(root / relpath)
                else:
                    (root / relpath).symlink_to(tmp_path / "elsewhere")
            return super().opendir(relpath)

    walked: list = []
    walker = threading.Thread(target=lambda: walked.append(regular_files(SwappedAsOpened(root), "")), daemon=True)
    walker.start()
    walker.join(10)
    assert walked == [[("a/f", 3)]]


def test_statvfs(tree):
    assert tree.statvfs().f_bsize == os.statvfs(tree.root).f_bsize


def test_acl_chain_gives_every_level(tmp_path):
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").touch()
    try:
        os.setxattr(root / "a" / "f", "system.posix_acl_access",
                    encode(entries("u::rw-,u:65534:---,g::r--,m::r--,o::r--")))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            pytest.skip("no POSIX ACLs on tmp_path's filesystem")
        raise
    source = Source(root)
    assert source.has_acls
    chain = source.acl_chain("a/f")
    assert len(chain) == 3
    assert [st.st_ino for st, _ in chain] == [os.stat(p).st_ino for p in (root, root / "a", root / "a" / "f")]
    assert [acl is None for _, acl in chain] == [True, True, False]
    assert [e.id for e in chain[2][1].entries if e.id is not None] == [65534]
    assert len(source.acl_chain("")) == 1
    source.close()


def test_no_acls_on_a_filesystem_without_them():
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    source = Source("/proc/self")  # procfs has no POSIX ACLs
    assert not source.has_acls
    source.close()


def _move_ctime(path, action) -> None:
    """Run action on path until the file's ctime moved (timestamps may be coarse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        before = os.fstat(fd).st_ctime_ns
        for _ in range(200):
            action()
            if os.fstat(fd).st_ctime_ns != before:
                return
            time.sleep(0.002)
        raise AssertionError("the ctime never moved")
    finally:
        os.close(fd)


def _rewrite_keeping_size_and_mtime(path) -> None:
    before = os.stat(path)

    def rewrite() -> None:
        with open(path, "r+b") as f:
            f.write(b"b" * 10)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    _move_ctime(path, rewrite)
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def _opened(tmp_path, stable_inodes: bool):
    """A source root holding f (4 KiB of b"a"), and f opened through it: (root, path, source,
    fd, identity)."""
    root = tmp_path / "src"
    root.mkdir()
    path = root / "f"
    path.write_bytes(b"a" * 4096)
    source = Source(root, stable_inodes=stable_inodes)
    fd, opened = source.open("f")
    return root, path, source, fd, source.identity(opened)


@pytest.mark.parametrize("stable_inodes", [True, False])
@pytest.mark.parametrize("change", ["rewritten, mtime put back", "chmod"])
def test_read_exact_refuses_a_file_changed_in_place_that_only_moved_its_ctime(tmp_path, change, stable_inodes):
    """Only the ctime tells this rewrite from the version opened; a chmod cannot be told from it."""
    root, path, source, fd, identity = _opened(tmp_path, stable_inodes)
    try:
        if change == "chmod":
            _move_ctime(path, lambda: os.chmod(path, 0o600 if path.stat().st_mode & 0o044 else 0o644))
        else:
            _rewrite_keeping_size_and_mtime(path)
        with pytest.raises(SourceChanged):
            source.read_exact(fd, memoryview(bytearray(4096)), 0, "f", identity)
    finally:
        os.close(fd)
    source.close()


@pytest.mark.parametrize("stable_inodes", [True, False])
@pytest.mark.parametrize("change", ["unlinked", "renamed over", "renamed away"])
def test_read_exact_keeps_reading_a_file_unlinked_or_renamed_while_open(tmp_path, change, stable_inodes):
    """These move the open file's ctime but leave its bytes as they were."""
    root, path, source, fd, identity = _opened(tmp_path, stable_inodes)
    try:
        time.sleep(0.05)  # past the tick of coarse timestamps: the change moves the ctime
        if change == "unlinked":
            path.unlink()
        elif change == "renamed over":
            (root / "new").write_bytes(b"c" * 4096)
            os.replace(root / "new", path)
        else:
            os.rename(path, root / "g")
        assert os.fstat(fd).st_ctime_ns != identity.ctime_ns
        buf = bytearray(4096)
        source.read_exact(fd, memoryview(buf), 0, "f", identity)
        assert bytes(buf) == b"a" * 4096
    finally:
        os.close(fd)
    source.close()


@pytest.mark.parametrize("resolution", ["openat2", "per-component"])
def test_paths_longer_than_path_max_resolve(tmp_path, monkeypatch, resolution):
    """Depth 24 of 200-byte names, 4.8 KB, past PATH_MAX: the source serves it, so must we,
    still following no symlink in any component (audit 2, item 6)."""
    if resolution == "per-component":
        monkeypatch.setattr(linux, "has_openat2", lambda fd: False)
    root = tmp_path / "src"
    root.mkdir()
    deep = deep_tree(root, b"deep bytes")
    assert len(deep) > 4096
    source = Source(root)
    try:
        assert stat.S_ISDIR(source.lstat(deep).st_mode)
        assert source.lstat(f"{deep}/f").st_size == 10
        assert read(source, f"{deep}/f") == b"deep bytes"
        assert source.readlink(f"{deep}/link") == "f"
        assert [name for name, _st in source.listdir(deep, 1000)] == ["f", "link"]
        assert len(source.acl_chain(f"{deep}/f")) == 26
        assert regular_files(source, deep.split("/")[0]) == [(f"{deep}/f", 10)]
        with pytest.raises(OSError) as info:  # a symlink is followed nowhere, deep down too
            source.open(f"{deep}/link")
        assert info.value.errno == errno.ELOOP
        names = deep.split("/")
        fd = os.open(root, os.O_DIRECTORY)  # swap a directory past PATH_MAX for a symlink
        for name in names[:22]:
            parent, fd = fd, os.open(name, os.O_DIRECTORY, dir_fd=fd)
            os.close(parent)
        os.rename(names[22], "moved", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("moved", names[22], dir_fd=fd)
        os.close(fd)
        with pytest.raises(OSError) as info:
            source.open(f"{deep}/f")
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    finally:
        source.close()


def test_the_acl_chain_of_a_deep_path_resolves_each_directory_once(tmp_path, monkeypatch):
    """Each directory above a path was opened from the root: depth² components resolved for
    one lookup on a source with ACLs (a second per lookup 1,500 directories down, a hostile
    deep tree a cheap way to tie up the daemon's threads). Now each beneath the one above it:
    as many components as the path has. (Found by review.)"""
    root = tmp_path / "src"
    deep = "/".join(["d"] * 200)
    (root / deep).mkdir(parents=True)
    source = Source(root)
    resolved = 0
    real = Source._open_beneath

    def counting(self, dir_fd, parts, flags):
        nonlocal resolved
        resolved += len(parts)
        return real(self, dir_fd, parts, flags)

    monkeypatch.setattr(Source, "_open_beneath", counting)
    chain = source.acl_chain(deep)
    assert len(chain) == 201 and all(stat.S_ISDIR(st.st_mode) for st, _acl in chain)
    assert [st.st_ino for st, _acl in chain] == [os.stat(root / "/".join(["d"] * i)).st_ino for i in range(201)]
    assert resolved <= 201, resolved


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_acls_of_a_filesystem_mounted_in_the_tree_are_checked_below_a_root_without_any(tmp_path):
    """The ACL checks were turned off for the whole tree when its root's filesystem had no
    POSIX ACLs (NFSv4, ramfs, a FUSE source), also beneath a mount in it that has them: a
    0644 file with `user:nobody:---` was read by nobody through the mount. A mount there with
    ACLs at the start turns them on, as does one seen later at a lookup or listing; a mount
    without them (another ramfs) does not: each check walks every directory above a path.
    (Found by review.)"""
    root = tmp_path / "src"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(root)], check=True)  # no xattrs at all
    try:
        (root / "early").mkdir()
        (root / "late").mkdir()
        for fstype, has_acls in ((None, False), ("ramfs", False), ("tmpfs", True)):
            if fstype is not None:
                subprocess.run(["mount", "-t", fstype, fstype, str(root / "early")], check=True)
            source = Source(root)
            assert source.has_acls == has_acls, fstype  # from the mount table
            source.close()
            if fstype is not None:
                subprocess.run(["umount", str(root / "early")], check=True)
        for seen_by, fstype in (("lstat", "ramfs"), ("lstat", "tmpfs"), ("readdir", "tmpfs")):
            source = Source(root)
            subprocess.run(["mount", "-t", fstype, fstype, str(root / "late")], check=True)
            try:
                assert not source.has_acls
                if seen_by == "lstat":
                    source.lstat("late")
                else:
                    fd = source.opendir("")
                    source.readdir(fd, 0)
                    os.close(fd)
                assert source.has_acls == (fstype == "tmpfs"), (seen_by, fstype)
            finally:
                subprocess.run(["umount", str(root / "late")], check=True)
                source.close()
    finally:
        subprocess.run(["umount", "-l", str(root)])
