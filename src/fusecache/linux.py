"""Linux system calls that Python's os module lacks: openat2, getdents64, fallocate, madvise
without the GIL, the mount calls (mount, umount2, statx for a mount's id), and two calls made
holding the GIL (a file's stamp, a nonblocking read). The one place that loads libc.

openat2 resolves a whole relative path beneath a directory fd in one call while refusing
every symlink on the way (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): the kernel does what would
otherwise take one openat per path component. getdents64 reads a directory from a given
position (lseek to an offset cookie the filesystem handed out), which is what a FUSE readdir
needs to stream a directory instead of holding a copy of it; os.scandir always starts over.
Both are called through ctypes, which releases the GIL for the duration of the call.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import platform
import signal
import socket
import struct
import typing

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscall numbers: openat2 is 437 on every architecture (it postdates the unified table);
# getdents64 differs, and glibc >= 2.30 has a wrapper for it, used when present.
_SYS_OPENAT2 = 437
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "arm64": 61}.get(platform.machine())

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# No symlink anywhere, nothing above the starting directory.
RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _raise(path: str | None = None) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), path)


def openat2(dir_fd: int, path: str, flags: int, resolve: int = RESOLVE_STRICT) -> int:
    """openat2(2): open path relative to dir_fd under the resolve restrictions.
    Raises OSError; ENOSYS on kernels before 5.6 (or where a seccomp filter forbids it)."""
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        _raise(path)
    return fd


def has_openat2(dir_fd: int) -> bool:
    """Whether openat2 works here (kernel >= 5.6, not filtered)."""
    try:
        os.close(openat2(dir_fd, ".", os.O_PATH | os.O_CLOEXEC))
    except OSError as e:
        log.info("openat2 is not available (%s); resolving source paths one component at a time", e.strerror)
        return False
    return True


_getdents64 = getattr(_libc, "getdents64", None)
if _getdents64 is not None:
    _getdents64.restype = ctypes.c_ssize_t
    _getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]

_DIRENT_HEAD = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the NUL-ended name


def getdents64(fd: int, size: int = 64 * 1024) -> list[tuple[bytes, int, int]]:
    """One getdents64(2) call on a directory fd from its current position: [(name, d_off,
    d_type)], where d_off is the cookie to lseek to for the entries after this one. An empty
    list is the end of the directory."""
    buf = ctypes.create_string_buffer(size)
    if _getdents64 is not None:
        n = _getdents64(fd, buf, size)
    elif _SYS_GETDENTS64 is not None:
        n = _libc.syscall(_SYS_GETDENTS64, ctypes.c_int(fd), buf, ctypes.c_size_t(size))
    else:
        raise OSError(errno.ENOSYS, f"getdents64 is not known on {platform.machine()}")
    if n < 0:
        _raise()
    raw = buf.raw[:n]
    entries = []
    pos = 0
    while pos < n:
        _ino, d_off, reclen, d_type = _DIRENT_HEAD.unpack_from(raw, pos)
        name_start = pos + _DIRENT_HEAD.size
        name = raw[name_start:raw.index(b"\0", name_start)]
        entries.append((name, d_off, d_type))
        pos += reclen
    return entries


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2) with mode 0: allocate the range's blocks, or raise OSError (ENOSPC and
    EDQUOT when there is no room, EOPNOTSUPP where the filesystem cannot). Not
    os.posix_fallocate: glibc's posix_fallocate, on a filesystem without fallocate, emulates it
    by reading and writing a byte in every block of the range, one block at a time (a round
    trip per 4 KiB on NFS), where the caller wants to hear that it cannot reserve."""
    while _libc.fallocate(fd, 0, offset, length) != 0:
        if ctypes.get_errno() != errno.EINTR:
            _raise()


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14; EINVAL before
MADV_POPULATE_WRITE = 23  # Linux 5.14; EINVAL before


def address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte (a view of a mapping, for madvise). The
    caller keeps the view alive for as long as it uses the address: while a view is exported,
    the mapping cannot be closed, so the address cannot come to name another mapping."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on a page-aligned address, with the GIL released. mmap.madvise holds the
    GIL for the whole call: populating or unmapping a run of megabytes then stops every other
    thread of the daemon (a 16-core fill with a populate per run: 2.1 GB/s, against 6.4
    through here). Raises OSError."""
    if _libc.madvise(address, length, advice) != 0:
        _raise()


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2). Raises OSError."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode()) != 0:
        _raise(target)


def umount2(target: str, flags: int) -> None:
    """umount2(2). Raises OSError."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise(target)


