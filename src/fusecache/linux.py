"""Linux system calls that Python's os module lacks: openat2 and getdents64.

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
import logging
import os
import platform
import struct

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
