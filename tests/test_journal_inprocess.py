"""The journal's writer (journal.py) in process: written only when the adapter changed,
never before there is a state (INIT), and read back refusing what it cannot take; what a
recovered daemon makes of a journal that lags (backing ids it missed, handles released after
its last write) and of a handle number given out twice."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest
import trio

from fusecache import journal
from fusecache.fs import FuseOperations
from fusecache.inodes import ROOT_INODE
from fusecache.livestate import (FORMAT, AdapterState, Backing, BackingIds, LiveState, Negotiated, OpenFile,
                                 StateError, decode, encode)

from .inprocess import CHUNK, buffer, ctx, fuse_errno, harness, operations, read_file  # noqa: F401 (fixture)


def _state(next_fh: int = 5, backing: list[Backing] | None = None) -> LiveState:
    files = [OpenFile(3, 7, True)]
    adapter = AdapterState([], [], files, [], backing if backing is not None else [Backing(7, 1)], next_fh)
    return LiveState(FORMAT, 1, Negotiated(40, 0), adapter)


def test_only_a_change_makes_a_write(tmp_path):
    taken = []

    def snapshot():
        taken.append(1)
        return _state()

    kept = journal.Journal(tmp_path / journal.NAME, snapshot)
    first = kept.take()
    assert first is not None  # a new process writes once at least
    assert kept.take() is None and len(taken) == 1  # unchanged: not even a snapshot
    kept.changed()
    kept.changed()
    assert kept.take() is not None and kept.take() is None and len(taken) == 2


def test_nothing_is_written_before_there_is_a_state(tmp_path):
    state: list[LiveState] = []
    kept = journal.Journal(tmp_path / journal.NAME, lambda: state[0] if state else None)
    assert kept.take() is None
    state.append(_state())
    assert kept.take() is not None  # still owed: the first write was not lost


def test_the_writer_writes_what_changed_and_it_reads_back(tmp_path):
    path = tmp_path / journal.NAME
    kept = journal.Journal(path, _state)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kept.run)
            while kept.writes == 0:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert kept.writes == 1
    assert journal.read(path) == _state()
    kept.remove()
    assert not path.exists()


def test_a_costly_snapshot_spaces_the_writes_so_the_loop_keeps_answering(tmp_path):
    """A snapshot costs the event loop in proportion to what the kernel holds (20,000 inodes
    after a large listing: a fifth of a second); written every INTERVAL whatever it cost, it
    took most of the loop, and each opendir of such a directory waited half a second."""
    cost = 0.2  # seconds each snapshot holds the loop
    kept = journal.Journal(tmp_path / journal.NAME, lambda: time.sleep(cost) or _state())

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kept.run)
            with trio.move_on_after(2.5):
                while True:  # the adapter changes something all the time
                    kept.changed()
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # every INTERVAL: at 0.2, 0.9, 1.6 and 2.3 s; spaced by ten times the cost, at 0.2 and 2.4
    assert 1 <= kept.writes <= 2, kept.writes
    assert kept.pause >= journal.LOOP_SHARE * cost


def test_a_journal_that_cannot_be_written_keeps_to_its_share_of_the_loop(tmp_path, monkeypatch):
    """On a full disk every write fails; until one had succeeded, they were tried again at the
    first state's polling pace (every 10 ms), each after a snapshot on the loop: a daemon
    whose first write failed spent most of its loop on snapshots. (Found by review.)"""
    cost = 0.1
    taken = []

    def snapshot() -> LiveState:
        taken.append(1)
        time.sleep(cost)
        return _state()

    def full(target, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.private, "write_file", full)
    kept = journal.Journal(tmp_path / journal.NAME, snapshot)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kept.run)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert kept.writes == 0
    assert len(taken) <= 2, len(taken)  # one try, and one a pause (ten times its cost) later


@pytest.mark.parametrize("data", [b"", b"{", b'{"format": 999}', b'{"format": 1}'])
def test_a_damaged_or_foreign_journal_is_refused_in_one_line(tmp_path, data):
    path = tmp_path / journal.NAME
    path.write_bytes(data)
    with pytest.raises(StateError) as refused:
        journal.read(path)
    assert "\n" not in str(refused.value)


def test_a_missing_journal_is_refused(tmp_path):
    with pytest.raises(StateError, match="no journal"):
        journal.read(tmp_path / journal.NAME)


def test_recovery_moves_handle_numbers_past_any_given_out_since():
    state = _state(next_fh=5, backing=[Backing(7, 1), Backing(9, 2)])  # inode 9: an id kept with no open known
    recovered = journal.for_recovery(state)
    assert recovered.adapter.next_fh == 5 + journal.FH_GAP
    assert recovered.adapter.backing == [Backing(7, 1), Backing(9, 2)]
    assert recovered.adapter.files == state.adapter.files


async def test_a_handle_opened_after_the_last_write_reads_its_inodes_version_after_a_crash(harness):
    """The journal missed an open (the crash came first): the kernel still reads that fh, on
    an inode the journal knows, and gets that inode's bytes; with no inode, EIO."""
    data = os.urandom(3 * CHUNK + 5)
    (harness.src / "f").write_bytes(data)
    ops = await operations(harness)
    attr = await ops.lookup(ROOT_INODE, b"f", ctx())
    written = LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())  # the last journal write
    fh = (await ops.open(attr.ino, os.O_RDONLY, ctx())).fh
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)
    await recovered.import_state(journal.for_recovery(written).adapter)
    assert await fuse_errno(recovered.read(fh, 0, CHUNK, buffer(CHUNK))) == errno.EIO  # inode not said
    out = bytearray()
    while reply := await recovered.read(fh, len(out), CHUNK, buffer(CHUNK), inode=attr.ino):
        out += reply
    assert bytes(out) == data
    await recovered.release(fh)
    await ops.release(fh)


