"""Fetching ahead of a sequential reader: which chunks after a read to start fetching.

A sequential reader that runs ahead of its file's stream (or of a file nothing streams) would
otherwise stall once per chunk. So a read that continues its handle's last one starts demand
flights for the `sequential_window` bytes after it, without waiting for them
(Fetcher.start_ahead: speculative flights that yield to real demand). This part only decides
which chunks; it keeps, per handle, where the last read ended (`Handle.next_offset`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MountConfig
from .files import Handle


@dataclass(frozen=True)
class SequentialWindow:
    """How far to fetch ahead of a sequential reader."""

    chunk_size: int
    window: int  # bytes fetched ahead of a sequential reader (0: none)

    @classmethod
    def from_mount(cls, cfg: MountConfig) -> SequentialWindow:
        """Nothing is fetched ahead with readahead=off: the user asked for no speculative reads."""
        return cls(chunk_size=cfg.chunk_size, window=0 if cfg.readahead == "off" else cfg.sequential_window)

    def after(self, handle: Handle, offset: int, length: int) -> range:
        """Record where this read of handle ends; the chunks after it to fetch ahead: the
        window if the read continues the handle's last one (within a chunk of it: the kernel's
        readahead has several requests of one reader in flight, which may arrive out of order),
        else none."""
        sequential = handle.next_offset is not None and abs(offset - handle.next_offset) <= self.chunk_size
        handle.next_offset = offset + length
        if not sequential or not self.window:
            return range(0)
        entry = handle.tracked.entry
        first = entry.chunks_for(offset, length).stop
        return range(first, min(first + -(-self.window // self.chunk_size), entry.nchunks))
