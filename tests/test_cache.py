"""The cache persists, is validated, and is never trusted blindly: counted against a source
that counts its own reads (countingfs), across remounts, source changes, crashes and damage."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

from fusecache.store import summarize_index

from .conftest import file_bytes, run_cli
from .helpers import fill, resident_fraction

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_each_byte_read_once_and_remount_reads_nothing(counting_source, make_mount):
    contents = fill(counting_source.real, {"a.safetensors": 10 * MiB + 3, "b.bin": 6 * MiB, "c/d.txt": 5000})
    counting_source.start()
    m = make_mount(counting_source.path)
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    m.unmount()
    total = sum(map(len, contents.values()))
    assert counting_source.total() == total
    assert counting_source.counts() == {name: len(data) for name, data in contents.items()}

    m.mount()
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    assert counting_source.total() == total, "a warm remount read from the source"
    metrics = m.metrics()
    assert metrics["bytes_from_source"] == 0
    assert metrics["bytes_served"] == total


def test_source_change_is_noticed(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.bin").write_bytes(b"A" * (5 * MiB))
    (source / "gone.txt").write_text("bye")
    m = make_mount(source, ["attr_timeout=0.2"])
    assert file_bytes(m.mountpoint / "f.bin") == b"A" * (5 * MiB)
    # rewrite in place with the same size: only mtime/ctime tell
    (source / "f.bin").write_bytes(b"B" * (5 * MiB))
    (source / "gone.txt").unlink()
    (source / "new.txt").write_text("hi")
    time.sleep(0.5)
    assert file_bytes(m.mountpoint / "f.bin") == b"B" * (5 * MiB)
    assert sorted(os.listdir(m.mountpoint)) == ["f.bin", "new.txt"]
    # a different size is noticed too, and the cached copy follows the source again
    (source / "f.bin").write_bytes(b"C" * 1000)
    time.sleep(0.5)
    assert os.path.getsize(m.mountpoint / "f.bin") == 1000
    assert file_bytes(m.mountpoint / "f.bin") == b"C" * 1000


def test_kill9_then_remount_serves_correct_bytes_and_keeps_what_was_cached(counting_source, make_mount):
    contents = fill(counting_source.real, {"big.bin": 24 * MiB}, seed=2)
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M"])
    with open(m.mountpoint / "big.bin", "rb") as f:
        assert f.read(8 * MiB) == contents["big.bin"][:8 * MiB]
    m.kill9()
    before_crash = counting_source.total()
    assert before_crash < 24 * MiB
    [index] = m.cache_dir.rglob("*.idx")
    cached_at_crash = summarize_index(index)["cached"]
    assert 8 * MiB <= cached_at_crash <= before_crash
    # the dead daemon left a stale mount ("Transport endpoint is not connected"); mount cleans it
    with pytest.raises(OSError) as info:
        os.listdir(m.mountpoint)  # a listing asks the daemon; a stat may be answered from cached attributes
    assert info.value.errno == errno.ENOTCONN
    m.mount()
    assert file_bytes(m.mountpoint / "big.bin") == contents["big.bin"]
    # what was recorded as cached before the crash was not fetched again
    assert counting_source.total() - before_crash == 24 * MiB - cached_at_crash


def test_damaged_cache_file_is_detected_and_refetched(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    data = random.Random(9).randbytes(12 * MiB)
    (source / "w.bin").write_bytes(data)
    m = make_mount(source)
    assert file_bytes(m.mountpoint / "w.bin") == data
    m.unmount()
    data_files = list(m.cache_dir.rglob("*.data"))
    assert len(data_files) == 1
    with open(data_files[0], "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xff" * 100)
    m.mount()
    assert file_bytes(m.mountpoint / "w.bin") == data
    assert m.metrics()["checksum_failures"] == 1


def test_second_mount_of_same_source_on_same_cache_refuses(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    (source / "x").write_text("x")
    first = make_mount(source)
    second = make_mount(source, cache_dir=first.cache_dir, mount=False)
    result = run_cli("mount", source, second.mountpoint, "--cache-dir", first.cache_dir, check=False)
    assert result.returncode == 1
    assert "in use by another fusecache mount" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # a different source shares the same cache dir safely
    other = tmp_path / "other"
    other.mkdir()
    (other / "y").write_text("y")
    third = make_mount(other, cache_dir=first.cache_dir)
    assert (third.mountpoint / "y").read_text() == "y"
    assert (first.mountpoint / "x").read_text() == "x"


def test_source_read_error_gives_eio_and_daemon_keeps_serving(counting_source, make_mount):
    contents = fill(counting_source.real, {"bad.bin": 8 * MiB, "good.bin": 3 * MiB}, seed=4)
    counting_source.start()
    counting_source.set_faults({"bad.bin": {"eio_from": 6 * MiB}})
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M"])
    with open(m.mountpoint / "bad.bin", "rb") as f:
        assert f.read(4 * MiB) == contents["bad.bin"][:4 * MiB]
        f.seek(7 * MiB)
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    assert file_bytes(m.mountpoint / "good.bin") == contents["good.bin"]
    assert m.metrics()["fetch_errors"] >= 1
    # the fault clears: a later read retries and succeeds
    counting_source.set_faults({})
    with open(m.mountpoint / "bad.bin", "rb") as f:
        f.seek(7 * MiB)
        assert f.read(4096) == contents["bad.bin"][7 * MiB:7 * MiB + 4096]


def test_damaged_or_older_format_index_is_removed_at_start(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {"a.bin": 3 * MiB, "b.bin": MiB, "c.bin": 2 * MiB}, seed=5)
    m = make_mount(source, ["readahead=off"])
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    m.unmount()
    index_a, index_b, index_c = sorted(m.cache_dir.rglob("*.idx"), key=lambda p: summarize_index(p)["path"])
    raw = index_a.read_bytes()  # the header of an older format: another checksum
    index_a.write_bytes(raw.replace(b'"checksum": "xxh3_64"', b'"checksum": "crc32"  '))
    with open(index_c, "r+b") as f:  # records torn part-way
        f.truncate(len(index_c.read_bytes()) - 5)
    m.mount()
    for gone in (index_a, index_c):
        assert not gone.exists() and not gone.with_suffix(".data").exists()
    assert index_b.exists()
    assert {f["path"]: f["cached"] for f in m.status()["files"]} == {"b.bin": MiB}
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data


def test_the_source_is_not_left_in_memory_beside_the_cache(tmp_path, make_mount):
    """Issue 20, item 3: every chunk the daemon read from a buffered source stayed in the
    source's page cache, a second copy of the checkpoint in RAM beside the cache."""
    src = tmp_path / "src"  # on disk: a buffered source, as Lustre or NFS
    src.mkdir()
    data = os.urandom(32 * MiB)
    (src / "model.safetensors").write_bytes(data)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
    m = make_mount(src)
    assert file_bytes(m.mountpoint / "model.safetensors") == data
    assert m.metrics()["bytes_from_source"] == len(data)
    assert resident_fraction(src / "model.safetensors") <= 0.05


def test_a_disk_cache_is_not_kept_in_memory_beside_the_mount(tmp_path, make_mount):
    """Issue 22, item 3: served through the daemon (no passthrough), a disk cache file's pages
    stayed resident beside the mount's own pages of the same bytes: the model twice in RAM."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(32 * MiB)
    (src / "model.safetensors").write_bytes(data)
    m = make_mount(src)  # passthrough=off: every byte through the daemon
    run_cli("prefetch", m.mountpoint / "model.safetensors")
    m.unmount()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
    m.mount()
    assert file_bytes(m.mountpoint / "model.safetensors") == data
    assert m.metrics()["bytes_served_from_cache"] == len(data)
    (cache_file,) = m.cache_dir.rglob("*.data")
    assert resident_fraction(cache_file) <= 0.10
