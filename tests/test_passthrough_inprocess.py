"""Passthrough's I/O-mode bookkeeping (fusecache.passthrough.Passthrough) through the FUSE
adapter, over a running in-process engine: no mount, no root.

Only the kernel's side is faked: `FakeBacking` stands in for the /dev/fuse ioctls that
register and drop backing files, and records them. Which open gets which backing id, when a
backing id is dropped, when an open waits and when an inode must be replaced is the real code.

What it proves: with passthrough off every open is served by us; a file complete in the cache
gets a backing id registered on its cache file (read-only), shared by every passthrough open of
the inode and dropped at the last one's release; a file that completes while a cached open holds
its inode is served by us on that inode and moves the path to a new inode for later lookups,
whose opens get passthrough while the old handle keeps reading its bytes; an open of an
unchanged file through an outdated inode is never refused (ESTALE only for a changed file,
giving back its reference); an open of a file that
is incomplete and not being filled does not wait; one being streamed is waited for (up to the
configured wait); a registration the kernel refuses falls back to the FUSE path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import trio

from fusecache.fs import FuseOperations
from fusecache.inodes import ROOT_INODE
from fusecache.store import SEAL_MAGIC, CacheEntry

from .inprocess import CHUNK, ctx, harness, read_file, settled, wait_for  # noqa: F401 - fixture
from .inprocess import fuse_errno, operations, read_all

WAIT = 30.0  # the passthrough wait of these tests: far longer than any of them may take


class FakeBacking:
    """The kernel's backing-file registry (BackingFiles): hands out ids, records what was
    registered (the file and how it was opened) and what was dropped."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse  # errno every registration fails with
        self.opened: dict[int, tuple[int, int, int]] = {}  # backing id -> (st_dev, st_ino, access mode)
        self.closed: list[int] = []
        self.attempts = 0
        self._next = 1

    def open(self, fd: int) -> int:
        self.attempts += 1
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        st = os.fstat(fd)
        backing_id = self._next
        self._next += 1
        self.opened[backing_id] = (st.st_dev, st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        return backing_id

    def close(self, backing_id: int) -> None:
        assert backing_id in self.opened and backing_id not in self.closed, backing_id
        self.closed.append(backing_id)

    def live(self) -> set[int]:
        return set(self.opened) - set(self.closed)


async def passthrough_ops(harness, backing: FakeBacking | None, wait: float = WAIT, **config) -> FuseOperations:
    ops = await operations(harness, **config)
    if backing is not None:
        ops.passthrough.enable(backing, wait)
    return ops


def cache_file(harness, relpath: str) -> tuple[int, int, int]:
    """What a registration of relpath's cache file, read-only, records."""
    st = os.stat(harness.store.paths(relpath)[0])
    return st.st_dev, st.st_ino, os.O_RDONLY


def sealed(harness, relpath: str) -> bool:
    """Whether relpath's index ends with a seal (its own marker)."""
    return harness.store.paths(relpath)[1].read_bytes()[-48:].startswith(SEAL_MAGIC)


def users(engine, relpath: str) -> int:
    """Opens of relpath the engine counts (0 once every handle is released)."""
    return sum(info["users"] for info in engine.open_files() if info["path"] == relpath)


async def test_disabled_every_open_is_served_by_us(harness):
    data = harness.write("f", 3 * CHUNK + 1)
    ops = await passthrough_ops(harness, None)
    assert not ops.passthrough.enabled
    assert await read_file(ops.engine, "f") == data  # complete in the cache
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    first = await ops.open(f.ino, os.O_RDONLY, ctx())
    second = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert first.backing_id is None and second.backing_id is None
    assert await read_all(ops, first.fh) == data and await read_all(ops, second.fh) == data
    assert ops.passthrough_opens() == {} and ops.engine.metrics.passthrough_opens == 0
    third = await ops.open((await ops.lookup(ROOT_INODE, b"f", ctx())).ino, os.O_RDONLY, ctx())
    assert third.backing_id is None  # no new inode either: f keeps its number
    for info in (first, second, third):
        await ops.release(info.fh)
    assert users(ops.engine, "f") == 0


async def test_a_complete_file_shares_one_backing_id_until_its_last_passthrough_release(harness):
    data = harness.write("f", 3 * CHUNK + 1)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing)
    assert await read_file(ops.engine, "f") == data  # complete in the cache
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    first = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert first.backing_id is not None
    assert backing.opened == {first.backing_id: cache_file(harness, "f")}  # the cache file, read-only
    second = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert second.backing_id == first.backing_id and backing.attempts == 1  # the same one, reused
    assert (await ops.lookup(ROOT_INODE, b"f", ctx())).ino == f.ino  # no new inode
    assert ops.passthrough_opens() == {"f": 2} and ops.engine.metrics.passthrough_opens == 2
    await ops.release(first.fh)
    assert backing.closed == [] and backing.live() == {first.backing_id}
    assert ops.passthrough_opens() == {"f": 1}
    await ops.release(second.fh)
    assert backing.closed == [first.backing_id] and not backing.live()
    assert ops.passthrough_opens() == {} and users(ops.engine, "f") == 0
    third = await ops.open(f.ino, os.O_RDONLY, ctx())  # the inode's mode was reset: registered anew
    assert third.backing_id is not None and third.backing_id != first.backing_id
    assert backing.live() == {third.backing_id}
    await ops.release(third.fh)
    assert not backing.live()


