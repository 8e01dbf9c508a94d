"""Synthetic sharded safetensors checkpoints, and loading them the way inference engines do.

Used by the demo, the tests and the benchmarks: a checkpoint of a given size, split into
shards with a model.safetensors.index.json, tensors of varied sizes, contents seeded so every
run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

log = logging.getLogger(__name__)

MiB = 1 << 20


def write_checkpoint(directory: Path, total_bytes: int, shards: int = 4, seed: int = 0,
                     min_tensor: int = 1 * MiB, max_tensor: int = 16 * MiB) -> list[Path]:
    """Write shards model-0000i-of-0000n.safetensors and the index; return the shard paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_shard = total_bytes // shards
    weight_map: dict[str, str] = {}
    paths = []
    counter = 0
    held = 0  # the tensors' bytes: each rounded to whole float32s, so not quite total_bytes
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        written = 0
        while written < per_shard:
            size = min(rng.randint(min_tensor, max_tensor), per_shard - written)
            size = max(4, size // 4 * 4)
            key = f"layers.{counter}.weight"
            tensors[key] = np.frombuffer(rng.randbytes(size), dtype=np.float32)
            weight_map[key] = name
            written += size
            held += size
            counter += 1
        save_file(tensors, str(directory / name))
        paths.append(directory / name)
    index = {"metadata": {"total_size": held}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return paths


def shard_paths(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def load_digest(directory: Path, order_seed: int | None = None) -> str:
    """Load every tensor of every shard with safe_open (mmap), in a shuffled order when a
    seed is given (as data-parallel ranks do), and return a digest independent of the order."""
    items = []
    for path in shard_paths(directory):
        with safe_open(str(path), framework="np") as f:
            items += [(path.name, key) for key in f.keys()]
    if order_seed is not None:
        random.Random(order_seed).shuffle(items)
    digests = {}
    handles: dict[str, object] = {}
    try:
        for shard, key in items:
            if shard not in handles:
                handles[shard] = safe_open(os.path.join(directory, shard), framework="np").__enter__()
            tensor = handles[shard].get_tensor(key)
            digests[f"{shard}/{key}"] = hashlib.sha256(tensor.tobytes()).hexdigest()
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(f"{name}={digests[name]}\n".encode())
    return combined.hexdigest()
