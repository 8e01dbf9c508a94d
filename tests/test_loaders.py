"""A checkpoint loaded through the mount as the major loaders open it: safetensors `safe_open`
(mmap, what vLLM and SGLang use), plain `read()`, `O_DIRECT` reads into aligned buffers (what
fastsafetensors does) and safetensors' `load_file` of each shard; with the cache on disk and
on tmpfs; served by the daemon and by the kernel's passthrough. Each must see exactly the
source's bytes. (Torch's `load_file` reads the file as
numpy's does: torch is not a dependency here.)"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fusecache.checkpoint import load_digest, shard_paths, write_checkpoint

from .conftest import SESSION

pytestmark = pytest.mark.fuse

MiB = 1 << 20
ALIGN = 4096


def read_whole(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_direct(path: Path) -> bytes:
    """As fastsafetensors reads: O_DIRECT, page-aligned buffers and offsets, 8 MiB at a time;
    the last read asks for a whole aligned block and gets the file's tail."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 8 * MiB)  # anonymous mappings are page-aligned
    out = bytearray()
    try:
        offset = 0
        while offset < size:
            want = min(len(buf), -(-(size - offset) // ALIGN) * ALIGN)
            n = os.preadv(fd, [memoryview(buf)[:want]], offset)
            assert n > 0, f"short O_DIRECT read at {offset}"
            out += buf[:n]
            offset += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


@pytest.fixture
def checkpoint(tmp_path):
    source = tmp_path / "src"
    write_checkpoint(source / "model", 40 * MiB, shards=4, seed=11, max_tensor=6 * MiB)
    return source


@pytest.mark.parametrize("passthrough", ["off", "on"])
@pytest.mark.parametrize("loader", ["safe_open", "read", "o_direct", "load_file"])
def test_every_loader_gets_the_sources_bytes(checkpoint, make_mount, cache_location, loader, passthrough):
    m = make_mount(checkpoint, cache_dir=cache_location, options=[f"passthrough={passthrough}"])
    source_dir, mounted_dir = checkpoint / "model", m.mountpoint / "model"
    if loader == "safe_open":
        assert load_digest(mounted_dir, order_seed=3) == load_digest(source_dir)
    for shard in shard_paths(source_dir):
        through = mounted_dir / shard.name
        expected = read_whole(shard)
        if loader == "read":
            assert hashlib.sha256(read_whole(through)).digest() == hashlib.sha256(expected).digest()
        elif loader == "o_direct":
            assert hashlib.sha256(read_direct(through)).digest() == hashlib.sha256(expected).digest()
        elif loader == "load_file":
            ours, theirs = load_file(str(through)), load_file(str(shard))
            assert ours.keys() == theirs.keys()
            assert all(ours[k].tobytes() == theirs[k].tobytes() for k in theirs)  # random bits: NaNs too
    # each byte came from the source once, whatever the open mode
    metrics = m.metrics()
    if passthrough == "on" and SESSION == "kernel":  # opens wait for their shard's stream
        assert metrics["passthrough_opens"] >= 1, metrics
    assert metrics["bytes_from_source"] <= sum(p.stat().st_size for p in shard_paths(source_dir)) + \
        (checkpoint / "model" / "model.safetensors.index.json").stat().st_size
