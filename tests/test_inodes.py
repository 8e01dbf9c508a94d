"""Inode numbers: one per version of a path, the same number whenever the kernel asks again,
and memory only for the inodes the kernel holds (audit 2, item 12). InodeTable is plain
bookkeeping, driven here with real stat results of real files, no mount needed."""

from __future__ import annotations

import errno
import os
import time

import pytest

from fusecache.inodes import ROOT_INODE, InodeTable
from fusecache.session.types import FuseError


def version(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def rewrite(path, data: bytes, mtime_s: int):
    """Rewrite path in place; the version of what is there now. Where timestamps are coarse
    (ctime in jiffies before Linux 6.13), until the ctime moved: two rewrites within one tick
    would be one version."""
    before = os.lstat(path).st_ctime_ns if path.exists() else None
    for _ in range(100):
        path.write_bytes(data)
        os.utime(path, (mtime_s, mtime_s))
        if os.lstat(path).st_ctime_ns != before:
            break
        time.sleep(0.002)
    return version(os.lstat(path))


def test_each_version_gets_its_own_number_and_keeps_it(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    one = rewrite(f, b"one", 1000)
    v1 = table.hold("f", one)
    assert table.inode("f", one) == v1 and table.version(v1) == ("f", one)
    v2 = table.hold("f", rewrite(f, b"two", 2000))  # modified in place: same source inode
    # rewritten in place with the same size and the mtime put back: only the ctime tells
    v3 = table.hold("f", rewrite(f, b"TWO", 2000))
    assert len({v1, v2, v3}) == 3 and ROOT_INODE not in (v1, v2, v3)
    assert table.inode("", version(os.lstat(tmp_path))) == ROOT_INODE
    assert table.version(ROOT_INODE) == ("", None)


def test_a_forgotten_inode_is_dropped_and_numbered_alike_when_looked_up_again(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    old_version = rewrite(f, b"one", 1000)
    old = table.hold("f", old_version)
    table.hold("f", old_version)  # two lookups
    new = table.hold("f", rewrite(f, b"two", 2000))
    assert not table.is_latest(old) and table.is_latest(new)
    table.forget(old, 1)
    assert table.version(old)[0] == "f"  # the kernel still holds it once
    table.forget(old, 1)
    with pytest.raises(FuseError) as e:
        table.version(old)
    assert e.value.errno == errno.ESTALE
    table.forget(new, 1)  # the latest too: the kernel has no use for it any more
    assert len(table) == 0
    assert table.hold("f", version(os.lstat(f))) == new  # and it comes back under its number
    assert table.hold("f", old_version) == old


def test_epochs_move_while_held_and_start_over_once_forgotten(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    v = rewrite(f, b"one", 1000)
    first = table.hold("f", v + (table.epoch("f"),))
    table.next_epoch("f")
    second = table.hold("f", v + (table.epoch("f"),))
    assert second != first and not table.is_latest(first) and table.is_latest(second)
    table.forget(first, 1)
    table.forget(second, 1)
    assert table.epoch("f") == 0 and table.hold("f", v + (0,)) == first


def test_memory_follows_what_the_kernel_holds():
    """100,000 paths looked up, then forgotten (as after drop_caches): nothing is kept; a
    plain readdir's numbers (no lookup) are never kept."""
    table = InodeTable()
    held = [table.hold(f"d/{i}", (i, 1, 2, 3, 0)) for i in range(100_000)]
    assert len(table) == 100_000 and len(set(held)) == 100_000
    for i in range(50_000):
        table.inode(f"listed/{i}", (i, 1, 2, 3, 0))
    table_size = len(table)
    for inode in held:
        table.forget(inode, 1)
    assert table_size == 100_000 and len(table) == 0
    assert (table._held, table._numbers, table._paths) == ({}, {}, {})  # every table empty again


def test_two_keys_of_one_hash_get_two_numbers(monkeypatch):
    from fusecache import inodes
    monkeypatch.setattr(inodes, "_number", lambda key: 42)
    table = InodeTable()
    a, b = table.hold("a", (1,)), table.hold("b", (2,))
    assert (a, b) == (42, 43) and table.version(a) == ("a", (1,)) and table.version(b) == ("b", (2,))
    assert table.inode("a", (1,)) == 42 and table.inode("b", (2,)) == 43