class _Registry:
    """The kernel's backing-file registry: ids handed out, and those still registered."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.registered = 0

    def open(self, fd: int) -> int:
        self.registered += 1
        self.live.add(self.registered)
        return self.registered

    def close(self, backing_id: int) -> None:
        self.live.remove(backing_id)


async def _complete_with_passthrough(harness) -> tuple[FuseOperations, _Registry, object]:
    """An adapter with passthrough on over a registry of backing ids, and the attributes of a
    file f complete in the cache (its opens go passthrough)."""
    data = os.urandom(3 * CHUNK + 5)
    (harness.src / "f").write_bytes(data)
    registry = _Registry()
    ops = await operations(harness)
    ops.passthrough.enable(registry, 30.0)
    assert await read_file(ops.engine, "f") == data
    return ops, registry, await ops.lookup(ROOT_INODE, b"f", ctx())


async def test_a_backing_id_from_the_journal_outlives_our_count_of_its_opens(harness):
    """The journal missed a passthrough open (made after its last write) that the kernel still
    holds on the inode's backing id. Once the recovered daemon has seen every open it knows
    of released, it must neither close that id nor give the next open another one: the
    kernel refuses an open with another id while it holds one (EIO)."""
    ops, registry, attr = await _complete_with_passthrough(harness)
    journaled = await ops.open(attr.ino, os.O_RDONLY, ctx())
    assert journaled.backing_id is not None
    written = LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())  # the last journal write
    missed = await ops.open(attr.ino, os.O_RDONLY, ctx())  # the kernel holds it; the journal does not
    assert missed.backing_id == journaled.backing_id
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)
    await recovered.import_state(journal.for_recovery(written).adapter, after_crash=True)
    recovered.passthrough.enable(registry, 30.0)
    await recovered.release(journaled.fh)  # every open the recovered daemon knows of is released
    assert registry.live == {journaled.backing_id}  # the kernel's open still reads through it
    again = await recovered.open(attr.ino, os.O_RDONLY, ctx())
    assert again.backing_id == journaled.backing_id and registry.registered == 1
    await recovered.release(again.fh)
    await recovered.release(missed.fh)
    assert registry.live == {journaled.backing_id}  # kept until unmount: its opens cannot be counted


@pytest.mark.parametrize("after_crash", [True, False], ids=["journal", "restart"])
async def test_a_kept_backing_id_is_handed_on_by_the_daemon_that_kept_it(harness, after_crash):
    """The daemon that recovered with a kept id (the kernel may hold opens on it that the
    journal missed) and has seen every open it knew of released, crashes or restarts in
    turn: its journal and its hand-over still name the id, so the next daemon keeps it too.
    Left out, the next daemon registered another id for the inode's next open, which the
    kernel refuses while the missed open holds the first (EIO)."""
    ops, registry, attr = await _complete_with_passthrough(harness)
    journaled = await ops.open(attr.ino, os.O_RDONLY, ctx())
    written = LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())
    missed = await ops.open(attr.ino, os.O_RDONLY, ctx())  # the kernel holds it; the journal does not
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)
    await recovered.import_state(journal.for_recovery(written).adapter, after_crash=True)
    recovered.passthrough.enable(registry, 30.0)
    await recovered.release(journaled.fh)
    state = LiveState(FORMAT, 2, Negotiated(40, 0), recovered.export_state())
    assert state.adapter.backing == [Backing(attr.ino, journaled.backing_id, kept=True)] and state.adapter.files == []
    third = FuseOperations(ops.engine, attr_timeout=2.5)
    await third.import_state((journal.for_recovery(state) if after_crash else state).adapter, after_crash=after_crash)
    third.passthrough.enable(registry, 30.0)
    again = await third.open(attr.ino, os.O_RDONLY, ctx())
    assert again.backing_id == journaled.backing_id and registry.registered == 1
    await third.release(again.fh)
    await third.release(missed.fh)  # unknown to it: the kernel's release of the missed open
    assert registry.live == {journaled.backing_id}  # kept until unmount


async def test_a_kept_backing_id_stays_kept_through_a_restart_while_a_known_open_holds_it(harness):
    """A recovered daemon keeps its journal's ids (the kernel may hold opens the journal
    missed). Handed over by a restart while a known passthrough open still held such an id,
    it was taken for an ordinary one (format 1 said kept only by an inode with no open in
    the state): the new daemon closed it at that open's release, and every open of the file
    then got a new id the kernel refuses while the missed open holds the first (EIO). The
    state marks kept ids (format 2). (Found by review.)"""
    ops, registry, attr = await _complete_with_passthrough(harness)
    journaled = await ops.open(attr.ino, os.O_RDONLY, ctx())
    written = LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())
    missed = await ops.open(attr.ino, os.O_RDONLY, ctx())  # the journal missed it
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)  # kill -9
    await recovered.import_state(journal.for_recovery(written).adapter, after_crash=True)
    recovered.passthrough.enable(registry, 30.0)
    handed = decode(encode(LiveState(FORMAT, 2, Negotiated(40, 0), recovered.export_state())))
    new = FuseOperations(ops.engine, attr_timeout=2.5)  # fusecache restart
    await new.import_state(handed.adapter, after_crash=False)
    new.passthrough.enable(registry, 30.0)
    await new.release(journaled.fh)
    assert registry.live == {journaled.backing_id}
    again = await new.open(attr.ino, os.O_RDONLY, ctx())
    assert again.backing_id == journaled.backing_id and registry.registered == 1
    await new.release(again.fh)
    await new.release(missed.fh)  # unknown to it: the kernel's release of the missed open


async def test_a_handle_the_journal_kept_after_its_release_goes_once_the_kernel_forgets_its_inode(harness):
    """The journal lags: a handle released in the last moments before a crash is still in it,
    and the recovered daemon holds it with no RELEASE to come. Once the kernel forgets its
    inode (it cannot hold a file open on an inode it forgot) the handle is not handed on to
    the next daemon: a state with a handle on an inode nobody holds does not hold together,
    and a recovery from it would end the mount."""
    data = os.urandom(CHUNK + 5)
    (harness.src / "f").write_bytes(data)
    ops = await operations(harness)
    attr = await ops.lookup(ROOT_INODE, b"f", ctx())
    opened = await ops.open(attr.ino, os.O_RDONLY, ctx())
    written = LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())  # the last journal write
    await ops.release(opened.fh)  # after it: the journal still lists the handle
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)
    await recovered.import_state(journal.for_recovery(written).adapter, after_crash=True)
    assert [f.fh for f in recovered.export_state().files] == [opened.fh]
    recovered.forget([(attr.ino, 1)])  # the kernel's only lookup of f: it no longer holds the inode
    state = recovered.export_state()
    assert state.files == []  # what the next daemon (a restart, or the journal after a crash) gets
    again = FuseOperations(ops.engine, attr_timeout=2.5)
    await again.import_state(state)  # holds together
    stale = AdapterState(state.inodes, state.paths, [OpenFile(opened.fh, attr.ino, False)], [], [], state.next_fh)
    with pytest.raises(ValueError):  # refused in one line (the mount stays with its daemon), never ESTALE
        await FuseOperations(ops.engine, attr_timeout=2.5).import_state(stale)


async def test_a_read_of_a_handle_on_another_inode_than_its_own_is_eio(harness):
    """A handle number given out twice (two crashes close together, the second before the
    first recovered daemon's journal moved the numbers on) is read on the inode the kernel
    opened it on: a handle of ours on another inode answers EIO, never that file's bytes."""
    (harness.src / "f").write_bytes(os.urandom(CHUNK))
    (harness.src / "g").write_bytes(os.urandom(CHUNK))
    ops = await operations(harness)
    f = await ops.lookup(ROOT_INODE, b"f", ctx())
    g = await ops.lookup(ROOT_INODE, b"g", ctx())
    opened = await ops.open(f.ino, os.O_RDONLY, ctx())
    assert bytes(await ops.read(opened.fh, 0, 10, buffer(10), f.ino)) == (harness.src / "f").read_bytes()[:10]
    assert await fuse_errno(ops.read(opened.fh, 0, 10, buffer(10), g.ino)) == errno.EIO
    await ops.release(opened.fh)


async def test_an_open_interrupted_as_its_backing_id_is_journaled_is_answered_not_leaked(harness):
    """An INTERRUPT that lands while the first passthrough open of an inode writes its backing
    id to the journal: the handle is made by then, so the open is answered (the kernel then
    takes it, or refuses it and the session releases it), never dropped with its handle kept
    where no RELEASE will ever come."""
    ops, _registry, attr = await _complete_with_passthrough(harness)
    opened = []
    with trio.CancelScope() as interrupt:
        async def persist() -> bool:
            interrupt.cancel()  # the INTERRUPT comes as the journal is written
            await trio.sleep(0)
            return True

        ops.persist_backing = persist
        opened.append(await ops.open(attr.ino, os.O_RDONLY, ctx()))
    assert len(opened) == 1 and opened[0].backing_id is not None
    assert [f.fh for f in ops.export_state().files] == [opened[0].fh]
    await ops.release(opened[0].fh)
    assert ops.export_state().files == []


async def test_a_second_passthrough_open_waits_for_the_journal_to_name_the_backing_id(harness):
    """Two opens of one inode: the first registers its backing id and writes the journal; the
    second gets the same id. Answered before that write ended, a crash in between would
    leave the kernel holding an id no journal names, and the next daemon's registration of
    another refused: every open of the file failing until unmount. So it waits."""
    ops, _registry, attr = await _complete_with_passthrough(harness)
    writing, written = trio.Event(), trio.Event()

    async def persist() -> bool:
        writing.set()
        await written.wait()  # a journal write that takes a while (a slow disk)
        return True

    ops.persist_backing = persist
    answered: list[str] = []

    async def open_as(name: str) -> None:
        await ops.open(attr.ino, os.O_RDONLY, ctx())
        answered.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_as, "first")
        await writing.wait()
        nursery.start_soon(open_as, "second")
        try:
            with trio.move_on_after(1):  # what the second open takes, and far more
                while not answered:
                    await trio.sleep(0.01)
            assert answered == []  # neither is answered while the journal does not name the id
        finally:
            written.set()
    assert sorted(answered) == ["first", "second"]


