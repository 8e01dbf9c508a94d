"""The FUSE adapter (fusecache.fs.FuseOperations) called directly, as a FUSE session would call it,
over a running engine: no mount, no root.

What it proves: lookup, getattr, open, read and release serve the source's bytes; each
version of a file gets its own inode number (a rewrite in place that keeps size and mtime
included) and the latest keeps its number; an open of an outdated inode is ESTALE (the kernel
then looks the path up again); an open handle's attributes stay those of the version it has
open; everything that writes is EROFS (the adapter has no operation that writes: both sessions
answer those requests EROFS themselves); readdir lists a directory from any offset, stops where
the reply is full and counts what it gave as lookups only for READDIRPLUS; a POSIX ACL of the
source that denies a user is enforced (EACCES) on open, lookup below a directory, opendir,
access and readlink.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import pytest
import trio

from fusecache import acl
from fusecache.fs import FuseOperations
from fusecache.inodes import ROOT_INODE
from fusecache.session import protocol
from fusecache.session.kernel import KernelSession, SessionConfig
from fusecache.session.mount import MountSpec

from .helpers import set_acl
from .inprocess import CHUNK, ctx, fuse_errno, harness, operations, read_all  # noqa: F401 - fixture

ROOT = ROOT_INODE
DENIED = 54321  # a uid the ACLs name, never the owner of the files (the user running the test)


async def test_lookup_getattr_open_read_release(harness):
    data = harness.write("dir/f", 3 * CHUNK + 5)
    (harness.src / "link").symlink_to("dir/f")
    ops = await operations(harness)
    d = await ops.lookup(ROOT, b"dir", ctx())
    assert stat.S_ISDIR(d.mode) and d.entry_timeout == 2.5 and d.attr_timeout == 2.5
    f = await ops.lookup(d.ino, b"f", ctx())
    assert stat.S_ISREG(f.mode) and f.size == len(data) and f.ino not in (ROOT, d.ino)
    assert (await ops.lookup(d.ino, b"f", ctx())).ino == f.ino  # unchanged: same number
    attr = await ops.getattr(f.ino, ctx())
    assert attr.ino == f.ino and attr.size == len(data)
    assert (await ops.getattr(ROOT, ctx())).ino == ROOT
    info = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert info.keep_cache
    assert await read_all(ops, info.fh) == data
    await ops.release(info.fh)
    await ops.release(info.fh)  # twice: ignored
    link = await ops.lookup(ROOT, b"link", ctx())
    assert stat.S_ISLNK(link.mode)
    assert await ops.readlink(link.ino, ctx()) == b"dir/f"
    assert await fuse_errno(ops.open(link.ino, os.O_RDONLY, ctx())) == errno.ELOOP  # never followed
    assert await ops.access(f.ino, os.R_OK, ctx()) is None
    fh = await ops.opendir(d.ino, ctx())
    await ops.releasedir(fh)
    await ops.releasedir(fh)
    vfs = await ops.statfs(ctx())
    assert vfs.f_bsize == os.statvfs(harness.src).f_bsize
    assert await fuse_errno(ops.getxattr(f.ino, b"user.x", ctx())) == errno.ENODATA
    assert await ops.listxattr(f.ino, ctx()) == []


async def test_lookup_errors(harness):
    harness.write("f", 10)
    ops = await operations(harness)
    assert await fuse_errno(ops.lookup(ROOT, b"missing", ctx())) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"..", ctx())) == errno.EINVAL  # never leaves the tree
    f = await ops.lookup(ROOT, b"f", ctx())
    assert await fuse_errno(ops.lookup(f.ino, b"x", ctx())) == errno.ENOTDIR
    assert await fuse_errno(ops.getattr(10_000, ctx())) == errno.ESTALE  # a number never handed out


async def test_a_directory_put_in_the_place_of_a_held_one_is_estale_not_served_by_path(harness):
    """The kernel checks a directory's mode bits against the attributes it holds for its
    inode. Another directory moved to its path (`mv new live`, or a user swapping in someone
    else's 0700 directory) was served by path under the held inode: its entries listed and
    looked up past mode bits the kernel never saw. Now ESTALE: the kernel looks the path up
    again and checks the new directory's. (Audit 3, found by review.)"""
    src = harness.src
    (src / "live").mkdir()
    (src / "live" / "old.bin").write_bytes(b"old")
    ops = await operations(harness)
    held = await ops.lookup(ROOT, b"live", ctx())
    (src / "live").rename(src / "live.before")
    (src / "live").mkdir(mode=0o700)
    (src / "live" / "secret.bin").write_bytes(b"secret")
    assert await fuse_errno(ops.lookup(held.ino, b"secret.bin", ctx())) == errno.ESTALE
    assert await fuse_errno(ops.opendir(held.ino, ctx())) == errno.ESTALE
    again = await ops.lookup(ROOT, b"live", ctx())  # what the kernel does next
    assert again.ino != held.ino and stat.S_IMODE(again.mode) == 0o700
    assert (await ops.lookup(again.ino, b"secret.bin", ctx())).size == 6


async def test_each_version_gets_its_own_inode_and_an_outdated_one_is_estale(harness):
    old = harness.write("f", 2 * CHUNK)
    ops = await operations(harness)
    first = await ops.lookup(ROOT, b"f", ctx())
    new = harness.rewrite("f", os.urandom(len(old)), keep_mtime=True)  # only the ctime tells
    second = await ops.lookup(ROOT, b"f", ctx())
    assert second.ino != first.ino and second.mtime_ns == first.mtime_ns
    assert (await ops.lookup(ROOT, b"f", ctx())).ino == second.ino  # the latest keeps it
    # the kernel's dentry still names the old version: ESTALE makes it look the path up again
    assert await fuse_errno(ops.open(first.ino, os.O_RDONLY, ctx())) == errno.ESTALE
    info = await ops.open(second.ino, os.O_RDONLY, ctx())
    assert await read_all(ops, info.fh) == new
    await ops.release(info.fh)
    ops.forget([(first.ino, 1)])  # the kernel forgot the old version: its number goes
    assert await fuse_errno(ops.getattr(first.ino, ctx())) == errno.ESTALE
    ops.forget([(second.ino, 2)])  # the kernel forgot the latest too: nothing is kept of it
    assert len(ops.inodes) == 0
    third = await ops.lookup(ROOT, b"f", ctx())
    assert third.ino == second.ino  # and a lookup gives it its number again


async def test_an_open_handle_keeps_the_attributes_and_bytes_of_its_version(harness):
    old = harness.write("f", 2 * CHUNK)
    ops = await operations(harness)
    first = await ops.lookup(ROOT, b"f", ctx())
    info = await ops.open(first.ino, os.O_RDONLY, ctx())
    assert await read_all(ops, info.fh) == old  # cached whole
    harness.rewrite("f", os.urandom(3 * CHUNK))  # in place, larger
    attr = await ops.getattr(first.ino, ctx())  # an fstat of the open file
    assert attr.ino == first.ino and attr.size == len(old) and attr.mtime_ns == first.mtime_ns
    assert await read_all(ops, info.fh) == old
    second = await ops.lookup(ROOT, b"f", ctx())
    assert second.ino != first.ino and second.size == 3 * CHUNK
    reopened = await ops.open(second.ino, os.O_RDONLY, ctx())
    assert not reopened.keep_cache  # the kernel's pages of the path may be the old version's
    await ops.release(reopened.fh)
    (harness.src / "f").unlink()
    assert (await ops.getattr(first.ino, ctx())).size == len(old)  # still open
    await ops.release(info.fh)
    assert await fuse_errno(ops.getattr(second.ino, ctx())) == errno.ENOENT


async def test_keep_cache_is_kept_per_path_only_while_the_kernel_holds_an_inode_of_it(harness):
    """keep_cache is off for the first open of a new version of a path; what was served per
    path is dropped once the kernel forgets every inode of it (it then holds no pages of it)."""
    harness.write("f", CHUNK)
    ops = await operations(harness)
    first = await ops.lookup(ROOT, b"f", ctx())
    info = await ops.open(first.ino, os.O_RDONLY, ctx())
    assert info.keep_cache
    await ops.release(info.fh)
    new = harness.rewrite("f", os.urandom(CHUNK))
    second = await ops.lookup(ROOT, b"f", ctx())
    info = await ops.open(second.ino, os.O_RDONLY, ctx())
    assert not info.keep_cache  # the kernel may hold the old version's pages of the path
    assert await read_all(ops, info.fh) == new
    await ops.release(info.fh)
    info = await ops.open(second.ino, os.O_RDONLY, ctx())
    assert info.keep_cache  # its own version's pages
    await ops.release(info.fh)
    assert len(ops.keep_cache) == 1
    ops.forget([(first.ino, 1)])
    assert len(ops.keep_cache) == 1  # an inode of f is still held
    ops.forget([(second.ino, 1)])
    assert len(ops.keep_cache) == 0


async def test_readdir_lists_from_any_offset_and_stops_where_the_reply_is_full(harness):
    names = [f"f{i:03d}" for i in range(300)]  # more than one batch of the source's getdents
    for name in names:
        harness.write(f"d/{name}", 1)
    (harness.src / "d" / "sub").mkdir()
    ops = await operations(harness)
    d = await ops.lookup(ROOT, b"d", ctx())
    fh = await ops.opendir(d.ino, ctx())
    listed: list[tuple[bytes, object]] = []
    offset, replies = 0, 0
    while True:  # replies of at most 7 entries, each call resuming at the last offset given
        reply: list[tuple[bytes, object, int]] = []

        def add(name: bytes, attr, next_offset: int) -> bool:
            if len(reply) == 7:
                return False
            reply.append((name, attr, next_offset))
            return True

        await ops.readdir(fh, offset, add, counts_lookups=False)
        if not reply:
            break
        replies += 1
        listed += [(name, attr) for name, attr, _ in reply]
        offset = reply[-1][2]
    await ops.releasedir(fh)
    assert sorted(name for name, _ in listed) == sorted(os.fsencode(n) for n in names + ["sub"])  # each once
    assert replies == -(-len(listed) // 7)
    for name, attr in listed:  # the inode numbers and attributes a lookup gives
        looked_up = await ops.lookup(d.ino, name, ctx())
        assert (attr.ino, attr.mode, attr.size) == (looked_up.ino, looked_up.mode, looked_up.size)
        assert stat.S_ISDIR(attr.mode) == (name == b"sub")


@pytest.mark.parametrize("how", ["readdirplus", "readdir", "refused"])
async def test_readdir_entries_count_as_lookups_only_for_readdirplus(harness, how):
    """An outdated version's number is kept while the kernel holds it: entries a READDIRPLUS
    reply carried count as lookups; READDIR entries, and an entry that did not fit, do not."""
    harness.write("d/f", 10)
    ops = await operations(harness)
    d = await ops.lookup(ROOT, b"d", ctx())
    fh = await ops.opendir(d.ino, ctx())
    given = []

    def add(name: bytes, attr, next_offset: int) -> bool:
        given.append(attr.ino)
        return how != "refused"

    await ops.readdir(fh, 0, add, counts_lookups=how != "readdir")
    await ops.releasedir(fh)
    assert len(given) == 1
    old = given[0]
    harness.rewrite("d/f", os.urandom(10))
    new = await ops.lookup(d.ino, b"f", ctx())
    assert new.ino != old
    assert ops.inodes.is_held(old) == (how == "readdirplus")  # the kernel still holds it
    assert await fuse_errno(ops.getattr(old, ctx())) == errno.ESTALE  # an older version's: looked up again
    if how == "readdirplus":
        ops.forget([(old, 1)])
        assert not ops.inodes.is_held(old)


WRITES = ["setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "create", "write",
          "setxattr", "removexattr"]


async def kernel_session_replies(ops: FuseOperations, requests: list[tuple[int, int, bytes]]) -> list[tuple[int, int]]:
    """Serve (opcode, nodeid, arguments) requests with a KernelSession over ops, the kernel's
    side of /dev/fuse being a SOCK_SEQPACKET socket (one read or write is one message, as on
    the device); (unique, error) of each reply, in request order."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session = KernelSession(ops, MountSpec(mountpoint="/nonexistent", fsname="test"),
                            SessionConfig(workers=2, max_background=4, passthrough=False))
    os.set_blocking(ours.fileno(), False)
    session.fd = ours.detach()
    requests = [*requests, (protocol.Op.DESTROY, 0, b"")]
    replies = []
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.serve)
                for unique, (opcode, nodeid, args) in enumerate(requests, start=1):
                    header = protocol.IN_HEADER.pack(protocol.IN_HEADER.size + len(args), opcode, unique, nodeid,
                                                     os.getuid(), os.getgid(), os.getpid(), 0, 0)
                    await trio.to_thread.run_sync(kernel.sendall, header + args)
                    reply = await trio.to_thread.run_sync(kernel.recv, 1 << 16)
                    length, error, got = protocol.OUT_HEADER.unpack_from(reply)
                    assert length == len(reply)
                    replies.append((got, error))
    finally:
        session.close()
        kernel.close()
    assert replies[-1] == (len(requests), 0)  # DESTROY answered, and serve() returned
    return replies[:-1]


async def test_everything_that_writes_is_erofs(harness):
    harness.write("f", 10)
    ops = await operations(harness)
    f = await ops.lookup(ROOT, b"f", ctx())
    # The adapter has no operation that writes: the session answers those requests itself.
    assert not [name for name in WRITES if hasattr(ops, name)]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await fuse_errno(ops.open(f.ino, flags, ctx())) == errno.EROFS
    assert await fuse_errno(ops.access(f.ino, os.W_OK, ctx())) == errno.EROFS
    # our own session: every request that changes the filesystem, answered EROFS
    writes = sorted(protocol.WRITE_OPS)
    replies = await kernel_session_replies(ops, [(op, f.ino, bytes(64) + b"x\0") for op in writes])
    assert replies == [(unique, -errno.EROFS) for unique in range(1, len(writes) + 1)]
    # pyfuse3's session
    pyfuse3 = pytest.importorskip("pyfuse3")
    from fusecache.session.pyfuse3_session import _Operations

    wrapped = _Operations(ops)
    for name in WRITES:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await getattr(wrapped, name)(f.ino, b"x", ctx())
        assert info.value.errno == errno.EROFS, name
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
    assert await fuse_errno(ops.open(denied.ino, os.O_RDONLY, denied_user)) == errno.EACCES
    assert await fuse_errno(ops.access(denied.ino, os.R_OK, denied_user)) == errno.EACCES
    for who in (someone, ctx()):  # a user the ACL does not name, and root
        info = await ops.open(denied.ino, os.O_RDONLY, who)
        assert await read_all(ops, info.fh) == data
        await ops.release(info.fh)

    private = await ops.lookup(ROOT, b"private", denied_user)
    assert await fuse_errno(ops.lookup(private.ino, b"inside", denied_user)) == errno.EACCES
    assert await fuse_errno(ops.opendir(private.ino, denied_user)) == errno.EACCES
    inside = await ops.lookup(private.ino, b"inside", someone)
    link = await ops.lookup(private.ino, b"link", someone)
    assert await fuse_errno(ops.open(inside.ino, os.O_RDONLY, denied_user)) == errno.EACCES  # search on the way
    assert await fuse_errno(ops.readlink(link.ino, denied_user)) == errno.EACCES
    assert await ops.readlink(link.ino, someone) == b"inside"
    await ops.releasedir(await ops.opendir(private.ino, someone))
    assert acl.read_access_acl(str(harness.src / "denied")) is not None


@pytest.mark.parametrize("reply_size, most", [(4096, 3.0), (1 << 20, 1.1)])
async def test_a_listing_stats_each_entry_of_the_source_about_once(harness, monkeypatch, reply_size, most):
    """Each READDIRPLUS reply read 8 KiB of entries from the source and stat'ed all of them;
    where the kernel asks 4 KiB at a time (about twenty entries of these names) the rest was
    read and stat'ed again for the next: 6.6 stats of the source for each entry listed, each a
    round trip on NFS or Lustre. The batches now start small and double. (Found by review.)"""
    (harness.src / "d").mkdir()
    for i in range(3000):
        (harness.src / "d" / f"model-{i:05d}-of-03000.safetensors").write_bytes(b"")
    ops = await operations(harness)
    d = await ops.lookup(ROOT, b"d", ctx())
    stats = 0
    real_stat = os.stat

    def counting(*args, **kwargs):
        nonlocal stats
        stats += "dir_fd" in kwargs  # the listing's lstat of each entry
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    fh = await ops.opendir(d.ino, ctx())
    offset, listed = 0, []
    while True:  # as answers.readdir fills one reply of reply_size bytes
        used, reply = 0, []

        def add(name: bytes, attr, next_offset: int) -> bool:
            nonlocal used
            if used + protocol.dirent_size(name, True) > reply_size:
                return False
            used += protocol.dirent_size(name, True)
            reply.append((name, next_offset))
            return True

        await ops.readdir(fh, offset, add, counts_lookups=False)
        if not reply:
            break
        listed += [name for name, _ in reply]
        offset = reply[-1][1]
    await ops.releasedir(fh)
    print(f"{reply_size}-byte replies: {stats / len(listed):.2f} stats of the source per entry listed")
    assert sorted(listed) == sorted(os.fsencode(n) for n in os.listdir(harness.src / "d"))
    assert stats <= most * len(listed), stats / len(listed)


@pytest.mark.parametrize("swap", ["symlink", "file"])
async def test_the_attributes_of_an_open_file_whose_directory_was_swapped_are_its_versions(harness, swap):
    """A handle is open on ckpt/f; in the source, ckpt is swapped for a link ("latest"-style)
    or a file. An fstat of the handle failed (ENOTDIR, ELOOP from the path), and, once the
    attributes expired, so did reads that asked for them first. The open file's version
    answers, as for a file removed. (Found by review.)"""
    data = harness.write("ckpt/f", 3 * CHUNK)
    harness.write("other/f", 5 * CHUNK)
    ops = await operations(harness)
    d = await ops.lookup(ROOT_INODE, b"ckpt", ctx())
    f = await ops.lookup(d.ino, b"f", ctx())
    info = await ops.open(f.ino, os.O_RDONLY, ctx())
    os.rename(harness.src / "ckpt", harness.src / "ckpt.old")
    if swap == "symlink":
        os.symlink("other", harness.src / "ckpt")
    else:
        (harness.src / "ckpt").write_bytes(b"x")
    assert (await ops.getattr(f.ino, ctx())).size == len(data)
    assert await read_all(ops, info.fh) == data
    await ops.release(info.fh)


async def test_getattr_never_answers_another_file_type_under_a_held_inode(harness):
    """f (a regular file) is looked up; in the source a directory takes its path. A GETATTR of
    the file's inode (an fstat of an O_PATH descriptor, a stat whose attributes expired before
    its dentry) was answered with the directory's attributes under the file's inode: the
    kernel (fuse_do_getattr: inode_wrong_type) then marked the inode bad and the stat failed
    EIO. ESTALE has a stat by path look the path up again. (Found by review.)"""
    harness.write("f", 10)
    ops = await operations(harness)
    f = await ops.lookup(ROOT, b"f", ctx())
    assert stat.S_ISREG(f.mode)
    (harness.src / "f").unlink()
    (harness.src / "f").mkdir()
    try:
        attr = await ops.getattr(f.ino, ctx())
    except Exception as e:  # noqa: BLE001 - an error is fine, as long as it is ESTALE/ENOENT
        from fusecache.session.types import reply_errno
        assert reply_errno(e, "test") in (errno.ESTALE, errno.ENOENT)
        return
    assert stat.S_IFMT(attr.mode) == stat.S_IFMT(f.mode), "a directory's attributes under a file's inode"


async def test_getattr_of_an_open_directory_whose_path_was_swapped_answers_its_own_attributes(harness):
    """A process holds live/ open (opendir: its cwd, an fd); in the source another directory
    takes its path (`mv new live`). An fstat of the open directory answered the new
    directory's attributes (its mode bits, owner, link count) under the held inode, which the
    kernel then kept for it, while its listing is still the old one's (the fd): ESTALE. (Found
    by review.)"""
    (harness.src / "live").mkdir(mode=0o755)
    ops = await operations(harness)
    held = await ops.lookup(ROOT, b"live", ctx())
    fh = await ops.opendir(held.ino, ctx())
    (harness.src / "live").rename(harness.src / "live.before")
    (harness.src / "live").mkdir(mode=0o700)
    try:
        attr = await ops.getattr(held.ino, ctx())
    except Exception as e:  # noqa: BLE001
        from fusecache.session.types import reply_errno
        assert reply_errno(e, "test") == errno.ESTALE
        return
    finally:
        await ops.releasedir(fh)
    assert stat.S_IMODE(attr.mode) == stat.S_IMODE(held.mode) == 0o755, oct(attr.mode)


async def test_getattr_of_the_same_version_under_an_older_epoch_is_not_estale(harness):
    """A file's epoch moves on when it completes under cached opens (passthrough opens get a
    new inode); its older inode still names the same bytes, as an open of it takes them. A
    GETATTR of it was ESTALE, which an fstat of an O_PATH descriptor cannot retry. (Found by
    review of the day's diff.)"""
    harness.write("f", 10)
    ops = await operations(harness)
    f = await ops.lookup(ROOT, b"f", ctx())
    ops.inodes.next_epoch("f")  # what open does for a new inode
    attr = await ops.getattr(f.ino, ctx())
    assert attr.ino == f.ino and attr.size == 10
