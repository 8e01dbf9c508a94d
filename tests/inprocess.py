"""Shared pieces of the in-process test tier: the engine, the store and the FUSE adapter run in
the test's own trio loop over temporary directories, with no FUSE mount and no root.

- `CountingSource` is a real `Source` over a temp dir that records every `read_exact` (what
  the engine read from the "network filesystem") and can hold a read at a gate, run a hook
  before it (to modify the file mid-read) or fail it with an errno. The tests judge the engine
  by what it read from here, never by fusecache's own counters.
- The `harness` fixture starts engines (`await harness.start(**config)`) in a nursery of its
  own and stops them when the test ends.

Only the engine's public facade is used (open/read/release, prefetch, stream_state,
cached_extent, evict, set_pins, budget, metrics...): its internals are being split up.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import trio
import trio.testing

from fusecache.budget import CacheBudget
from fusecache.config import MountConfig
from fusecache.engine import Engine
from fusecache.fs import FuseOperations
from fusecache.metrics import Metrics
from fusecache.session.types import Context, reply_errno
from fusecache.source import Identity, Source
from fusecache.store import CacheStore

KiB = 1024
CHUNK = 64 * KiB  # the smallest chunk size a mount accepts: files of a few chunks stay tiny
GATE_TIMEOUT = 10.0  # a held read gives up after this long, so a failed test cannot hang


class Gate:
    """Holds the first read_exact of relpath (at offset, if given) until opened."""

    def __init__(self, relpath: str, offset: int | None) -> None:
        self.relpath = relpath
        self.offset = offset
        self.entered = threading.Event()
        self.opened = threading.Event()

    def matches(self, relpath: str, offset: int) -> bool:
        return relpath == self.relpath and self.offset in (None, offset) and not self.entered.is_set()

    async def wait_entered(self, timeout: float = 5.0) -> None:
        """Until a read is held here (it runs on a worker thread)."""
        assert await trio.to_thread.run_sync(self.entered.wait, timeout), f"no read of {self.relpath} came"

    def open(self) -> None:
        self.opened.set()


class CountingSource(Source):
    """A Source that logs, holds, alters and fails reads of file contents (read_exact, and
    copy_exact, the fill's copy of them into the cache)."""

    def __init__(self, root: Path, stable_inodes: bool = True) -> None:
        super().__init__(root, stable_inodes=stable_inodes)
        self.lock = threading.Lock()
        self.reads: list[tuple[str, int, int]] = []  # (relpath, offset, length) of every attempt
        self.faults: dict[str, int] = {}  # relpath -> errno its reads fail with
        self.hooks: dict[str, Callable[[int], None]] = {}  # relpath -> run before each read (offset)
        self.gates: list[Gate] = []

    # -- fault injection --

    def hold(self, relpath: str, offset: int | None = None) -> Gate:
        gate = Gate(relpath, offset)
        with self.lock:
            self.gates.append(gate)
        return gate

    def fail(self, relpath: str, err: int = errno.EIO) -> None:
        self.faults[relpath] = err

    def clear(self, relpath: str) -> None:
        self.faults.pop(relpath, None)
        self.hooks.pop(relpath, None)

    def open_gates(self) -> None:
        with self.lock:
            for gate in self.gates:
                gate.open()

    def read_exact(self, fd: int, buf: memoryview, offset: int, relpath: str, identity: Identity) -> None:
        self._reading(relpath, offset, len(buf))
        super().read_exact(fd, buf, offset, relpath, identity)

    def copy_exact(self, fd: int, dev: int, dst_fd: int, offset: int, length: int, relpath: str,
                   identity: Identity) -> bool:
        self._reading(relpath, offset, length)
        if super().copy_exact(fd, dev, dst_fd, offset, length, relpath, identity):
            return True
        with self.lock:  # not copied: the read that follows is the one to count
            self.reads.remove((relpath, offset, length))
        return False

    def _reading(self, relpath: str, offset: int, length: int) -> None:
        """Record a read (or copy) of the source, then hold, alter or fail it as set up."""
        with self.lock:
            self.reads.append((relpath, offset, length))
            gates = [gate for gate in self.gates if gate.matches(relpath, offset)]
            for gate in gates:
                gate.entered.set()
        for gate in gates:
            if not gate.opened.wait(GATE_TIMEOUT):
                raise TimeoutError(f"gate on {relpath} never opened")
        hook = self.hooks.get(relpath)
        if hook is not None:
            hook(offset)
        err = self.faults.get(relpath)
        if err is not None:
            raise OSError(err, f"injected: {os.strerror(err)}")

    # -- what was read --

    def calls(self, relpath: str) -> int:
        with self.lock:
            return sum(1 for path, _, _ in self.reads if path == relpath)

    def counts(self, relpath: str, size: int) -> np.ndarray:
        """How many times each byte of relpath was asked of the source."""
        counts = np.zeros(size, dtype=np.int32)
        with self.lock:
            for path, offset, length in self.reads:
                if path == relpath:
                    counts[offset:offset + length] += 1
        return counts

    def first_read_order(self) -> list[str]:
        """The files in the order their contents were first read."""
        with self.lock:
            return list(dict.fromkeys(path for path, _, _ in self.reads))


class Harness:
    """Source tree, cache dir and running engines of one test."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp_path
        self.nursery = nursery
        self.src = tmp_path / "src"
        self.src.mkdir()
        self.cache = tmp_path / "cache"
        self.source: CountingSource | None = None  # of the engine started last
        self.store: CacheStore | None = None
        self.sources: list[CountingSource] = []
        self._running: dict[int, tuple[Engine, trio.CancelScope, trio.Event]] = {}

    # -- the source tree --

    def write(self, relpath: str, size: int) -> bytes:
        data = os.urandom(size)
        path = self.src / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def rewrite(self, relpath: str, data: bytes, keep_mtime: bool = False) -> bytes:
        """Modify a file in place (same source inode): a new mtime, or the old one put back."""
        path = self.src / relpath
        before = os.stat(path)
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
        mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 1_000_000_000
        for _ in range(100):  # until the ctime moved, where timestamps are coarse
            os.utime(path, ns=(before.st_atime_ns, mtime))
            after = os.stat(path)
            if after.st_ctime_ns != before.st_ctime_ns:
                break
            time.sleep(0.002)
        assert after.st_ino == before.st_ino and after.st_ctime_ns != before.st_ctime_ns
        return data

    def replace(self, relpath: str, data: bytes) -> bytes:
        """Replace a file by another (a new source inode), as a writer that renames into place."""
        path = self.src / relpath
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data

    # -- engines --

    def config(self, **overrides: object) -> MountConfig:
        settings = dict(source=self.src, mountpoint=self.tmp / "mnt", cache_dir=self.cache,
                        chunk_size=CHUNK, stream_read_size=4 * CHUNK, fetch_threads=4, streams=1,
                        fill_reads_max=2,  # a stream starts with one read in flight (engine/fill.py)
                        readahead="off", readahead_min_size=0, sequential_window=0, workers=4)
        settings.update(overrides)
        return MountConfig(**settings)

    def new_store(self) -> CacheStore:
        store = CacheStore(self.cache, os.path.realpath(self.src))
        store.prepare()
        return store

    async def start(self, *, store: CacheStore | None = None, source: CountingSource | None = None,
                    cache_in_memory: bool = False, **config: object) -> Engine:
        self.source = source or CountingSource(self.src)
        self.sources.append(self.source)
        self.store = store or self.new_store()
        engine = Engine(self.config(**config), self.source, self.store, Metrics(), CacheBudget(sys.maxsize),
                        cache_in_memory=cache_in_memory)
        await self.nursery.start(self._serve, engine)
        return engine

    async def _serve(self, engine: Engine, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        stopped = trio.Event()
        with trio.CancelScope() as scope:
            self._running[id(engine)] = (engine, scope, stopped)
            try:
                await engine.run(task_status=task_status)
            finally:
                stopped.set()

    async def stop(self, engine: Engine) -> None:
        """Stop an engine as the daemon does at unmount: cancel it."""
        _engine, scope, stopped = self._running.pop(id(engine))
        scope.cancel()
        await stopped.wait()

    async def aclose(self) -> None:
        """Let held reads go, and give back the descriptors of the files the running engines
        keep (evicting them: the test is over), so that a long run does not run out."""
        for source in self.sources:
            source.open_gates()
        with trio.move_on_after(5):
            for engine, _scope, _stopped in self._running.values():
                for info in engine.open_files():
                    try:
                        await engine.set_pins(set())
                        await engine.evict(info["path"])
                    except OSError:
                        pass
            await trio.testing.wait_all_tasks_blocked()  # the closes have reached their threads
        self._running.clear()


@pytest.fixture
async def harness(tmp_path):
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        try:
            yield h
        finally:
            await h.aclose()
            nursery.cancel_scope.cancel()
    for source in h.sources:
        source.close()


# -- helpers for tests --

def ctx(uid: int = 0, gid: int = 0, pid: int | None = None) -> Context:
    """What a FUSE session hands an operation about the requester."""
    return Context(uid=uid, gid=gid, pid=os.getpid() if pid is None else pid)


def buffer(size: int) -> memoryview:
    """A reply buffer of the caller's, as a FUSE session passes to every read."""
    return memoryview(bytearray(size))


async def read_file(engine: Engine, relpath: str, step: int = CHUNK) -> bytes:
    """open, read it all in `step`-sized requests (copied: replies reuse a buffer), release."""
    handle = await engine.open(relpath)
    try:
        return await read_handle(engine, handle, step)
    finally:
        await engine.release(handle)


async def read_handle(engine: Engine, handle, step: int = CHUNK) -> bytes:
    """Read a handle to its end in `step`-sized requests, all into one reused reply buffer
    (as a session's worker does), each reply copied out before the next read."""
    out = bytearray()
    buf = buffer(step)
    while reply := await engine.read(handle, len(out), step, buf):
        out += reply
    return bytes(out)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def settled(engine: Engine, *relpaths: str, timeout: float = 5.0) -> None:
    """Until no stream of relpaths is queued or running."""
    await wait_for(lambda: not any(engine.stream_state(p)[0] for p in relpaths), timeout)


def allocated(store: CacheStore) -> int:
    """What the store's entries take on the cache filesystem (as `du` counts): the allocated
    blocks of every data file and index."""
    return sum(path.lstat().st_blocks * 512 for path in store.objects.rglob("*") if path.is_file())


def damage(store: CacheStore, relpath: str, offset: int) -> None:
    """Another process flips bytes in the cache's copy of relpath."""
    with open(store.paths(relpath)[0], "r+b") as f:
        f.seek(offset)
        old = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


# -- helpers for tests of the FUSE adapter --

async def operations(harness: Harness, **config: object) -> FuseOperations:
    """The FUSE adapter over a new engine of the harness."""
    return FuseOperations(await harness.start(**config), attr_timeout=2.5)


async def fuse_errno(call) -> int:
    """The errno a session answers a failed call with (the adapter raises, the session maps)."""
    with pytest.raises(Exception) as info:
        await call
    return reply_errno(info.value, "test")


async def read_all(ops: FuseOperations, fh: int) -> bytes:
    """Read fh to its end into one reused reply buffer, as a session's worker does."""
    out = bytearray()
    buf = buffer(CHUNK)
    while reply := await ops.read(fh, len(out), CHUNK, buf):
        out += reply
    return bytes(out)