async def test_a_file_completed_under_a_cached_open_gets_a_new_inode_for_passthrough(harness):
    data = harness.write("f", 3 * CHUNK + 1)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing)
    old = await ops.lookup(ROOT_INODE, b"f", ctx())
    cached = await ops.open(old.ino, os.O_RDONLY, ctx())  # not in the cache yet: served by us
    assert cached.backing_id is None
    assert await read_all(ops, cached.fh) == data  # ... which makes it complete
    assert ops.engine.cached_extent("f") == (len(data), len(data))
    # the kernel keeps the inode in cached mode while that open lasts: this open is served by
    # us too, and later lookups give a new inode
    second = await ops.open(old.ino, os.O_RDONLY, ctx())
    assert second.backing_id is None and backing.attempts == 0
    assert await read_all(ops, second.fh) == data
    new = await ops.lookup(ROOT_INODE, b"f", ctx())  # the kernel looks the path up again
    assert new.ino != old.ino and new.size == old.size
    reopened = await ops.open(new.ino, os.O_RDONLY, ctx())
    assert reopened.backing_id is not None and backing.opened == {reopened.backing_id: cache_file(harness, "f")}
    assert ops.passthrough_opens() == {"f": 1}
    assert (await ops.lookup(ROOT_INODE, b"f", ctx())).ino == new.ino  # the new inode stays the path's
    third = await ops.open(old.ino, os.O_RDONLY, ctx())  # a dentry the kernel has not revalidated yet
    assert third.backing_id is None and await read_all(ops, third.fh) == data
    assert (await ops.lookup(ROOT_INODE, b"f", ctx())).ino == new.ino  # no further epoch
    assert await read_all(ops, cached.fh) == data  # the old handle reads on, its bytes correct
    assert (await ops.getattr(old.ino, ctx())).size == len(data)
    for info in (cached, second, third):
        await ops.release(info.fh)
    assert backing.closed == []
    await ops.release(reopened.fh)
    assert backing.closed == [reopened.backing_id]
    assert ops.passthrough_opens() == {}


async def test_an_unchanged_file_never_fails_to_open_through_an_outdated_inode(harness):
    """Issue 23 item 3: under eviction a file completes again and again; an open through a
    dentry naming an older epoch (or one the kernel retries once after ESTALE) must be served,
    as the source did not change: the FUSE path or passthrough, as that inode's opens allow."""
    data = harness.write("f", 3 * CHUNK + 1)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing)
    old = await ops.lookup(ROOT_INODE, b"f", ctx())
    cached = await ops.open(old.ino, os.O_RDONLY, ctx())
    assert await read_all(ops, cached.fh) == data  # complete under a FUSE-path open
    second = await ops.open(old.ino, os.O_RDONLY, ctx())  # moves the epoch; was ESTALE
    assert second.backing_id is None
    for info in (cached, second):
        await ops.release(info.fh)
    assert await ops.engine.evict("f") is True  # evicted: it completes again below
    again = await ops.open(old.ino, os.O_RDONLY, ctx())  # an outdated epoch, same version: served
    assert again.backing_id is None and await read_all(ops, again.fh) == data
    retry = await ops.open(old.ino, os.O_RDONLY, ctx())  # complete again, old inode held in cached mode
    assert retry.backing_id is None and await read_all(ops, retry.fh) == data
    for info in (again, retry):
        await ops.release(info.fh)
    idle = await ops.open(old.ino, os.O_RDONLY, ctx())  # no open holds the old inode: passthrough
    assert idle.backing_id is not None
    await ops.release(idle.fh)
    assert users(ops.engine, "f") == 0 and not backing.live()


