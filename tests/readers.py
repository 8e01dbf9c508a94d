"""Readers for tests of a mount whose serving process changes under them (a live restart,
a crash, a successor started from the fd store): they hold open files and mappings and keep
reopening, check every byte, and keep every error."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fusecache import journal
from fusecache.livestate import StateError

MiB = 1 << 20
FILES = {"ckpt/shard-0.bin": 6 * MiB + 17, "ckpt/shard-1.bin": 3 * MiB, "ckpt/meta.json": 300}
WAIT = 60.0  # a failure bound only: the readers normally finish their passes in milliseconds


class Readers:
    """Threads reading every file in a loop, each pass checked byte for byte: one keeps its
    files open, one reads through mmaps, one opens them anew each pass. Every error is kept."""

    def __init__(self, mountpoint: Path, contents: dict[str, bytes]) -> None:
        self.mountpoint = mountpoint
        self.contents = contents
        self.errors: list[str] = []
        self.passes = {"held": 0, "mapped": 0, "reopened": 0}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,)) for kind in self.passes]

    def __enter__(self) -> Readers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, kind: str) -> None:
        try:
            held = {name: open(self.mountpoint / name, "rb") for name in self.contents}
            maps = {name: mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) for name, f in held.items()} \
                if kind == "mapped" else {}
            while not self._stop.is_set():
                for name, want in self.contents.items():
                    got = self._read(kind, name, held[name], maps)
                    if got != want:
                        self.errors.append(f"{kind}: {name}: wrong bytes")
                self.passes[kind] += 1
                # a pause between passes: a pass through passthrough mmaps takes well under a
                # millisecond, all of it holding the GIL, and the readers whose passes wait in
                # the kernel would wait for the GIL behind it (seconds a pass on two cores)
                time.sleep(0.001)
            for m in maps.values():
                m.close()
            for f in held.values():
                f.close()
        except OSError as e:
            self.errors.append(f"{kind}: {e}")

    def _read(self, kind: str, name: str, f, maps: dict[str, mmap.mmap]) -> bytes:
        # the page cache dropped first: the reads reach the daemon (or the backing file)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if kind == "mapped":
            return maps[name][:]
        if kind == "reopened":
            return (self.mountpoint / name).read_bytes()
        return os.pread(f.fileno(), len(self.contents[name]) + 1, 0)

    def wait_for_the_journal(self, path: Path, pid: int) -> None:
        """Until the journal at path is process pid's and holds what the readers keep open:
        what changed in the last 0.5 s before a crash is not promised (docs/semantics.md),
        and a test of a crash must not trip over it by chance."""
        wait_for_the_journal(path, pid, self.contents, handles=len(self.passes) * len(self.contents))

    def around(self, event: Callable[[], None], times: int = 2) -> None:
        """event() `times` times, every reader making two passes before each and after the last."""
        self.wait_for_passes(2)
        for _ in range(times):
            event()
            self.wait_for_passes(2)

    def wait_for_passes(self, more: int) -> None:
        """Until every reader has done `more` passes from now (or one failed)."""
        target = {kind: n + more for kind, n in self.passes.items()}
        deadline = time.monotonic() + WAIT
        while any(self.passes[k] < target[k] for k in target):
            assert not self.errors, self.errors  # the first failure, not what it leads to later
            assert time.monotonic() < deadline, f"readers stalled: {self.passes}"
            time.sleep(0.01)



def wait_for_the_journal(path: Path, pid: int, contents: dict[str, bytes], handles: int = 0) -> None:
    """Until the journal at path is process pid's, knows an inode for every file and directory
    of contents (below the root) and at least `handles` open files."""
    names = {Path(name) for name in contents}
    looked_up = len(names | {parent for name in names for parent in name.parents if parent != Path(".")})
    deadline = time.monotonic() + WAIT
    while True:
        try:
            state = journal.read(path)
            if state.pid == pid and len(state.adapter.inodes) >= looked_up and len(state.adapter.files) >= handles:
                return
        except StateError:  # not written yet
            pass
        assert time.monotonic() < deadline, "the journal never caught up"
        time.sleep(0.02)
