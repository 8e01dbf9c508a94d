"""The state a restart hands over (livestate.py): it comes back as it was sent, a state of
another format or a damaged one is refused with one line, and the tables that export it
(inodes.InodeTable, passthrough.Passthrough) take it back whole or not at all."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fusecache.inodes import InodeTable
from fusecache.livestate import (FORMAT, AdapterState, Backing, BackingIds, HeldInode, LiveState, Negotiated, OpenDir,
                                 OpenFile, PathState, StateError, asker_reads, decode, decode_backing, encode,
                                 formats_read)
from fusecache.passthrough import Passthrough
from fusecache.session.types import FuseError


def a_table() -> InodeTable:
    table = InodeTable()
    table.hold("a/b.bin", (11, 100, 5, 6, 0))
    table.hold("a/b.bin", (11, 100, 5, 6, 0))
    table.hold("a", (10,))
    table.hold("bad-\udcff-name", (12, 1, 2, 3, 0))  # a name that is not UTF-8
    table.next_epoch("a/b.bin")
    return table


def a_state(table: InodeTable) -> LiveState:
    held, paths = table.export_state()
    number = table.inode("a/b.bin", (11, 100, 5, 6, 0))
    adapter = AdapterState(held, paths, [OpenFile(3, number, True), OpenFile(4, number, True)],
                           [OpenDir(5, "a")], [Backing(number, 7)], next_fh=6)
    return LiveState(FORMAT, 1234, Negotiated(40, (1 << 37) | 1), adapter)


def test_a_state_comes_back_as_it_was_sent():
    state = a_state(a_table())
    assert decode(encode(state)) == state


def test_an_imported_table_answers_as_the_exported_one():
    old = a_table()
    new = InodeTable()
    held, paths = old.export_state()
    new.import_state(held, paths)
    for h in held:
        assert new.version(h.number) == old.version(h.number)
        assert new.is_latest(h.number) == old.is_latest(h.number)
    assert new.epoch("a/b.bin") == 1 and len(new) == len(old)
    number = new.inode("a/b.bin", (11, 100, 5, 6, 0))
    new.forget(number, 1)
    assert new.path(number) == "a/b.bin"  # two lookups were carried over: one left
    new.forget(number, 1)
    with pytest.raises(FuseError):
        new.version(number)


@pytest.mark.parametrize("damage, named", [
    (lambda raw: raw.update(format=FORMAT + 1), "format"),
    (lambda raw: raw.pop("format"), "no format"),
    (lambda raw: raw["adapter"].pop("next_fh"), "state.adapter has fields"),
    (lambda raw: raw["adapter"]["files"][1].update(fh="3"), "state.adapter.files[1].fh is not"),
    (lambda raw: raw["adapter"]["files"][0].update(passthrough=1), "state.adapter.files[0].passthrough is not"),
    (lambda raw: raw["adapter"]["inodes"][0].update(lookups=-1), "state.adapter.inodes[0].lookups is not"),
    (lambda raw: raw["adapter"]["inodes"][2]["version"].__setitem__(1, "1"), "state.adapter.inodes[2].version[1] is not"),
    (lambda raw: raw["adapter"]["files"][0].update(inode=-1), "state.adapter.files[0].inode is not"),
    (lambda raw: raw["adapter"]["inodes"][0].update(version=None), "state.adapter.inodes[0].version is not a list"),
    (lambda raw: raw["session"].update(extra=1), "state.session has fields"),
])
def test_another_format_or_a_damaged_state_is_refused_in_one_line(damage, named):
    raw = json.loads(encode(a_state(a_table())))
    damage(raw)
    with pytest.raises(StateError) as refused:
        decode(json.dumps(raw).encode())
    assert "\n" not in str(refused.value) and named in str(refused.value)


def test_the_states_earlier_releases_sent_are_read():
    """The JSON a restart hands over is the contract between two versions of fusecache (an
    upgrade restarts into the new one): format 1 is what 9d1cc6e wrote for a_state(), read
    with no id marked kept; format 2 what this release writes, backing ids marked."""
    inodes = (b'"inodes":[{"number":11,"relpath":"a/b.bin","version":[11,100,5,6,0],"lookups":2},'
              b'{"number":12,"relpath":"a","version":[10],"lookups":1}],"paths":[{"relpath":"a/b.bin",'
              b'"latest":[11,100,5,6,0],"epoch":1},{"relpath":"a","latest":[10],"epoch":0}],"files":'
              b'[{"fh":3,"inode":11,"passthrough":true}],"dirs":[{"fh":5,"relpath":"a"}],')
    session = b'"pid":1234,"session":{"minor":40,"flags":137438953473},"adapter":{'
    adapter = AdapterState(
        [HeldInode(11, "a/b.bin", (11, 100, 5, 6, 0), 2), HeldInode(12, "a", (10,), 1)],
        [PathState("a/b.bin", (11, 100, 5, 6, 0), 1), PathState("a", (10,), 0)],
        [OpenFile(3, 11, True)], [OpenDir(5, "a")], [Backing(11, 7)], next_fh=6)
    one = b'{"format":1,' + session + inodes + b'"backing":[{"inode":11,"backing_id":7}],"next_fh":6}}'
    assert decode(one) == LiveState(1, 1234, Negotiated(40, (1 << 37) | 1), adapter)
    two = (b'{"format":2,' + session + inodes + b'"backing":[{"inode":11,"backing_id":7,"kept":true}],'
           b'"next_fh":6}}')
    state = LiveState(2, 1234, Negotiated(40, (1 << 37) | 1), replace(adapter, backing=[Backing(11, 7, kept=True)]))
    assert decode(two) == state and encode(state) == two
    ids = b'{"format":1,"pid":1234,"journal":"x","backing":[{"inode":11,"backing_id":7}]}'
    assert decode_backing(ids) == BackingIds(1, 1234, "x", [Backing(11, 7)])


def test_a_restart_is_asked_for_in_the_formats_its_asker_reads():
    """A daemon hands its state over only to an asker that reads its format: one of this
    release, or of an earlier one, which sent "format" alone and read format 1 alone. This
    release's request passes an earlier daemon's check (its "format" is 1, which this release
    reads): an upgrade restarts live."""
    ours = formats_read()
    assert asker_reads(ours) and asker_reads(ours, 1) and ours["format"] == 1
    assert not asker_reads({"format": 1})  # an earlier release's asker: format 2 it cannot read
    assert asker_reads({"format": FORMAT}) and not asker_reads({"format": FORMAT + 1})
    assert not asker_reads({"format": 1, "formats": [FORMAT + 1]})


def test_bytes_that_are_not_a_state_are_refused():
    for data in (b"", b"{", b"[]", b'"x"', b"\xff\xfe"):
        with pytest.raises(StateError):
            decode(data)


def test_a_table_refuses_a_state_that_does_not_hold_together():
    held, paths = a_table().export_state()
    with pytest.raises(ValueError):
        InodeTable().import_state(held, paths[1:])  # a held path without its state
    with pytest.raises(ValueError):
        InodeTable().import_state(held + held[:1], paths)  # one number twice


class _NoEngine:
    pass


def test_passthrough_keeps_backing_ids_and_closes_them_at_the_last_release():
    closed = []

    class Device:
        def open(self, fd: int) -> int:
            raise AssertionError("no new backing id is registered")

        def close(self, backing_id: int) -> None:
            closed.append(backing_id)

    new = Passthrough(_NoEngine())  # type: ignore[arg-type]
    new.import_state([Backing(9, 7)], [(9, True), (9, True), (10, False)])
    new.enable(Device(), 0.0)
    assert new.export_state({9}) == [Backing(9, 7)]
    assert new.export_state(set()) == []  # its last passthrough handle is being released: closed next
    new.released(9, True)
    assert closed == []
    new.released(9, True)
    assert closed == [7]
    with pytest.raises(ValueError):
        Passthrough(_NoEngine()).import_state([], [(9, True)])  # type: ignore[arg-type]
    kept = Passthrough(_NoEngine())  # type: ignore[arg-type]
    kept.import_state([Backing(9, 7)], [(9, False)])  # no passthrough handle in the state: a kept id
    assert kept.export_state(set()) == [Backing(9, 7, kept=True)]