async def test_an_open_answered_estale_for_a_changed_file_keeps_no_reference(harness):
    """The open the adapter answers ESTALE (the source holds another version than the inode
    names) has opened the file in the engine first: that reference must be given back."""
    harness.write("f", 2 * CHUNK)
    ops = await passthrough_ops(harness, FakeBacking())
    old = await ops.lookup(ROOT_INODE, b"f", ctx())
    harness.rewrite("f", os.urandom(2 * CHUNK))
    assert await fuse_errno(ops.open(old.ino, os.O_RDONLY, ctx())) == errno.ESTALE
    assert users(ops.engine, "f") == 0
    assert await ops.engine.evict("f") is True  # nobody has it open


async def test_an_incomplete_file_not_being_filled_is_not_waited_for(harness):
    data = harness.write("f", 4 * CHUNK)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing, wait=WAIT)  # readahead off: nothing streams it
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    started = trio.current_time()
    info = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert trio.current_time() - started < 5
    assert info.backing_id is None and backing.attempts == 0
    assert harness.source.calls("f") == 0  # nothing fetched for the open's sake
    assert await read_all(ops, info.fh) == data
    await ops.release(info.fh)


async def test_an_open_of_a_file_being_streamed_waits_for_it_then_gets_passthrough(harness):
    data = harness.write("f", 8 * CHUNK)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing, wait=WAIT)
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    gate = harness.source.hold("f", offset=0)
    ops.engine.prefetch("f")
    await gate.wait_entered()
    replies = []

    async def open_it() -> None:
        replies.append(await ops.open(f.ino, os.O_RDONLY, ctx()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_it)
            await trio.sleep(0.3)
            assert replies == []  # waiting for the stream, not answered from the FUSE path
            gate.open()
    assert replies[0].backing_id is not None and backing.opened == {replies[0].backing_id: cache_file(harness, "f")}
    assert ops.engine.cached_extent("f") == (len(data), len(data))
    await ops.release(replies[0].fh)
    assert not backing.live()


async def test_a_short_wait_for_a_stream_falls_back_to_the_fuse_path(harness):
    data = harness.write("f", 8 * CHUNK)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing, wait=0.2)
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    gate = harness.source.hold("f", offset=0)
    ops.engine.prefetch("f")
    await gate.wait_entered()
    with trio.fail_after(5):
        info = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert info.backing_id is None and backing.attempts == 0
    gate.open()
    assert await read_all(ops, info.fh) == data
    await settled(ops.engine, "f")
    await ops.release(info.fh)


async def test_a_registration_the_kernel_refuses_falls_back_to_the_fuse_path(harness):
    data = harness.write("f", 3 * CHUNK + 1)
    backing = FakeBacking(refuse=errno.EPERM)
    ops = await passthrough_ops(harness, backing)
    assert await read_file(ops.engine, "f") == data  # complete in the cache
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    info = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert backing.attempts == 1  # it was asked, and refused
    assert info.backing_id is None and info.keep_cache
    assert await read_all(ops, info.fh) == data
    assert ops.passthrough_opens() == {} and ops.engine.metrics.passthrough_opens == 0
    await ops.release(info.fh)
    assert backing.closed == [] and users(ops.engine, "f") == 0


async def test_after_a_refused_registration_other_opens_stay_on_the_inode(harness):
    """The file did not complete under a cached open (it was complete before): no reason to
    move the path to a new inode, only a new inode per open, each with its own page cache."""
    data = harness.write("f", 3 * CHUNK + 1)
    backing = FakeBacking(refuse=errno.EPERM)
    ops = await passthrough_ops(harness, backing)
    assert await read_file(ops.engine, "f") == data
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    first = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert first.backing_id is None
    second = await ops.open(f.ino, os.O_RDONLY, ctx())  # while the first is held
    assert second.backing_id is None
    assert (await ops.lookup(ROOT_INODE, b"f", ctx())).ino == f.ino
    assert await read_all(ops, second.fh) == data
    for info in (first, second):
        await ops.release(info.fh)