async def test_a_passthrough_open_and_its_release_write_the_backing_ids_not_the_whole_state(harness, tmp_path):
    """The journal named a passthrough inode's backing id by writing the whole state at its
    first open and again at its last release: a write of every inode the kernel holds (60 ms
    an open with 2,000 files held, a fifth of a second with 20,000). Now the ids alone are
    written, beside the journal, and a recovery reads them from there."""
    ops, _registry, attr = await _complete_with_passthrough(harness)
    snapshots = []

    def snapshot() -> LiveState:
        snapshots.append(1)
        return LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state())

    kept = journal.Journal(tmp_path / journal.NAME, snapshot, ops.export_backing)
    await kept.flush()  # the journal as its periodic write left it: no backing id yet
    assert len(snapshots) == 1 and journal.read(kept.path).adapter.backing == []
    ops.persist_backing = kept.flush_backing
    opened = await ops.open(attr.ino, os.O_RDONLY, ctx())
    assert opened.backing_id is not None
    recovered = journal.read(kept.path)  # a crash now: the lagging journal, the ids beside it
    assert recovered.adapter.backing == [Backing(attr.ino, opened.backing_id)] and len(snapshots) == 1
    await ops.release(opened.fh)
    assert journal.read(kept.path).adapter.backing == [] and len(snapshots) == 1  # gone before it was closed


