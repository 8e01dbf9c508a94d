"""The FUSE adapter (fusecache.fs.FuseOperations) called directly, as pyfuse3 would call it,
over a running engine: no mount, no root.

What it proves: lookup, getattr, open, read and release serve the source's bytes; each
version of a file gets its own inode number (a rewrite in place that keeps size and mtime
included) and the latest keeps its number; an open of an outdated inode is ESTALE (the kernel
then looks the path up again); an open handle's attributes stay those of the version it has
open; everything that writes is EROFS; a POSIX ACL of the source that denies a user is
enforced (EACCES) on open, lookup below a directory, opendir, access and readlink.
readdir is left out: it needs a libfuse token, only a real mount hands one out.
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest

from fusecache import acl
from fusecache.fs import FuseOperations

from .inprocess import CHUNK, ctx, harness  # noqa: F401 - fixture
from .test_acl import acl_dir, set_acl  # noqa: F401 - fixture

ROOT = pyfuse3.ROOT_INODE
DENIED = 54321  # a uid the ACLs name, never the owner of the files (the user running the test)


async def operations(harness, **config) -> FuseOperations:
    return FuseOperations(await harness.start(**config), attr_timeout=2.5)


async def fuse_errno(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


async def read_all(ops: FuseOperations, fh: int) -> bytes:
    out = bytearray()
    while reply := await ops.read(fh, len(out), CHUNK):
        out += reply
    return bytes(out)


async def test_lookup_getattr_open_read_release(harness):
    data = harness.write("dir/f", 3 * CHUNK + 5)
    (harness.src / "link").symlink_to("dir/f")
    ops = await operations(harness)
    d = await ops.lookup(ROOT, b"dir", ctx())
    assert stat.S_ISDIR(d.st_mode) and d.entry_timeout == 2.5 and d.attr_timeout == 2.5
    f = await ops.lookup(d.st_ino, b"f", ctx())
    assert stat.S_ISREG(f.st_mode) and f.st_size == len(data) and f.st_ino not in (ROOT, d.st_ino)
    assert (await ops.lookup(d.st_ino, b"f", ctx())).st_ino == f.st_ino  # unchanged: same number
    attr = await ops.getattr(f.st_ino, ctx())
    assert attr.st_ino == f.st_ino and attr.st_size == len(data)
    assert (await ops.getattr(ROOT, ctx())).st_ino == ROOT
    info = await ops.open(f.st_ino, os.O_RDONLY, ctx())
    assert info.keep_cache
    assert await read_all(ops, info.fh) == data
    await ops.release(info.fh)
    await ops.release(info.fh)  # twice: ignored
    link = await ops.lookup(ROOT, b"link", ctx())
    assert stat.S_ISLNK(link.st_mode)
    assert await ops.readlink(link.st_ino, ctx()) == b"dir/f"
    assert await fuse_errno(ops.open(link.st_ino, os.O_RDONLY, ctx())) == errno.ELOOP  # never followed
    assert await ops.access(f.st_ino, os.R_OK, ctx()) is True
    fh = await ops.opendir(d.st_ino, ctx())
    await ops.releasedir(fh)
    await ops.releasedir(fh)
    vfs = await ops.statfs(ctx())
    assert vfs.f_bsize == os.statvfs(harness.src).f_bsize
    assert await fuse_errno(ops.getxattr(f.st_ino, b"user.x", ctx())) == pyfuse3.ENOATTR
    assert await ops.listxattr(f.st_ino, ctx()) == []


async def test_lookup_errors(harness):
    harness.write("f", 10)
    ops = await operations(harness)
    assert await fuse_errno(ops.lookup(ROOT, b"missing", ctx())) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"..", ctx())) == errno.EINVAL  # never leaves the tree
    f = await ops.lookup(ROOT, b"f", ctx())
    assert await fuse_errno(ops.lookup(f.st_ino, b"x", ctx())) == errno.ENOTDIR
    assert await fuse_errno(ops.getattr(10_000, ctx())) == errno.ESTALE  # a number never handed out


async def test_each_version_gets_its_own_inode_and_an_outdated_one_is_estale(harness):
    old = harness.write("f", 2 * CHUNK)
    ops = await operations(harness)
    first = await ops.lookup(ROOT, b"f", ctx())
    new = harness.rewrite("f", os.urandom(len(old)), keep_mtime=True)  # only the ctime tells
    second = await ops.lookup(ROOT, b"f", ctx())
    assert second.st_ino != first.st_ino and second.st_mtime_ns == first.st_mtime_ns
    assert (await ops.lookup(ROOT, b"f", ctx())).st_ino == second.st_ino  # the latest keeps it
    # the kernel's dentry still names the old version: ESTALE makes it look the path up again
    assert await fuse_errno(ops.open(first.st_ino, os.O_RDONLY, ctx())) == errno.ESTALE
    info = await ops.open(second.st_ino, os.O_RDONLY, ctx())
    assert await read_all(ops, info.fh) == new
    await ops.release(info.fh)
    await ops.forget([(first.st_ino, 1)])  # the kernel forgot the old version: its number goes
    assert await fuse_errno(ops.getattr(first.st_ino, ctx())) == errno.ESTALE
    await ops.forget([(second.st_ino, 2)])  # the latest version keeps its number anyway
    assert (await ops.getattr(second.st_ino, ctx())).st_ino == second.st_ino
    third = await ops.lookup(ROOT, b"f", ctx())
    assert third.st_ino == second.st_ino


async def test_an_open_handle_keeps_the_attributes_and_bytes_of_its_version(harness):
    old = harness.write("f", 2 * CHUNK)
    ops = await operations(harness)
    first = await ops.lookup(ROOT, b"f", ctx())
    info = await ops.open(first.st_ino, os.O_RDONLY, ctx())
    assert await read_all(ops, info.fh) == old  # cached whole
    harness.rewrite("f", os.urandom(3 * CHUNK))  # in place, larger
    attr = await ops.getattr(first.st_ino, ctx())  # an fstat of the open file
    assert attr.st_ino == first.st_ino and attr.st_size == len(old) and attr.st_mtime_ns == first.st_mtime_ns
    assert await read_all(ops, info.fh) == old
    second = await ops.lookup(ROOT, b"f", ctx())
    assert second.st_ino != first.st_ino and second.st_size == 3 * CHUNK
    reopened = await ops.open(second.st_ino, os.O_RDONLY, ctx())
    assert not reopened.keep_cache  # the kernel's pages of the path may be the old version's
    await ops.release(reopened.fh)
    (harness.src / "f").unlink()
    assert (await ops.getattr(first.st_ino, ctx())).st_size == len(old)  # still open
    await ops.release(info.fh)
    assert await fuse_errno(ops.getattr(second.st_ino, ctx())) == errno.ENOENT


WRITES = ["setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "create", "write",
          "setxattr", "removexattr"]


async def test_everything_that_writes_is_erofs(harness):
    harness.write("f", 10)
    ops = await operations(harness)
    f = await ops.lookup(ROOT, b"f", ctx())
    for name in WRITES:
        assert await fuse_errno(getattr(ops, name)(f.st_ino, b"x", ctx())) == errno.EROFS, name
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await fuse_errno(ops.open(f.st_ino, flags, ctx())) == errno.EROFS
    assert await fuse_errno(ops.access(f.st_ino, os.W_OK, ctx())) == errno.EROFS
    assert (harness.src / "f").stat().st_size == 10


async def test_acls_of_the_source_are_enforced(harness, acl_dir):
    harness.src = acl_dir / "acl-src"  # tmp_path, or /dev/shm where tmp_path has no ACLs
    harness.src.mkdir()
    harness.src.chmod(0o755)
    data = harness.write("denied", 100)
    harness.write("private/inside", 10)
    (harness.src / "private" / "link").symlink_to("inside")
    for path in (harness.src / "denied", harness.src / "private" / "inside"):
        path.chmod(0o644)
    (harness.src / "private").chmod(0o755)
    set_acl(harness.src / "denied", f"u::rw-,u:{DENIED}:---,g::r--,m::r--,o::r--")
    set_acl(harness.src / "private", f"u::rwx,u:{DENIED}:---,g::r-x,m::r-x,o::r-x")
    ops = await operations(harness)
    denied_user, someone = ctx(DENIED, DENIED), ctx(12345, 12345)

    denied = await ops.lookup(ROOT, b"denied", denied_user)  # the root may be searched
    assert await fuse_errno(ops.open(denied.st_ino, os.O_RDONLY, denied_user)) == errno.EACCES
    assert await fuse_errno(ops.access(denied.st_ino, os.R_OK, denied_user)) == errno.EACCES
    for who in (someone, ctx()):  # a user the ACL does not name, and root
        info = await ops.open(denied.st_ino, os.O_RDONLY, who)
        assert await read_all(ops, info.fh) == data
        await ops.release(info.fh)

    private = await ops.lookup(ROOT, b"private", denied_user)
    assert await fuse_errno(ops.lookup(private.st_ino, b"inside", denied_user)) == errno.EACCES
    assert await fuse_errno(ops.opendir(private.st_ino, denied_user)) == errno.EACCES
    inside = await ops.lookup(private.st_ino, b"inside", someone)
    link = await ops.lookup(private.st_ino, b"link", someone)
    assert await fuse_errno(ops.open(inside.st_ino, os.O_RDONLY, denied_user)) == errno.EACCES  # search on the way
    assert await fuse_errno(ops.readlink(link.st_ino, denied_user)) == errno.EACCES
    assert await ops.readlink(link.st_ino, someone) == b"inside"
    await ops.releasedir(await ops.opendir(private.st_ino, someone))
    assert acl.read_access_acl(str(harness.src / "denied")) is not None