async def test_a_passthrough_open_that_completes_a_file_does_not_wait_for_its_seal(harness, monkeypatch):
    """A file filled by reads is sealed (made durable: an fdatasync of all of it, seconds on a
    disk) at its first passthrough open. That ran inside the OPEN, which could then not be
    interrupted; it now runs beside it, and the file is sealed all the same. (Found by review.)"""
    data = harness.write("f", 4 * CHUNK)
    ops = await passthrough_ops(harness, FakeBacking())
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    first = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert await read_all(ops, first.fh) == data  # filled by reads
    await ops.release(first.fh)
    disk = threading.Event()
    sealing = CacheEntry.seal

    def slow_seal(entry: CacheEntry) -> bool:
        disk.wait(10)  # a slow disk's fdatasync
        return sealing(entry)

    monkeypatch.setattr(CacheEntry, "seal", slow_seal)
    with trio.fail_after(5):
        second = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert second.backing_id is not None and not sealed(harness, "f")
    disk.set()
    await wait_for(lambda: sealed(harness, "f"))
    await ops.release(second.fh)


async def test_an_open_that_waited_while_the_last_release_closed_the_id_gets_a_new_one(harness):
    """An open waiting for its file (the passthrough wait) while the inode's last passthrough
    release wrote the backing ids without the id and closed it: the open woke, took that id
    and was answered on it, named by no journal. After a crash the next daemon registers
    another id, which the kernel refuses while this open holds the first (EIO). (Found by
    review; the open's slow wait is modelled by holding its first call.)"""
    harness.write("f", 3 * CHUNK)
    backing = FakeBacking()
    ops = await passthrough_ops(harness, backing, wait=30)
    await read_file(ops.engine, "f")  # complete in the cache
    f = await ops.lookup(ROOT_INODE, b"f", ctx())

    written = []  # what each journal write of the backing ids would hold
    gate = trio.Event()
    block_persist = False

    async def persist() -> bool:
        snapshot = list(ops.export_backing())  # journal.flush_backing: taken, then written on a thread
        if block_persist:
            await gate.wait()
        written.append(snapshot)
        return True

    ops.persist_backing = persist

    # A's wait for its file is slow (it polls every 20 ms): modelled by holding its first call
    real_wait = ops.engine.wait_verified_whole
    a_may_go = trio.Event()
    calls = 0

    async def wait(handle, timeout):
        nonlocal calls
        calls += 1
        if calls == 1:
            await a_may_go.wait()
        return await real_wait(handle, timeout)

    ops.engine.wait_verified_whole = wait
    replies = {}

    async def open_a():
        replies["a"] = await ops.open(f.ino, os.O_RDONLY, ctx())

    async with trio.open_nursery() as n:
        n.start_soon(open_a)
        await trio.sleep(0.05)
        b = await ops.open(f.ino, os.O_RDONLY, ctx())
        assert b.backing_id is not None
        block_persist = True
        n.start_soon(ops.release, b.fh)  # B's last release: journal written first, id closed after
        await trio.sleep(0.05)
        a_may_go.set()  # A's wait ends while B's release writes the journal
        await trio.sleep(0.05)
        gate.set()
    a = replies["a"]
    # answered on a new id, which the last write of the ids names
    assert a.backing_id is not None and a.backing_id in backing.live()
    assert any(kept.backing_id == a.backing_id for kept in written[-1]), written
    await ops.release(a.fh)



async def test_an_open_interrupted_while_it_waits_for_its_file_leaves_no_entry(harness):
    """An open deciding between passthrough and cached waits for a file being streamed; an
    INTERRUPT there left its inode's entry behind, for the life of the mount. (Found by
    review.)"""
    harness.write("f", 8 * CHUNK)
    ops = await passthrough_ops(harness, FakeBacking(), wait=WAIT)
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    gate = harness.source.hold("f", offset=0)
    ops.engine.prefetch("f")
    await gate.wait_entered()
    with trio.move_on_after(0.3):
        await ops.open(f.ino, os.O_RDONLY, ctx())  # cancelled as an INTERRUPT does
    gate.open()
    await settled(ops.engine, "f")
    assert ops.passthrough._inodes == {}
    assert users(ops.engine, "f") == 0  # nor its handle