_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_MNT_ID_UNIQUE = 0x4000
_STATX_SIZE = 256  # struct statx
# stx_mask, then stx_dev_major/minor at 136 and stx_mnt_id at 144
_STATX_MOUNT = struct.Struct("=I132xIIQ")
_statx = getattr(_libc, "statx", None)


def _statx_of(call, fd: int, mask: int) -> ctypes.Array:
    """struct statx of fd's file, asked through `call` (libc's statx, through a library that
    releases the GIL or one that holds it) without a request to its filesystem
    (AT_STATX_DONT_SYNC). Raises OSError."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if call(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, mask, buf) != 0:
        _raise()
    return buf


def mount_of(fd: int) -> tuple[int, int | None]:
    """(st_dev, never-reused mount id or None before Linux 6.8) of the mount fd lies on, asked
    without a request to its filesystem (AT_STATX_DONT_SYNC: FUSE answers from what the kernel
    holds, so this works on a mount whose daemon does not answer, our own included).
    Raises OSError (ENOSYS without statx)."""
    if _statx is None:
        raise OSError(errno.ENOSYS, "statx is not available")
    mask, major, minor, mount_id = _STATX_MOUNT.unpack_from(_statx_of(_statx, fd, _STATX_MNT_ID_UNIQUE))
    return os.makedev(major, minor), mount_id if mask & _STATX_MNT_ID_UNIQUE else None


# Calls that never wait, made holding the GIL (ctypes.PyDLL): the FUSE reader threads make two
# per request (session/queues.py), and releasing the GIL around a syscall of a microsecond is
# what cost there: the thread must win the GIL back afterwards, against seven others. Profiled
# on the 16-core device (issue 22), each of 8 threads spent most of its time waiting for the
# GIL in a futex, while it was held less than a third of the time.
_held = ctypes.PyDLL(None, use_errno=True)
_held_statx = getattr(_held, "statx", None)
_held.read.restype = ctypes.c_ssize_t
_held.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_STATX_BASIC_STATS = 0x7FF
# stx_nlink at 16, stx_size at 40, stx_ctime (tv_sec, tv_nsec) at 96, stx_mtime at 112
_STATX_STAMP = struct.Struct("=16xI20xQ48xqI4xqI")


def stamp(fd: int) -> tuple[int, int, int, int]:
    """(size, ctime_ns, mtime_ns, nlink) of fd's file, what any write to it moves. statx is
    called holding the GIL: only for files on local filesystems (a cache file), where it never
    waits. Raises OSError."""
    if _held_statx is None:  # glibc before 2.28
        st = os.fstat(fd)
        return st.st_size, st.st_ctime_ns, st.st_mtime_ns, st.st_nlink
    buf = _statx_of(_held_statx, fd, _STATX_BASIC_STATS)
    nlink, size, ctime, ctime_ns, mtime, mtime_ns = _STATX_STAMP.unpack_from(buf)
    return size, ctime * 1_000_000_000 + ctime_ns, mtime * 1_000_000_000 + mtime_ns, nlink


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this process (SIGKILL) when the thread that started it ends."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _raise()


def read_nowait(fd: int, buffer: ctypes.Array) -> int:
    """read(2) into buffer holding the GIL, for a nonblocking descriptor whose reads never
    wait (a /dev/fuse duplicate: a request, or EAGAIN at once). Raises OSError (BlockingIOError
    when there is nothing to read)."""
    n = _held.read(fd, buffer, len(buffer))
    if n < 0:
        _raise()
    return n


def release_free_memory() -> None:
    """Give the memory of freed objects back to the system. A full collection first: it also
    empties the interpreter's free lists (up to 2000 tuples of each length, dicts, floats),
    which keep freed objects spread over the heap's pages. Then glibc's malloc_trim, which
    returns every free page of every arena: after the kernel forgets 100,000 inodes, the
    daemon's RSS would otherwise stay where it peaked. Only the C allocator's pages can be
    returned: pymalloc keeps a 1 MiB arena while any object in it lives, which is why the
    daemon runs on the C allocator (cli.py, `on_the_c_allocator`)."""
    gc.collect()
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


_PEERCRED = struct.Struct("3i")  # struct ucred


def peer_credentials(sock: socket.socket | typing.Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix socket's peer, as the kernel recorded it at connect (a
    stdlib or trio socket)."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
