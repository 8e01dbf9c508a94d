"""Synthetic checkpoints (fusecache.checkpoint): they load to the same digest in any order,
and one flipped byte changes it."""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from fusecache import checkpoint


def test_a_synthetic_checkpoint_loads_to_the_same_digest_in_any_order(tmp_path):
    kib = 1024
    shards = checkpoint.write_checkpoint(tmp_path / "a", 512 * kib, shards=2, seed=1,
                                         min_tensor=16 * kib, max_tensor=64 * kib)
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert checkpoint.shard_paths(tmp_path / "a") == shards
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    digest = checkpoint.load_digest(tmp_path / "a")
    assert checkpoint.load_digest(tmp_path / "a", order_seed=7) == digest
    checkpoint.write_checkpoint(tmp_path / "b", 512 * kib, shards=2, seed=1, min_tensor=16 * kib, max_tensor=64 * kib)
    assert checkpoint.load_digest(tmp_path / "b") == digest  # seeded: the same bytes every run
    with open(shards[1], "r+b") as f:  # one flipped byte of tensor data changes the digest
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert checkpoint.load_digest(tmp_path / "a") != digest


def test_the_index_says_how_many_bytes_the_tensors_hold(tmp_path):
    """Each tensor is rounded to whole float32s and shards split the total: the index's
    total_size said the total asked for, not what the shards hold (loaders check it). (Found by
    review.)"""
    checkpoint.write_checkpoint(tmp_path, 2 * 65536 + 7, shards=2, min_tensor=4096, max_tensor=65536)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    held = 0
    for shard in checkpoint.shard_paths(tmp_path):
        with safe_open(str(shard), framework="np") as f:
            held += sum(f.get_tensor(key).nbytes for key in f.keys())
    assert held == index["metadata"]["total_size"]