def _ids_after(journal_bytes: bytes, backing: list[Backing]) -> bytes:
    """The ids file as the writer leaves it after that journal."""
    return encode(BackingIds(FORMAT, 1, hashlib.sha256(journal_bytes).hexdigest(), backing))


def test_a_passthrough_handle_whose_id_was_closed_after_the_journal_was_written_is_left_out(tmp_path):
    """The journal lags the ids beside it: a passthrough handle it lists, on an inode whose id
    the ids no longer name, was released since (an id is closed only after its inode's last
    passthrough release). Kept, the recovered state would hold a passthrough open with no
    id, which does not hold together: the mount would end."""
    path = tmp_path / journal.NAME
    path.write_bytes(written := encode(_state(backing=[Backing(7, 1)])))  # handle 3, passthrough on inode 7
    (tmp_path / journal.BACKING_NAME).write_bytes(_ids_after(written, [Backing(9, 2)]))
    state = journal.read(path)
    assert state.adapter.files == [] and state.adapter.backing == [Backing(9, 2)]


async def test_a_cached_handle_released_before_its_inode_went_passthrough_is_left_out(harness, tmp_path):
    """The journal lists a cached handle of a file being filled; the file completes, the
    handle is released and the next open goes passthrough (a new id, written beside the
    journal) before the journal is written again; then a crash. Kept, the cached handle
    had the recovered daemon answer every open of the inode in cached mode while the kernel
    holds it in passthrough mode: EIO until unmount. (Found by review.)"""
    data = os.urandom(3 * CHUNK + 5)
    (harness.src / "f").write_bytes(data)
    registry = _Registry()
    ops = await operations(harness)
    ops.passthrough.enable(registry, 0.0)  # no wait: a file not yet complete opens cached
    attr = await ops.lookup(ROOT_INODE, b"f", ctx())
    kept = journal.Journal(tmp_path / journal.NAME,
                           lambda: LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state()), ops.export_backing)
    ops.persist_backing = kept.flush_backing
    cached = await ops.open(attr.ino, os.O_RDONLY, ctx())
    assert cached.backing_id is None
    assert await kept.flush()  # the journal's last write lists the cached handle
    assert await read_file(ops.engine, "f") == data  # the file completes
    await ops.release(cached.fh)
    passthrough = await ops.open(attr.ino, os.O_RDONLY, ctx())
    assert passthrough.backing_id is not None
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)  # a kill -9 now
    await recovered.import_state(journal.for_recovery(journal.read(kept.path)).adapter, after_crash=True)
    recovered.passthrough.enable(registry, 0.0)
    again = await recovered.open(attr.ino, os.O_RDONLY, ctx())
    assert again.backing_id == passthrough.backing_id and registry.registered == 1
    await recovered.release(again.fh)


