"""The system calls Python lacks (fusecache.linux): openat2 refuses symlinks and escapes,
getdents64 reports errors as OSError, fallocate reserves blocks or says the filesystem cannot,
madvise populates and unmaps a range of a mapping; the calls made holding the GIL: a file's
stamp is what fstat says, also after a write moved it, and a nonblocking read with nothing
to read says so."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from fusecache import linux

from .helpers import mapped_kib


def test_openat2_refuses_symlinks_and_escapes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").touch()
    (tmp_path / "link").symlink_to("d")
    top = os.open(tmp_path, os.O_PATH)
    try:
        if not linux.has_openat2(top):
            pytest.skip("no openat2 on this kernel")
        os.close(linux.openat2(top, "d/f", os.O_RDONLY))
        for path, err in (("link/f", errno.ELOOP), ("../x", errno.EXDEV), ("/etc", errno.EXDEV),
                          ("missing", errno.ENOENT)):
            with pytest.raises(OSError) as info:
                linux.openat2(top, path, os.O_RDONLY)
            assert info.value.errno == err, path
    finally:
        os.close(top)
    assert not linux.has_openat2(-1)  # a failure of the probe means: resolve per component


def test_getdents64_errors():
    with pytest.raises(OSError) as info:
        linux.getdents64(-1)
    assert info.value.errno == errno.EBADF


def test_fallocate_reserves_blocks_and_says_when_a_filesystem_cannot(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        linux.fallocate(fd, 0, 1 << 20)
        st = os.fstat(fd)
        assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
    finally:
        os.close(fd)
    # procfs has no fallocate: the system call says so (glibc's posix_fallocate would try to
    # emulate it by writing into the file instead)
    comm = os.open("/proc/thread-self/comm", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            linux.fallocate(comm, 0, 4096)
        assert info.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(comm)


def test_madvise_populates_and_unmaps_a_shared_file_mapping(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 1 << 20) as mapping, memoryview(mapping) as view:
        address = linux.address_of(view)
        try:
            linux.madvise(address, 1 << 20, linux.MADV_POPULATE_WRITE)
        except OSError as e:
            assert e.errno == errno.EINVAL  # a kernel before 5.14
        else:
            assert mapped_kib(str(path)) == 1024  # every page mapped, none touched by us
        view[:5] = b"bytes"
        linux.madvise(address, 1 << 20, linux.MADV_DONTNEED)
        assert mapped_kib(str(path)) == 0
        assert view[:5] == b"bytes"  # a shared mapping: the bytes stay in the file's pages
        with pytest.raises(OSError) as info:
            linux.madvise(address + 1, 4096, linux.MADV_DONTNEED)
        assert info.value.errno == errno.EINVAL


def test_a_stamp_is_what_fstat_says_and_moves_with_a_write(tmp_path):
    """linux.stamp unpacks struct statx by offset: a wrong one would let a foreign write into
    a cache file go unnoticed (store._notice_foreign_writes)."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * 5000, 0)
        os.link(tmp_path / "f", tmp_path / "g")  # nlink 2
        st = os.fstat(fd)
        assert linux.stamp(fd) == (5000, st.st_ctime_ns, st.st_mtime_ns, 2)
        os.utime(fd, ns=(1, 1_234_567_891))  # an mtime set back: ctime moves anyway
        os.pwrite(fd, b"y", 9000)
        st = os.fstat(fd)
        assert linux.stamp(fd) == (9001, st.st_ctime_ns, st.st_mtime_ns, 2)
    finally:
        os.close(fd)


def test_a_nonblocking_read_with_nothing_to_read_says_so():
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        buffer = (ctypes.c_char * 16)()
        with pytest.raises(BlockingIOError):
            linux.read_nowait(read_end, buffer)
        os.write(write_end, b"request")
        assert linux.read_nowait(read_end, buffer) == 7 and buffer.raw[:7] == b"request"
    finally:
        os.close(read_end)
        os.close(write_end)
