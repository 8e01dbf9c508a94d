"""How a rank loads a safetensors checkpoint, and the digest that proves it got the right bytes.

Two layouts, as inference engines have them:
- `dp` (data parallel): every rank loads every tensor, each in its own shuffled order;
- `tp` (tensor parallel): every rank loads its 1/world slice of every tensor (rows
  [n*rank/world, n*(rank+1)/world)), also in its own order.
Tensors come from `safe_open` (an mmap of the shard, as engines use it) and are hashed where
they land, without an extra copy, so a rank's memory is what an engine's would be.

The digest of a rank does not depend on its order, so it is compared with the digest of the
same layout computed on the source files. Each tensor is checked with crc32, which catches
wrong or missing bytes at twice sha256's speed: on a 2-core machine the check must not become
the bottleneck of every system alike.

`start_prefetch` is the engines' own remedy for network filesystems (SGLang PR 20843, vLLM
PR 36012): a background thread in which a pool of threads reads this rank's share of the
shards, sorted_files[rank::world], in 16 MiB blocks, to warm the page cache while the rank
loads.
"""

from __future__ import annotations

import hashlib
import random
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

LAYOUTS = ("dp", "tp")
PREFETCH_BLOCK = 16 << 20


def shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def digest(directory: Path, rank: int, world: int, layout: str) -> str:
    """Load this rank's part of the checkpoint in this rank's order; return its digest."""
    with ExitStack() as stack:
        handles = {path.name: stack.enter_context(safe_open(str(path), framework="np"))
                   for path in shards(directory)}
        items = [(name, key) for name, handle in handles.items() for key in handle.keys()]
        random.Random(rank).shuffle(items)
        parts = {}
        for name, key in items:
            if layout == "dp":
                label, tensor = f"{name}/{key}", handles[name].get_tensor(key)
            else:
                view = handles[name].get_slice(key)
                rows = view.get_shape()[0]
                lo, hi = rows * rank // world, rows * (rank + 1) // world
                label, tensor = f"{name}/{key}[{lo}:{hi}]", view[lo:hi]
            parts[label] = f"{zlib.crc32(tensor):08x}:{tensor.nbytes}"
    combined = hashlib.sha256()
    for label in sorted(parts):
        combined.update(f"{label}={parts[label]}\n".encode())
    return combined.hexdigest()


def start_prefetch(directory: Path, rank: int, world: int, threads: int) -> threading.Thread:
    """Warm the page cache with this rank's share of the shards, in the background."""
    mine = shards(directory)[rank::world]

    def prefetch_all() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(_read_through, mine))

    thread = threading.Thread(target=prefetch_all, name="prefetch", daemon=True)
    thread.start()
    return thread


def _read_through(path: Path) -> None:
    buf = bytearray(PREFETCH_BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
