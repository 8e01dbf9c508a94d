"""The kernel protocol's wire format (fusecache/session/protocol.py) against the kernel's own
header: every structure's size and every field's offset, as a C compiler lays them out from
<linux/fuse.h>; and round trips of what we pack. Fields newer than the installed header
(7.40's backing_id and max_stack_depth) are checked at the place the older header keeps as
padding for them."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess

import pytest

from fusecache.session import protocol as p
from fusecache.session.types import Attributes

HEADER = "/usr/include/linux/fuse.h"

# our Struct -> (C struct, its fields in our order; "new|old" where an older header names it otherwise)
LAYOUTS = {
    "IN_HEADER": ("fuse_in_header", "len opcode unique nodeid uid gid pid total_extlen padding"),
    "OUT_HEADER": ("fuse_out_header", "len error unique"),
    "INIT_IN": ("fuse_init_in", "major minor max_readahead flags"),
    "INIT_OUT": ("fuse_init_out", "major minor max_readahead flags max_background congestion_threshold "
                 "max_write time_gran max_pages map_alignment flags2 max_stack_depth|unused"),
    "ATTR": ("fuse_attr", "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid "
             "rdev blksize flags"),
    "ENTRY_OUT": ("fuse_entry_out", "nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec "
                  "attr.ino attr.size attr.blocks attr.atime attr.mtime attr.ctime attr.atimensec attr.mtimensec "
                  "attr.ctimensec attr.mode attr.nlink attr.uid attr.gid attr.rdev attr.blksize attr.flags"),
    "ATTR_OUT": ("fuse_attr_out", "attr_valid attr_valid_nsec dummy attr.ino attr.size attr.blocks attr.atime "
                 "attr.mtime attr.ctime attr.atimensec attr.mtimensec attr.ctimensec attr.mode attr.nlink attr.uid "
                 "attr.gid attr.rdev attr.blksize attr.flags"),
    "GETATTR_IN": ("fuse_getattr_in", "getattr_flags dummy fh"),
    "OPEN_IN": ("fuse_open_in", "flags open_flags"),
    "OPEN_OUT": ("fuse_open_out", "fh open_flags backing_id|padding"),
    "READ_IN": ("fuse_read_in", "fh offset size read_flags lock_owner flags padding"),
    "RELEASE_IN": ("fuse_release_in", "fh flags release_flags lock_owner"),
    "FORGET_IN": ("fuse_forget_in", "nlookup"),
    "BATCH_FORGET_IN": ("fuse_batch_forget_in", "count dummy"),
    "FORGET_ONE": ("fuse_forget_one", "nodeid nlookup"),
    "INTERRUPT_IN": ("fuse_interrupt_in", "unique"),
    "ACCESS_IN": ("fuse_access_in", "mask padding"),
    "GETXATTR_IN": ("fuse_getxattr_in", "size padding"),
    "GETXATTR_OUT": ("fuse_getxattr_out", "size padding"),
    "KSTATFS": ("fuse_kstatfs", "blocks bfree bavail files ffree bsize namelen frsize padding"),
    "DIRENT": ("fuse_dirent", "ino off namelen type"),
}
# structures whose full size our Struct is (INIT_IN is read as a prefix; DIRENT has the name after it)
FULL_SIZE = set(LAYOUTS) - {"INIT_IN"}


def _field_offsets(fmt: str) -> list[int]:
    """Offsets of the non-padding fields of a little-endian struct format."""
    offsets, position, count = [], 0, ""
    for code in fmt[1:]:
        if code.isdigit():
            count += code
            continue
        n = int(count or 1)
        count = ""
        if code == "x":
            position += n
            continue
        for _ in range(n):
            offsets.append(position)
            position += struct.calcsize("<" + code)
    return offsets


@pytest.fixture(scope="module")
def kernel_layout(tmp_path_factory) -> dict[str, int]:
    """sizeof/offsetof of every field in LAYOUTS, compiled against the installed header."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not os.path.exists(HEADER):
        pytest.fail("a C compiler and linux/fuse.h are needed (.ci/setup installs gcc and the kernel headers)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/fuse.h>", "int main(void) {"]
    for cname, fields in LAYOUTS.values():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field in fields.split():
            new, _, old = field.partition("|")
            if old:
                lines.append("#ifdef FUSE_PASSTHROUGH")
            lines.append(f'printf("{cname}.{new} %zu\\n", offsetof(struct {cname}, {new}));')
            if old:
                lines += ["#else", f'printf("{cname}.{new} %zu\\n", offsetof(struct {cname}, {old}));', "#endif"]
    lines += ["return 0;", "}"]
    folder = tmp_path_factory.mktemp("layout")
    (folder / "layout.c").write_text("\n".join(lines))
    subprocess.run([compiler, "-o", str(folder / "layout"), str(folder / "layout.c")], check=True)
    output = subprocess.run([str(folder / "layout")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("ours", sorted(LAYOUTS))
def test_every_structure_matches_the_kernel_header(kernel_layout, ours):
    cname, fields = LAYOUTS[ours]
    ours_struct: struct.Struct = getattr(p, ours)
    if ours in FULL_SIZE:
        assert ours_struct.size == kernel_layout[cname]
    names = [f.partition("|")[0] for f in fields.split()]
    assert _field_offsets(ours_struct.format) == [kernel_layout[f"{cname}.{n}"] for n in names]


def test_ioctl_numbers_are_the_kernels():
    # _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t), as <asm/ioctl.h> encodes them
    assert p.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert p.DEV_IOC_BACKING_CLOSE == 0x4004E502


def _attributes(**changes) -> Attributes:
    base = dict(ino=7, mode=stat.S_IFREG | 0o644, nlink=1, uid=1000, gid=1000, rdev=0, size=5 << 30,
                blocks=123, blksize=1 << 20, atime_ns=1_700_000_000_123_456_789, mtime_ns=-1_500_000_000,
                ctime_ns=0, entry_timeout=1.5, attr_timeout=2.25, generation=3)
    return Attributes(**{**base, **changes})


def test_an_entry_round_trips():
    attr = _attributes()
    fields = p.ENTRY_OUT.unpack(p.pack_entry(attr))
    nodeid, generation, entry_valid, attr_valid, entry_ns, attr_ns = fields[:6]
    ino, size, blocks, atime, mtime, ctime, atime_ns, mtime_ns, ctime_ns, mode, *_ = fields[6:]
    assert (nodeid, generation, ino, size, blocks, mode) == (7, 3, 7, 5 << 30, 123, attr.mode)
    assert (entry_valid, entry_ns, attr_valid, attr_ns) == (1, 500_000_000, 2, 250_000_000)
    assert atime * 10**9 + atime_ns == attr.atime_ns
    # before 1970: seconds as a two's complement 64-bit number, nanoseconds kept non-negative
    assert struct.unpack("<q", struct.pack("<Q", mtime))[0] * 10**9 + mtime_ns == attr.mtime_ns
    assert 0 <= mtime_ns < 10**9 and (ctime, ctime_ns) == (0, 0)


def test_directory_entries_are_padded_to_eight_bytes():
    attr = _attributes(mode=stat.S_IFDIR | 0o755)
    for name in (b"a", b"abcdefgh", b"x" * 255):
        for plus in (False, True):
            record = p.pack_dirent(name, attr, 42, plus)
            assert len(record) % 8 == 0 and len(record) == p.dirent_size(name, plus)
            start = p.ENTRY_OUT.size if plus else 0
            ino, offset, namelen, kind = p.DIRENT.unpack_from(record, start)
            assert (ino, offset, namelen, kind) == (7, 42, len(name), stat.S_IFDIR >> 12)
            assert record[start + p.DIRENT.size:start + p.DIRENT.size + namelen] == name


def test_init_negotiates_flags_beyond_32_bits():
    data = p.INIT_IN.pack(7, 45, 131072, p.INIT_EXT | p.ASYNC_READ) + struct.pack("<I", p.PASSTHROUGH >> 32)
    init = p.InitIn.parse(memoryview(data + bytes(44)))
    assert init.flags & p.PASSTHROUGH and init.flags & p.ASYNC_READ and (init.major, init.minor) == (7, 45)
    out = p.InitOut(minor=40, max_readahead=131072, flags=p.PASSTHROUGH | p.INIT_EXT, max_background=64,
                    congestion_threshold=48, max_write=4096, max_pages=256, max_stack_depth=1)
    fields = p.INIT_OUT.unpack(out.pack())
    assert fields[3] == p.INIT_EXT and fields[10] == p.PASSTHROUGH >> 32 and fields[11] == 1
    # without INIT_EXT from the kernel, its flags2 word is not there to read
    assert not p.InitIn.parse(memoryview(p.INIT_IN.pack(7, 31, 0, 0))).flags
