"""The fill's copy inside the kernel (kernelcopy.py), on real files, in process.

What it proves: a copy lands at the same offset as it was read, whole or up to the source's
end; between two filesystems the kernel is not even asked (kernels before 5.19 would splice
across them, the way kernelcopy.py says was left out): Unsupported, nothing copied, the
caller reads; a refusal within one filesystem is remembered for it, while sources on another
still copy; errors that are not refusals (a full cache) are the caller's and leave the copy
on. The refusal within a filesystem is injected (every local filesystem here copies): what is
tested is our handling of it, not the kernel's.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from fusecache import kernelcopy
from fusecache.kernelcopy import KernelCopy, Unsupported

MiB = 1 << 20


def pair(source_dir: Path, target_dir: Path, data: bytes) -> tuple[int, int, int]:
    """(source fd, its device, target fd)."""
    (source_dir / "s").write_bytes(data)
    src = os.open(source_dir / "s", os.O_RDONLY | os.O_NONBLOCK)  # as the daemon opens sources
    return src, os.fstat(src).st_dev, os.open(target_dir / "t", os.O_RDWR | os.O_CREAT, 0o600)


def test_a_copy_lands_at_its_offset_whole_or_up_to_the_sources_end(tmp_path):
    data = os.urandom(3 * MiB + 100)
    src, dev, dst = pair(tmp_path, tmp_path, data)
    kernel = KernelCopy()
    assert kernel.copy(src, dev, dst, MiB, MiB) == MiB
    assert kernel.copy(src, dev, dst, 2 * MiB, 2 * MiB) == MiB + 100  # the source ends there
    assert os.pread(dst, 4 * MiB, 0) == bytes(MiB) + data[MiB:]
    os.close(src)
    os.close(dst)


@pytest.fixture
def other_filesystem(tmp_path):
    """A directory on /dev/shm, another filesystem than tmp_path's (skipped where it is not)."""
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("tmp_path is on /dev/shm: no second filesystem")
    directory = Path("/dev/shm") / f"fusecache-test-{os.getpid()}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory)


def test_between_two_filesystems_the_kernel_is_not_asked(tmp_path, other_filesystem, monkeypatch):
    def asked(*args: int) -> int:
        raise AssertionError("copy_file_range asked across filesystems")
    src, dev, dst = pair(tmp_path, other_filesystem, os.urandom(MiB))
    monkeypatch.setattr(os, "copy_file_range", asked)
    kernel = KernelCopy()
    with pytest.raises(Unsupported):
        kernel.copy(src, dev, dst, 0, MiB)
    assert os.fstat(dst).st_size == 0 and not kernel.refused  # not a refusal: nothing to remember
    os.close(src)
    os.close(dst)


def test_a_refusal_is_remembered_for_its_filesystem_only(tmp_path, other_filesystem, monkeypatch):
    def refused(*args: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    src, dev, dst = pair(tmp_path, tmp_path, os.urandom(MiB))
    kernel = KernelCopy()
    monkeypatch.setattr(os, "copy_file_range", refused)
    with pytest.raises(Unsupported):
        kernel.copy(src, dev, dst, 0, MiB)
    assert kernel.refused == {dev}
    monkeypatch.undo()
    with pytest.raises(Unsupported):  # remembered: not asked again
        kernel.copy(src, dev, dst, 0, MiB)
    near, near_dev, same = pair(other_filesystem, other_filesystem, b"x" * MiB)  # another filesystem still copies
    assert kernel.copy(near, near_dev, same, 0, MiB) == MiB and os.pread(same, MiB, 0) == b"x" * MiB
    for fd in (src, dst, near, same):
        os.close(fd)


def test_a_full_cache_is_the_callers_error_not_a_refusal(tmp_path, monkeypatch):
    def full(*args: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    src, dev, dst = pair(tmp_path, tmp_path, os.urandom(MiB))
    kernel = KernelCopy()
    monkeypatch.setattr(kernelcopy, "_copy_file_range", full)
    with pytest.raises(OSError) as failure:
        kernel.copy(src, dev, dst, 0, MiB)
    assert failure.value.errno == errno.ENOSPC and not kernel.refused  # still the way to copy
    os.close(src)
    os.close(dst)
