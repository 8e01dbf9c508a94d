"""The mount's inode numbers: one per version of a path, the same number whenever the kernel
asks again, and memory only for what the kernel holds.

A number is derived from what it names (the path and its version key: the source's identity
of the file and the adapter's epoch) by a 63-bit hash, so a version looked up again after the
kernel forgot it gets the number it had: numbers stay stable for the life of the mount
without a table entry for every path ever seen. Only inodes the kernel holds are kept, each
with its lookup count (raised by LOOKUP and READDIRPLUS replies, lowered by FORGET); at zero
the kernel has no use for the number and the entry goes. Two keys of one hash (a chance of
one in 2^63 per pair) are told apart by probing the next free number while both are held.
"""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass

from . import linux
from .livestate import HeldInode, PathState
from .session.types import FuseError

ROOT_INODE = 1
_FIRST = ROOT_INODE + 1
_MASK = (1 << 63) - 1
# A Python dict keeps its size after deletions: once the kernel has forgotten most of what
# it held, the tables are rebuilt at their size now and the freed memory is given back
# (a full collection and malloc_trim, some milliseconds), again at each quarter while at
# least this many were held. The last release comes with fewer than this held, so what
# the kernel forgets after it (at most this many entries, about 600 bytes each) is kept
# by the allocator until the next release (with 4096, 1-1.5 MiB more of a burst of
# 100,000 lookups stayed).
_COMPACT_FROM = 1024

Version = tuple[int, ...]
Key = tuple[str, Version]


@dataclass
class _Held:
    """An inode the kernel holds: what it names and how many lookups it has not forgotten."""

    key: Key
    lookups: int = 0


@dataclass
class _PathState:
    """A path the kernel holds inodes of: how many, the version seen last, and its epoch
    (moved on by the adapter when the kernel must be given a new inode for the same version)."""

    latest: Version
    held: int = 0
    epoch: int = 0


def _number(key: Key) -> int:
    relpath, version = key
    digest = hashlib.blake2b(repr((relpath, version)).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return max(_FIRST, int.from_bytes(digest, "little") & _MASK)


class InodeTable:
    """Inode numbers of (relative path, version) pairs; for the paths the kernel holds inodes
    of, their latest version and epoch. The root ('') is always ROOT_INODE, with no version."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._numbers: dict[Key, int] = {}
        self._paths: dict[str, _PathState] = {}
        self._peak = 0  # the most inodes held since the tables were last compacted

    def __len__(self) -> int:
        """Inodes the kernel holds (the root not counted)."""
        return len(self._held)

    def version(self, inode: int) -> tuple[str, Version | None]:
        if inode == ROOT_INODE:
            return "", None
        held = self._held.get(inode)
        if held is None:
            raise FuseError(errno.ESTALE)
        return held.key

    def path(self, inode: int) -> str:
        return self.version(inode)[0]

    def is_held(self, inode: int) -> bool:
        """Whether the kernel holds inode (the root always)."""
        return inode == ROOT_INODE or inode in self._held

    def holds(self, relpath: str) -> bool:
        """Whether the kernel holds an inode of relpath (of any version)."""
        return relpath in self._paths

    def epoch(self, relpath: str) -> int:
        state = self._paths.get(relpath)
        return 0 if state is None else state.epoch

    def next_epoch(self, relpath: str) -> None:
        """Later lookups of relpath, a path the kernel holds, give a new inode for its version."""
        self._paths[relpath].epoch += 1

    def inode(self, relpath: str, version: Version) -> int:
        """The number of this version of relpath, now its latest. Not kept: the kernel holds
        a number only once it is given it in a lookup (hold)."""
        if relpath == "":
            return ROOT_INODE
        key = (relpath, version)
        state = self._paths.get(relpath)
        if state is not None:
            state.latest = version
        number = self._numbers.get(key)
        if number is None:
            number = _number(key)
            while number in self._held:  # another key holds it
                number = _FIRST if number >= _MASK else number + 1
        return number

    def hold(self, relpath: str, version: Version) -> int:
        """inode(), given to the kernel in a lookup or readdirplus reply: kept, with one more
        lookup, until the kernel forgets it."""
        number = self.inode(relpath, version)
        if number == ROOT_INODE:
            return number
        held = self._held.get(number)
        if held is None:
            key = (relpath, version)
            held = self._held[number] = _Held(key)
            self._numbers[key] = number
            state = self._paths.setdefault(relpath, _PathState(version))
            state.held += 1
            self._peak = max(self._peak, len(self._held))
        held.lookups += 1
        return number

    def is_latest(self, inode: int) -> bool:
        """Whether a lookup of inode's path gives inode now (no newer version or epoch seen)."""
        relpath, version = self.version(inode)
        state = self._paths.get(relpath)
        return state is None or state.latest == version

    def forget(self, inode: int, nlookup: int) -> None:
        held = self._held.get(inode)
        if held is None:
            return
        held.lookups -= nlookup
        if held.lookups > 0:
            return
        del self._held[inode]
        del self._numbers[held.key]
        relpath = held.key[0]
        state = self._paths[relpath]
        state.held -= 1
        if not state.held:
            del self._paths[relpath]
        if self._peak >= _COMPACT_FROM and len(self._held) <= self._peak // 4:
            self._compact()

    def _compact(self) -> None:
        self._held, self._numbers, self._paths = dict(self._held), dict(self._numbers), dict(self._paths)
        self._peak = len(self._held)
        linux.release_free_memory()

    # ---- a restart's hand-over (livestate.py) ------------------------------------------

    def export_state(self) -> tuple[list[HeldInode], list[PathState]]:
        """The held inodes with their numbers and lookup counts, and their paths' latest
        versions and epochs: what the next daemon needs to answer the kernel's numbers."""
        held = [HeldInode(number, h.key[0], h.key[1], h.lookups) for number, h in self._held.items()]
        paths = [PathState(relpath, s.latest, s.epoch) for relpath, s in self._paths.items()]
        return held, paths

    def import_state(self, held: list[HeldInode], paths: list[PathState]) -> None:
        """Take over export_state() of another table (this one still empty). Numbers are kept
        as given, not derived again: a number probed past a collision stays the same."""
        if self._held:
            raise ValueError("import_state into a table in use")
        for inode in held:
            if inode.number < _FIRST or inode.lookups <= 0 or inode.number in self._held:
                raise ValueError(f"held inode {inode.number} is invalid")
            key = (inode.relpath, tuple(inode.version))
            self._held[inode.number] = _Held(key, inode.lookups)
            self._numbers[key] = inode.number
        counts: dict[str, int] = {}
        for h in self._held.values():
            counts[h.key[0]] = counts.get(h.key[0], 0) + 1
        given = {p.relpath: p for p in paths}
        if set(given) != set(counts):
            raise ValueError("the paths do not match the held inodes")
        self._paths = {relpath: _PathState(tuple(p.latest), counts[relpath], p.epoch) for relpath, p in given.items()}
        self._peak = len(self._held)
