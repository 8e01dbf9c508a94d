"""The fill's copy inside the kernel (kernelcopy.py), on real files, in process.

What it proves: a copy lands at the same offset as it was read, whole or up to the source's
end; between two filesystems, where the kernel refuses (EXDEV), Unsupported says so, nothing
is copied and the refusal is remembered for that source filesystem, so the caller reads from
then on, while sources on another filesystem still copy; errors that are not refusals (a full
cache) are the caller's and leave the copy on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fusecache import kernelcopy
from fusecache.kernelcopy import KernelCopy, Unsupported

MiB = 1 << 20


def pair(source_dir: Path, target_dir: Path, data: bytes) -> tuple[int, int]:
    (source_dir / "s").write_bytes(data)
    return (os.open(source_dir / "s", os.O_RDONLY | os.O_NONBLOCK),  # as the daemon opens sources
            os.open(target_dir / "t", os.O_RDWR | os.O_CREAT, 0o600))


def test_a_copy_lands_at_its_offset_whole_or_up_to_the_sources_end(tmp_path):
    data = os.urandom(3 * MiB + 100)
    src, dst = pair(tmp_path, tmp_path, data)
    kernel = KernelCopy()
    assert kernel.copy(src, dst, MiB, MiB) == MiB
    assert kernel.copy(src, dst, 2 * MiB, 2 * MiB) == MiB + 100  # the source ends there
    assert os.pread(dst, 4 * MiB, 0) == bytes(MiB) + data[MiB:]
    os.close(src)
    os.close(dst)


def test_between_two_filesystems_the_caller_is_told_to_read_and_that_is_remembered(tmp_path, monkeypatch):
    other = Path("/dev/shm")
    if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("tmp_path is on /dev/shm: no second filesystem to copy across")
    target = other / f"fusecache-test-{os.getpid()}"
    target.mkdir()
    try:
        src, dst = pair(tmp_path, target, os.urandom(MiB))
        kernel = KernelCopy()
        with pytest.raises(Unsupported):  # EXDEV
            kernel.copy(src, dst, 0, MiB)
        assert kernel.refused == {os.stat(tmp_path).st_dev} and os.fstat(dst).st_size == 0

        def asked(*args: int) -> int:
            raise AssertionError("asked again")
        monkeypatch.setattr(os, "copy_file_range", asked)
        with pytest.raises(Unsupported):
            kernel.copy(src, dst, 0, MiB)
        monkeypatch.undo()
        same = os.open(target / "u", os.O_RDWR | os.O_CREAT, 0o600)  # a source on the cache's filesystem still copies
        (target / "s").write_bytes(b"x" * MiB)
        near = os.open(target / "s", os.O_RDONLY)
        assert kernel.copy(near, same, 0, MiB) == MiB and os.pread(same, MiB, 0) == b"x" * MiB
        for fd in (src, dst, same, near):
            os.close(fd)
    finally:
        for name in os.listdir(target):
            os.unlink(target / name)
        target.rmdir()


def test_a_full_cache_is_the_callers_error_not_a_refusal(tmp_path, monkeypatch):
    def full(*args: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    src, dst = pair(tmp_path, tmp_path, os.urandom(MiB))
    kernel = KernelCopy()
    monkeypatch.setattr(kernelcopy, "_copy_file_range", full)
    with pytest.raises(OSError) as failure:
        kernel.copy(src, dst, 0, MiB)
    assert failure.value.errno == errno.ENOSPC and not kernel.refused  # still the way to copy
    os.close(src)
    os.close(dst)
