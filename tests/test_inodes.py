"""Inode numbers: one per version of a path, stable for the latest version, and outdated
versions dropped once the kernel forgets them. InodeTable is plain bookkeeping, so it is
driven here with real stat results of real files, no mount needed."""

from __future__ import annotations

import errno
import os

import pytest

from fusecache.fs import ROOT_INODE, InodeTable, version_of
from fusecache.session.types import FuseError
from fusecache.source import Identity


def version(st: os.stat_result):
    return version_of(st, Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


def rewrite(path, data: bytes, mtime_s: int):
    """Rewrite path in place; the version of what is there now."""
    path.write_bytes(data)
    os.utime(path, (mtime_s, mtime_s))
    return version(os.lstat(path))


def test_each_version_gets_its_own_number_and_the_latest_keeps_it(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    v1 = table.inode("f", rewrite(f, b"one", 1000))
    assert table.inode("f", version(os.lstat(f))) == v1  # unchanged: same number
    v2 = table.inode("f", rewrite(f, b"two", 2000))  # modified in place: same source inode
    assert v2 != v1
    st = os.lstat(f)
    assert table.version(v2) == ("f", (st.st_ino, 3, 2000 * 10**9, st.st_ctime_ns))
    # rewritten in place with the same size and the mtime put back: only the ctime tells
    v3 = table.inode("f", rewrite(f, b"TWO", 2000))
    assert v3 not in (v1, v2)
    assert table.inode("", version(os.lstat(tmp_path))) == ROOT_INODE


def test_outdated_versions_are_dropped_once_forgotten(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    old = table.inode("f", rewrite(f, b"one", 1000))
    table.looked_up(old)
    table.looked_up(old)
    new = table.inode("f", rewrite(f, b"two", 2000))
    assert table.version(old)[0] == "f"  # the kernel still holds the old version
    table.forget(old, 1)
    assert table.version(old)[0] == "f"
    table.forget(old, 1)
    with pytest.raises(FuseError) as e:
        table.version(old)
    assert e.value.errno == errno.ESTALE
    table.looked_up(new)
    table.forget(new, 1)  # the latest version keeps its number even when forgotten
    assert table.inode("f", version(os.lstat(f))) == new


def test_a_file_that_keeps_changing_does_not_grow_the_table(tmp_path):
    table = InodeTable()
    f = tmp_path / "f"
    for i in range(1000):
        inode = table.inode("f", rewrite(f, b"x" * (i % 7), 1000 + i))
        table.looked_up(inode)
        table.forget(inode, 1)
    assert len(table._versions) <= 3
