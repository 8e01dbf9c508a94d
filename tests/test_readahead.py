"""Coordinated readahead: one pass over the source whatever the readers do, demand reads
jumping the queue, bounded memory, and the prefetch/status commands."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusecache.checkpoint import load_digest, write_checkpoint

from .conftest import file_bytes, run_cli

pytestmark = pytest.mark.fuse

MiB = 1 << 20
ROOT = Path(__file__).parent.parent


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def shard_sizes(directory: Path) -> dict[str, int]:
    return {f"model/{p.name}": p.stat().st_size for p in directory.glob("*.safetensors")}


def open_one_shard_and_wait_for_all(counting_source, m, shard: str) -> dict[str, int]:
    """Touch one shard through the mount; wait until the source has served every shard whole."""
    with open(m.mountpoint / "model" / shard, "rb") as f:
        f.read(8)
    sizes = shard_sizes(counting_source.real / "model")
    wait_until(lambda: {k: v for k, v in counting_source.counts().items() if k in sizes} == sizes)
    return sizes


def test_concurrent_ranks_in_different_orders_read_each_byte_once(counting_source, make_mount):
    write_checkpoint(counting_source.real / "model", 48 * MiB, shards=4, seed=11)
    expected = load_digest(counting_source.real / "model")
    counting_source.start()
    m = make_mount(counting_source.path, ["stream_read_size=8M", "streams=2"])
    code = "import sys; from tests.helpers import print_load_digest; print_load_digest(sys.argv[1], int(sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(m.mountpoint / "model"), str(rank)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for rank in range(6)]
    digests = [p.communicate(timeout=180)[0].strip() for p in procs]
    assert digests == [expected] * 6
    sizes = shard_sizes(counting_source.real / "model")
    index_size = (counting_source.real / "model" / "model.safetensors.index.json").stat().st_size
    counts = counting_source.counts()
    # every shard read from the source exactly once, counted by the source itself
    assert {k: v for k, v in counts.items() if k.endswith(".safetensors")} == sizes
    assert counts.get("model/model.safetensors.index.json", 0) <= index_size
    # the daemon's own counter agrees (it counts cached data; the index was read for ordering)
    assert m.metrics()["bytes_from_source"] == sum(sizes.values())


def test_opening_one_shard_streams_its_siblings(counting_source, make_mount):
    write_checkpoint(counting_source.real / "model", 24 * MiB, shards=3, seed=12)
    (counting_source.real / "model" / "notes.txt").write_text("not a shard")
    counting_source.start()
    m = make_mount(counting_source.path)
    sizes = open_one_shard_and_wait_for_all(counting_source, m, "model-00002-of-00003.safetensors")
    assert "model/notes.txt" not in counting_source.counts()
    files = {f["path"]: f for f in m.status()["files"]}
    assert all(files[name]["cached"] == size for name, size in sizes.items())


def test_readahead_off_fetches_only_what_is_read(counting_source, make_mount):
    write_checkpoint(counting_source.real / "model", 24 * MiB, shards=3, seed=13)
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M"])
    with open(m.mountpoint / "model" / "model-00001-of-00003.safetensors", "rb") as f:
        f.read(8)
    time.sleep(1.0)  # give a (wrongly) started stream time to show up in the counts
    assert sum(counting_source.counts().values()) <= 2 * MiB


def test_demand_read_jumps_ahead_of_the_stream(counting_source, make_mount):
    data = bytes(range(256)) * (64 * MiB // 256)
    (counting_source.real / "huge.safetensors").write_bytes(data)
    counting_source.start()
    # a slow link: every source read of the file waits, so streaming it (one read at a time) takes a while
    counting_source.set_faults({"huge.safetensors": {"delay": 0.05}})
    m = make_mount(counting_source.path, ["chunk_size=1M", "stream_read_size=4M", "streams=1", "fill_reads_max=1"])
    with open(m.mountpoint / "huge.safetensors", "rb") as f:
        f.read(1)  # first open: the stream starts at the beginning
        f.seek(len(data) - MiB)
        assert f.read(MiB) == data[-MiB:]
    # the tail was served while the stream was still far from it
    assert counting_source.total() < len(data) // 2
    counting_source.set_faults({})
    wait_until(lambda: counting_source.total() == len(data))
    assert file_bytes(m.mountpoint / "huge.safetensors") == data
    assert counting_source.total() == len(data)


def test_daemon_memory_stays_bounded_over_a_large_file(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    size = 384 * MiB
    with open(source / "big.safetensors", "wb") as f:
        block = bytes(range(256)) * (MiB // 256)
        for _ in range(size // MiB):
            f.write(block)
    m = make_mount(source, ["stream_read_size=16M", "streams=2", "fill_reads_max=4"])
    run_cli("prefetch", m.mountpoint / "big.safetensors", "--json")
    assert file_bytes(m.mountpoint / "big.safetensors")[-MiB:] == block
    peak_kib = int(next(line.split()[1] for line in open(f"/proc/{m.pid}/status") if line.startswith("VmHWM")))
    # interpreter + libraries + 4 stream buffers + 8 demand buffers + reply buffers; far below the file
    assert peak_kib * 1024 < 200 * MiB, f"daemon peak RSS {peak_kib} KiB"


def test_prefetch_progress_and_status(counting_source, make_mount):
    write_checkpoint(counting_source.real / "a", 16 * MiB, shards=2, seed=14)
    write_checkpoint(counting_source.real / "b", 8 * MiB, shards=2, seed=15)
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off"])
    result = run_cli("prefetch", m.mountpoint / "a", m.mountpoint / "b" / "model-00001-of-00002.safetensors")
    assert "ETA" in result.stderr
    expected_files = [p for p in (counting_source.real / "a").iterdir()] + \
                     [counting_source.real / "b" / "model-00001-of-00002.safetensors"]
    total = sum(p.stat().st_size for p in expected_files)
    assert counting_source.total() == total
    report = json.loads(run_cli("prefetch", m.mountpoint / "a", "--json").stdout)
    assert report[0]["files"] == 3 and report[0]["bytes"] == total - expected_files[-1].stat().st_size
    assert report[0]["cached"] == report[0]["bytes"]
    assert counting_source.total() == total, "prefetching cached files again read the source"
    queued = json.loads(run_cli("prefetch", m.mountpoint / "b", "--no-wait", "--json").stdout)
    assert "cached" not in queued[0]
    status = m.status()
    files = {f["path"]: f for f in status["files"]}
    wait_until(lambda: all(f["cached"] == f["size"] for f in m.status()["files"]))
    assert files["a/model-00001-of-00002.safetensors"]["cached"] == files["a/model-00001-of-00002.safetensors"]["size"]
    assert status["metrics"]["bytes_from_source"] >= total


def test_malformed_checkpoint_index_is_ignored(counting_source, make_mount):
    write_checkpoint(counting_source.real / "model", 16 * MiB, shards=2, seed=16)
    index = counting_source.real / "model" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    counting_source.start()
    m = make_mount(counting_source.path)
    # the siblings are still streamed (in name order) and the daemon keeps serving
    open_one_shard_and_wait_for_all(counting_source, m, "model-00001-of-00002.safetensors")
    assert load_digest(m.mountpoint / "model") == load_digest(counting_source.real / "model")


def test_prefetch_fetches_files_automatic_readahead_skips(tmp_path, make_mount):
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.bin").write_bytes(b"x" * 100_000)
    m = make_mount(source, ["readahead_min_size=1G"])
    result = json.loads(run_cli("prefetch", m.mountpoint / "small.bin", "--json", timeout=30).stdout)
    assert result[0]["cached"] == 100_000 and not result[0]["errors"]


def test_prefetch_fetches_a_file_changed_since_its_last_prefetch(counting_source, make_mount):
    (counting_source.real / "a.bin").write_bytes(random.Random(17).randbytes(4 * MiB))
    counting_source.start()
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M"])
    run_cli("prefetch", m.mountpoint / "a.bin", timeout=30)
    for size in (4 * MiB, 6 * MiB):  # replaced by one of the same size, then by a bigger one
        before = counting_source.total()
        (counting_source.real / "tmp").write_bytes(random.Random(size).randbytes(size))
        os.rename(counting_source.real / "tmp", counting_source.real / "a.bin")
        [report] = json.loads(run_cli("prefetch", m.mountpoint / "a.bin", "--json", timeout=30).stdout)
        assert report["cached"] == report["bytes"] == size and not report["errors"]
        assert counting_source.total() - before == size


def test_prefetch_of_a_file_replaced_while_streaming_fetches_the_new_version(counting_source, make_mount):
    (counting_source.real / "s.bin").write_bytes(random.Random(18).randbytes(24 * MiB))
    counting_source.start()
    counting_source.set_faults({"s.bin": {"delay": 0.01}})
    m = make_mount(counting_source.path, ["readahead=off", "chunk_size=1M", "stream_read_size=2M", "streams=1",
                                          "fill_reads_max=1"])  # one read at a time: the replacement lands mid-stream
    prefetch = subprocess.Popen([sys.executable, "-m", "fusecache", "prefetch", str(m.mountpoint / "s.bin"), "--json"],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
    wait_until(lambda: counting_source.total() >= 4 * MiB)
    new = random.Random(19).randbytes(8 * MiB)
    (counting_source.real / "tmp").write_bytes(new)
    os.rename(counting_source.real / "tmp", counting_source.real / "s.bin")
    counting_source.set_faults({})
    [report] = json.loads(prefetch.communicate(timeout=60)[0])
    assert prefetch.returncode == 0 and not report["errors"]
    assert report["cached"] == report["bytes"] == len(new)
    before = counting_source.total()
    assert file_bytes(m.mountpoint / "s.bin") == new
    assert counting_source.total() == before, "the prefetched new version was not what got cached"


def test_sequential_reader_has_its_next_chunks_fetched_ahead(counting_source, make_mount):
    data = random.Random(20).randbytes(16 * MiB)
    (counting_source.real / "data.dat").write_bytes(data)  # not a shard: no stream
    counting_source.start()
    m = make_mount(counting_source.path, ["chunk_size=1M", "sequential_window=2M"])
    fd = os.open(m.mountpoint / "data.dat", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: only our reads
        assert os.pread(fd, 4096, 0) == data[:4096]  # a first read (a header): nothing ahead
        time.sleep(0.5)
        assert counting_source.total() == MiB
        assert os.pread(fd, MiB, 4096) == data[4096:MiB + 4096]  # sequential: chunk 1, then 2 and 3
        wait_until(lambda: counting_source.total() == 4 * MiB)
        assert os.pread(fd, MiB, 10 * MiB) == data[10 * MiB:11 * MiB]  # a jump: nothing ahead
        assert os.pread(fd, MiB, 11 * MiB) == data[11 * MiB:12 * MiB]  # sequential again
        wait_until(lambda: counting_source.total() == 4 * MiB + MiB + 3 * MiB)
        time.sleep(0.5)
        assert counting_source.total() == 8 * MiB
    finally:
        os.close(fd)