def test_ids_written_beside_another_journal_are_not_paired_with_it(tmp_path):
    """Ids left by this fusecache beside a journal that an earlier version wrote since (a
    restart into it keeps the store dir, and it writes the ids in the journal alone), or whose
    own write failed after the journal's: the journal's ids are as new as it, and taken."""
    path = tmp_path / journal.NAME
    path.write_bytes(encode(_state(backing=[Backing(7, 1)])))
    (tmp_path / journal.BACKING_NAME).write_bytes(_ids_after(b"another journal", [Backing(9, 2)]))
    assert journal.read(path) == _state(backing=[Backing(7, 1)])


def test_the_writer_pairs_the_ids_with_the_journal_written_before_them(tmp_path):
    state = _state(backing=[Backing(7, 1)])
    kept = journal.Journal(tmp_path / journal.NAME, lambda: state, lambda: [Backing(7, 1), Backing(8, 3)])

    async def main():
        assert await kept.flush() and journal.read(kept.path) == state
        assert await kept.flush_backing()  # an id registered since: the journal lags, the ids do not
        assert journal.read(kept.path).adapter.backing == [Backing(7, 1), Backing(8, 3)]

    trio.run(main)


@pytest.mark.parametrize("damage", ["fields", "a directory"])
def test_damaged_ids_beside_the_journal_are_refused_in_one_line(tmp_path, damage):
    path = tmp_path / journal.NAME
    path.write_bytes(encode(_state()))
    if damage == "fields":
        (tmp_path / journal.BACKING_NAME).write_bytes(b'{"format": 1, "pid": 1, "journal": "", "backing": [{"inode": "7"}]}')
    else:
        (tmp_path / journal.BACKING_NAME).mkdir()
    with pytest.raises(StateError) as refused:
        journal.read(path)
    assert "\n" not in str(refused.value)


