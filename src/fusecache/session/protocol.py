"""The FUSE kernel protocol (include/uapi/linux/fuse.h), as far as a read-only server needs it.

Every structure is a `struct.Struct` with the kernel's layout (little-endian, the 64-bit
padding the header spells out); tests/test_protocol_inprocess.py checks each size and field
offset against the C header. The negotiated minor version decides nothing here: the oldest
kernel protocol we accept (MIN_MINOR) already has every layout below at full size.
"""

from __future__ import annotations

import enum
import os
import stat as stat_mod
import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
# What this server speaks: 7.40 added passthrough (Linux 6.9); newer minors add nothing we use.
KERNEL_MINOR_VERSION = 40
MIN_MINOR = 31


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# Requests that change the filesystem: answered EROFS, by either session (pyfuse3_session.py
# names its methods after these). SETATTR too: the kernel sends it for truncate, chmod, utimes;
# with a read-only mount the VFS refuses most of them first.
WRITE_OPS = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME,
                       Op.LINK, Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE,
                       Op.RENAME2, Op.COPY_FILE_RANGE, Op.TMPFILE, Op.SETLK, Op.SETLKW})

# INIT flags (flags, then flags2 holding bits 32..63)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39  # the kernel replays requests in flight on NOTIFY_RESEND (7.40, Linux 6.9)

# notification codes (sent with unique 0, the code in the error field)
NOTIFY_RESEND = 7

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

UNIQUE_RESEND = 1 << 63

MAX_WRITE = 128 * 1024  # what INIT says: we refuse writes, but the kernel still wants a size
READ_BUFFER = MAX_WRITE + 4096  # room for the largest request the kernel sends (a WRITE)
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 at +16 since 7.36)
INIT_IN_FLAGS2 = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # nodeid generation entry_valid attr_valid (nsecs) attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # attr_valid attr_valid_nsec dummy attr
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
INTERRUPT_IN = struct.Struct("<Q")  # unique
ACCESS_IN = struct.Struct("<II")  # mask padding
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
DIRENT = struct.Struct("<QQII")  # ino off namelen type
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

# ioctls on the /dev/fuse descriptor: _IOW(229, nr, size)
_IOC_WRITE = 1


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (229 << 8) | nr


DEV_IOC_BACKING_OPEN = _iow(1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _iow(2, 4)


@dataclass(frozen=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    extlen: int  # bytes of request extensions after the operation's arguments

    @classmethod
    def parse(cls, data: memoryview) -> InHeader:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(data)
        return cls(length, opcode, unique, nodeid, uid, gid, pid, extlen * 8)


@dataclass(frozen=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32 (flags2 only with INIT_EXT)

    @classmethod
    def parse(cls, data: memoryview) -> InitIn:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(data)
        if flags & INIT_EXT and len(data) >= INIT_IN.size + INIT_IN_FLAGS2.size:
            flags |= INIT_IN_FLAGS2.unpack_from(data, INIT_IN.size)[0] << 32
        return cls(major, minor, max_readahead, flags)


@dataclass(frozen=True)
class InitOut:
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int
    max_stack_depth: int

    def pack(self) -> bytes:
        return INIT_OUT.pack(KERNEL_VERSION, self.minor, self.max_readahead, self.flags & 0xFFFFFFFF,
                             self.max_background, self.congestion_threshold, self.max_write, 1,
                             self.max_pages, 0, self.flags >> 32, self.max_stack_depth)


def pack_out_header(payload_length: int, error: int, unique: int) -> bytes:
    """error is 0 or a positive errno (sent negated, as the kernel wants)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_length, -error, unique)


def pack_notify(code: int) -> bytes:
    """A notification without payload: unique 0, the code in the error field (not negated)."""
    return OUT_HEADER.pack(OUT_HEADER.size, code, 0)


def _split_ns(ns: int) -> tuple[int, int]:
    # negative times (before 1970) keep a non-negative nanosecond part, as the kernel expects
    seconds, nanos = divmod(ns, 1_000_000_000)
    return seconds & 0xFFFFFFFFFFFFFFFF, nanos


def _split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def attr_fields(attr) -> tuple:
    """The fields of struct fuse_attr for a session-neutral Attributes (see types.py)."""
    atime, atime_ns = _split_ns(attr.atime_ns)
    mtime, mtime_ns = _split_ns(attr.mtime_ns)
    ctime, ctime_ns = _split_ns(attr.ctime_ns)
    return (attr.ino, attr.size, attr.blocks, atime, mtime, ctime, atime_ns, mtime_ns, ctime_ns,
            attr.mode, attr.nlink, attr.uid, attr.gid, attr.rdev & 0xFFFFFFFF, attr.blksize, 0)


def pack_entry(attr) -> bytes:
    entry, entry_ns = _split_timeout(attr.entry_timeout)
    valid, valid_ns = _split_timeout(attr.attr_timeout)
    return ENTRY_OUT.pack(attr.ino, attr.generation, entry, valid, entry_ns, valid_ns, *attr_fields(attr))


def pack_attr_out(attr) -> bytes:
    valid, valid_ns = _split_timeout(attr.attr_timeout)
    return ATTR_OUT.pack(valid, valid_ns, 0, *attr_fields(attr))


def pack_statfs(vfs: os.statvfs_result) -> bytes:
    return KSTATFS.pack(vfs.f_blocks, vfs.f_bfree, vfs.f_bavail, vfs.f_files, vfs.f_ffree,
                        vfs.f_bsize, vfs.f_namemax, vfs.f_frsize, 0)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def dirent_size(name: bytes, plus: bool) -> int:
    return _align8((ENTRY_OUT.size if plus else 0) + DIRENT.size + len(name))


def pack_dirent(name: bytes, attr, next_offset: int, plus: bool) -> bytes:
    """One entry of a READDIR (plus=False) or READDIRPLUS reply, padded to 8 bytes."""
    head = pack_entry(attr) if plus else b""
    record = head + DIRENT.pack(attr.ino, next_offset, len(name), stat_mod.S_IFMT(attr.mode) >> 12) + name
    return record + bytes(_align8(len(record)) - len(record))
