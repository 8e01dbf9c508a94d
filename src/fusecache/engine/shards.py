"""The checkpoint policy: which files a first open streams into the cache, and in what order.

Inference engines load a checkpoint as a directory of shards (`model-00001-of-00163.safetensors`
...), each mmapped and faulted in scattered order. The first time a shard of a directory is
opened, every sibling shard is queued too, in the order of the directory's checkpoint index
(`model.safetensors.index.json`: the order of its `weight_map`, which is the order loaders walk
the tensors), then by name. Everything here is advice: an index that cannot be read or parsed
is logged and ignored.
"""

from __future__ import annotations

import json
import logging
import re
import stat as stat_mod

from ..source import Source, is_valid_name

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_INDEX_FILE_RE = re.compile(r".*\.index\.json$")
# A checkpoint index is a few MiB even for the largest models; anything bigger is not one, and
# reading it whole would cost the daemon its memory.
MAX_INDEX_SIZE = 64 << 20
# The largest checkpoints have a few thousand shards; a directory of more entries is a dataset
# (or a hostile tree), whose listing and streaming would cost the daemon memory and the cache
# everything in it.
MAX_DIRECTORY_ENTRIES = 50_000


def is_shard(relpath: str) -> bool:
    return relpath.endswith(SHARD_SUFFIXES)


class CheckpointPolicy:
    """Which files an open streams, and the sibling shards of a first shard in index order."""

    def __init__(self, source: Source, readahead: str, min_size: int) -> None:
        """readahead: 'shards' (checkpoint shards and their siblings), 'all' (any file) or
        'off'; files smaller than min_size are never streamed automatically."""
        self.source = source
        self.readahead = readahead
        self.min_size = min_size
        self._scanned_dirs: set[str] = set()

    def streams_on_open(self, relpath: str, size: int) -> bool:
        """Whether opening relpath streams it whole."""
        return (self.readahead != "off" and size >= self.min_size
                and (self.readahead == "all" or is_shard(relpath)))

    def first_in_directory(self, relpath: str) -> bool:
        """Whether relpath is the first shard opened in its directory in this mount (its
        siblings are then to be queued); the directory counts as scanned from now on."""
        parent = relpath.rpartition("/")[0]
        if not is_shard(relpath) or parent in self._scanned_dirs:
            return False
        self._scanned_dirs.add(parent)
        return True

    def rescan_later(self, relpath: str) -> None:
        """Listing relpath's directory failed: try again at the next open."""
        self._scanned_dirs.discard(relpath.rpartition("/")[0])

    def sibling_shards(self, relpath: str) -> list[str]:
        """Worker thread: the other shards in relpath's directory, in checkpoint index order,
        then by name."""
        parent = relpath.rpartition("/")[0]
        entries = self.source.listdir(parent, MAX_DIRECTORY_ENTRIES)
        if entries is None:
            log.info("%s holds more than %d entries, no checkpoint's: its other shards are not streamed",
                     parent or "the source's root", MAX_DIRECTORY_ENTRIES)
            return []
        shards = {
            self.source.child(parent, name)
            for name, st in entries
            if is_shard(name) and stat_mod.S_ISREG(st.st_mode) and st.st_size >= self.min_size
        }
        ordered: dict[str, None] = {}  # a dict: membership at once, for an index of any length
        for name, _st in entries:
            if _INDEX_FILE_RE.match(name):
                ordered |= dict.fromkeys(p for p in self._index_order(parent, name) if p in shards)
        ordered |= dict.fromkeys(sorted(shards - ordered.keys()))
        return [p for p in ordered if p != relpath]

    def _index_order(self, parent: str, index_name: str) -> list[str]:
        try:
            weight_map = json.loads(self.source.read_small(self.source.child(parent, index_name),
                                                           MAX_INDEX_SIZE)).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError("its weight_map is not an object")
        except (OSError, ValueError, AttributeError) as e:
            log.info("ignoring checkpoint index %s: %s", index_name, e)
            return []
        # only names of files in the index's own directory
        names = dict.fromkeys(v for v in weight_map.values() if isinstance(v, str) and is_valid_name(v))
        return [self.source.child(parent, name) for name in names]