async def test_an_open_during_the_last_releases_write_waits_and_gets_a_new_id(harness):
    """The last passthrough release of an inode writes the ids without its id, then closes
    it. An open of the inode during that write was given the id about to be closed, with no
    write naming it: after a crash then, the journal missed an id the kernel held (every open
    of the file refused), or named one closed since. It now waits for the close, and its new
    id is written before it is answered."""
    ops, registry, attr = await _complete_with_passthrough(harness)
    first = await ops.open(attr.ino, os.O_RDONLY, ctx())
    writes: list[list[Backing]] = []
    writing, written = trio.Event(), trio.Event()

    async def persist() -> bool:
        writes.append(ops.export_backing())
        writing.set()
        await written.wait()  # the write of the release, taking a while
        return True

    ops.persist_backing = persist
    answered = []

    async def open_again() -> None:
        answered.append(await ops.open(attr.ino, os.O_RDONLY, ctx()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.release, first.fh)
        await writing.wait()
        nursery.start_soon(open_again)
        await trio.sleep(0.2)
        assert answered == [] and writes == [[]]
        written.set()
    (second,) = answered
    assert second.backing_id != first.backing_id and registry.live == {second.backing_id}
    assert writes == [[], [Backing(attr.ino, second.backing_id)]]  # written before it was answered
    await ops.release(second.fh)


async def test_ids_written_before_a_recovered_process_wrote_its_journal_are_paired_with_the_one_it_follows(
        harness, tmp_path, monkeypatch):
    """A recovered process writes its journal first thing; should that write fail (a full disk:
    the whole state does not fit, the small ids file does), the backing ids it wrote next named
    no journal, so after a second crash the journal's older ids were taken: an id the kernel
    holds missing. They name the journal it serves on from. (Found by review.)"""
    ops, registry, attr = await _complete_with_passthrough(harness)
    path = tmp_path / journal.NAME

    def snapshot_of(adapter: FuseOperations):
        return lambda: LiveState(FORMAT, 1, Negotiated(40, 0), adapter.export_state())

    first = journal.Journal(path, snapshot_of(ops), ops.export_backing)
    ops.persist_backing = first.flush_backing
    assert await first.flush()  # the journal names no id yet
    opened = await ops.open(attr.ino, os.O_RDONLY, ctx())  # its id is written beside it
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)  # kill -9
    await recovered.import_state(journal.for_recovery(journal.read(path)).adapter, after_crash=True)
    recovered.passthrough.enable(registry, 30.0)
    second = journal.Journal(path, snapshot_of(recovered), recovered.export_backing)
    second.continue_from_disk()  # as the daemon does once it serves the recovered state
    write_file = journal.private.write_file

    def full(target, data) -> None:
        if target.name == journal.NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_file(target, data)

    monkeypatch.setattr(journal.private, "write_file", full)
    assert not await second.flush()
    assert await second.flush_backing()
    monkeypatch.setattr(journal.private, "write_file", write_file)
    assert journal.read(path).adapter.backing == [Backing(attr.ino, opened.backing_id, kept=True)]  # the crash after
    await recovered.release(opened.fh)


async def test_a_file_dated_before_1970_leaves_the_journal_readable(harness, tmp_path):
    """A file's version holds its mtime, negative for a file dated before 1970 (`touch -d
    1960-01-01`, some archives); the state's decoder took every number for non-negative and
    refused the journal: a crash ended the mount, and every restart was refused. (Found by
    review.)"""
    (harness.src / "old").write_bytes(b"x" * 10)
    os.utime(harness.src / "old", ns=(-10**18, -10**18))
    ops = await operations(harness)
    attr = await ops.lookup(ROOT_INODE, b"old", ctx())
    opened = await ops.open(attr.ino, os.O_RDONLY, ctx())
    kept = journal.Journal(tmp_path / journal.NAME, lambda: LiveState(FORMAT, 1, Negotiated(40, 0), ops.export_state()))
    assert await kept.flush()
    recovered = FuseOperations(ops.engine, attr_timeout=2.5)
    await recovered.import_state(journal.for_recovery(journal.read(kept.path)).adapter, after_crash=True)
    assert await recovered.read(opened.fh, 0, 10, buffer(10), attr.ino) == b"x" * 10
    await recovered.release(opened.fh)
