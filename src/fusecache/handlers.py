"""The commands of the control channel (`fusecache status`, `prefetch`, `pin`, `cache ...`),
answered from the daemon's parts.

Every answer comes from memory (the engine, its budget, the store's catalogue), never from
reading the store's files: with a few hundred thousand cached files a status must still take
milliseconds, and a `umount` asks only for the pid. A prefetch is a job with an id: its
progress is asked by id, so that neither side sends the paths of a large tree again (a
request is limited to control.MAX_REQUEST).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import trio

from .control import ControlError
from .controlserver import Handler
from .engine import Engine
from .metrics import Metrics
from .source import Source, is_under_any, is_valid_name, regular_files
from .store import CacheStore


PROGRAM_STARTED = time.time_ns()  # set as this program loads: an exec in place starts anew
MAX_JOBS = 256  # unfinished prefetch jobs kept (those asked about least recently are dropped first)
# and the paths they hold in all: a `pin` or a `prefetch --no-wait` of a tree of a million files
# is a job nobody asks about again, each holding its paths until 256 newer ones push it out
MAX_JOB_PATHS = 1_000_000
# A progress request may wait up to this long for its job to finish, so that the client hears
# of the end at once instead of at its next poll (and polls less).
PROGRESS_WAIT_MAX = 5.0
# While it waits, the job is looked at again after this many times what a look took, at least
# PROGRESS_RECHECK seconds: a job of a few files is seen ending within 20 ms, one of 100,000
# files costs the event loop at most a twentieth of its time.
PROGRESS_RECHECK = 0.02
PROGRESS_RECHECK_FACTOR = 20


@dataclass(frozen=True)
class DaemonParts:
    """What the handlers answer from. The passthrough figures come as functions so that the
    handlers need not know the FUSE adapter."""

    mountpoint: str
    engine: Engine
    store: CacheStore
    metrics: Metrics
    passthrough_opens: Callable[[], dict[str, int]]  # relpath -> opens the kernel serves
    passthrough_state: Callable[[], str]  # "on", or why it is off
    supervisor_pid: Callable[[], int | None] = lambda: None  # the process holding the connection (supervisor.py)


class ControlHandlers:
    """One method per command; `table()` is what the ControlServer dispatches on."""

    def __init__(self, parts: DaemonParts) -> None:
        self.parts = parts
        self.engine = parts.engine
        self._jobs: OrderedDict[int, list[str]] = OrderedDict()
        self._job_ids = itertools.count(1)

    def table(self) -> dict[str, Handler]:
        return {"status": self.status, "pid": self.pid, "prefetch": self.prefetch, "progress": self.progress,
                "pin": self.pin, "unpin": self.unpin, "cache_ls": self.cache_ls, "cache_clear": self.cache_clear}

    async def pid(self, request: dict) -> dict:
        """The daemon's pid, and its supervisor's: what `umount` waits on; and when this program
        started, which tells a daemon that restarted in place (the same pid) from before."""
        return {"pid": os.getpid(), "supervisor_pid": self.parts.supervisor_pid(), "started": PROGRAM_STARTED}

    async def status(self, request: dict) -> dict:
        engine = self.engine
        return {"mountpoint": self.parts.mountpoint, "source": engine.source.root, "cache": str(self.parts.store.root),
                "pid": os.getpid(), "supervisor_pid": self.parts.supervisor_pid(), "cache_bytes": engine.budget.used, "cache_limit": engine.budget.limit,
                "pending_bytes": engine.files.pending_bytes(), "passthrough": self.parts.passthrough_state(),
                "pins": sorted(engine.pins), "metrics": self.parts.metrics.snapshot(), "files": self._files_report()}

    async def cache_ls(self, request: dict) -> dict:
        return {"cache_bytes": self.engine.budget.used, "cache_limit": self.engine.budget.limit,
                "files": self._files_report()}

    async def cache_clear(self, request: dict) -> dict:
        prefixes = set(_relpaths(request))
        evicted, kept = [], []
        for relpath in sorted(self.engine.budget.files()):
            if is_under_any(relpath, prefixes):
                (evicted if await self.engine.evict(relpath) else kept).append(relpath)
        return {"evicted": evicted, "kept": kept}

    async def prefetch(self, request: dict) -> dict:
        """Queue every regular file under the paths; the reply names the job to ask about."""
        files = await self._queue(_relpaths(request))
        job = next(self._job_ids)
        self._jobs[job] = [relpath for relpath, _size in files]
        while len(self._jobs) > MAX_JOBS or (len(self._jobs) > 1 and
                                             sum(map(len, self._jobs.values())) > MAX_JOB_PATHS):
            self._jobs.popitem(last=False)
        return {"job": job, "files": len(files), "bytes": sum(size for _relpath, size in files)}

    async def pin(self, request: dict) -> dict:
        """Pin the paths and queue their files; no job: nobody asks how a pin's fetch goes, and
        a job of each pin pushed out those of prefetches clients were waiting on."""
        paths = _relpaths(request)
        files = await self._queue(paths)  # they must exist
        try:
            await self.engine.set_pins(self.engine.pins | set(paths))
        except ValueError as e:  # too many to save
            raise ControlError(str(e)) from None
        return {"files": len(files), "bytes": sum(size for _relpath, size in files)}

    async def _queue(self, relpaths: list[str]) -> list[tuple[str, int]]:
        files = await trio.to_thread.run_sync(_regular_files, self.engine.source, _outermost(relpaths))
        for relpath, _size in files:
            self.engine.prefetch(relpath)
        return files

    async def unpin(self, request: dict) -> dict:
        paths = set(_relpaths(request))
        unknown = paths - self.engine.pins
        if unknown:
            raise ControlError(f"not pinned: {', '.join(sorted(unknown))}")
        await self.engine.set_pins(self.engine.pins - paths)
        return {"pins": sorted(self.engine.pins)}

    async def progress(self, request: dict) -> dict:
        """Where a prefetch job stands, once it has finished or `wait` seconds (at most
        PROGRESS_WAIT_MAX; default 0) have passed. Sizes are those of the versions being
        fetched, which differ from what `prefetch` counted if a file changed since; `unknown`
        counts files not opened yet (their size is not in the sum). A job reported finished is
        forgotten. `waited` tells a client that this daemon honours `wait`."""
        job = request.get("job")
        wait = request.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= PROGRESS_WAIT_MAX:
            raise ControlError(f"wait must be a number of seconds from 0 to {PROGRESS_WAIT_MAX:g}")
        deadline = trio.current_time() + wait
        while True:
            relpaths = self._jobs.get(job) if isinstance(job, int) and not isinstance(job, bool) else None
            if relpaths is None:
                raise ControlError(f"no prefetch job {job!r} in this daemon")
            self._jobs.move_to_end(job)  # asked about: the last to be dropped
            started = trio.current_time()
            report = self._job_report(relpaths)
            now = trio.current_time()
            if not report["pending"]:
                del self._jobs[job]
                break
            if now >= deadline:
                break
            await trio.sleep(min(deadline - now, max(PROGRESS_RECHECK, PROGRESS_RECHECK_FACTOR * (now - started))))
        return report | {"waited": True}

    def _job_report(self, relpaths: list[str]) -> dict:
        cached = size = unknown = pending = 0
        errors = {}
        usage = self.engine.budget.files()
        for relpath in relpaths:
            # the state first: a stream ending while the extent is read leaves it pending here
            streaming, error = self.engine.stream_state(relpath)
            extent = self._extent(relpath, usage)
            if extent is None:
                unknown += 1
            else:
                cached, size = cached + extent[0], size + extent[1]
            if streaming:
                pending += 1
            elif error is not None:
                errors[relpath] = error
            elif extent is None or extent[0] < extent[1]:
                errors[relpath] = "not in the cache once fetched (evicted: is the cache too small?)"
        return {"cached": cached, "size": size, "unknown": unknown, "pending": pending,
                "rate": self.parts.metrics.source_rate(), "errors": errors}

    def _extent(self, relpath: str, usage: dict[str, tuple[int, float]]) -> tuple[int, int] | None:
        """(cached, size) of relpath's current version, else as the store last recorded it."""
        extent = self.engine.cached_extent(relpath)
        if extent is None:
            size = self.parts.store.size_of(relpath)
            extent = None if size is None else (usage.get(relpath, (0, 0.0))[0], size)
        return extent

    def _files_report(self) -> list[dict]:
        """Every file the store holds, with what this daemon knows of the open ones."""
        usage = self.engine.budget.files()
        files = {}
        for relpath, size in self.parts.store.sizes().items():
            cached, last_used = usage.get(relpath, (0, 0.0))
            files[relpath] = {"path": relpath, "size": size, "cached": cached, "last_used": last_used or None}
        for live in self.engine.open_files():
            files[live["path"]] = {**files.get(live["path"], {}), **live}
        passthrough = self.parts.passthrough_opens()
        for f in files.values():
            f["pinned"] = self.engine.is_pinned(f["path"])
            f["passthrough"] = passthrough.get(f["path"], 0)
        return sorted(files.values(), key=lambda f: f["path"])


def _relpaths(request: dict) -> list[str]:
    paths = request.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ControlError("'paths' must be a list of paths")
    for relpath in paths:
        # the canonical form the engine keys files by: '' or names joined by single slashes
        if relpath and not all(is_valid_name(part) for part in relpath.split("/")):
            raise ControlError(f"invalid path {relpath!r}")
    return paths


def _outermost(relpaths: list[str]) -> list[str]:
    """The paths of a request once each, in order, leaving out those inside another of them:
    each file is found, counted and held once (`prefetch M/tree M/tree/a` counted a/ twice;
    a request naming the root 300,000 times walked the tree as often)."""
    unique = list(dict.fromkeys(relpaths))
    named = set(unique)
    return [p for p in unique if not p or not is_under_any(p.rpartition("/")[0], named)]


def _regular_files(source: Source, relpaths: list[str]) -> list[tuple[str, int]]:
    """Worker thread: expand directories (without following symlinks) into regular files."""
    found: list[tuple[str, int]] = []
    for relpath in relpaths:
        try:
            found += regular_files(source, relpath)
        except OSError as e:
            raise ControlError(f"{relpath or '.'}: {e.strerror}") from None
    return found
