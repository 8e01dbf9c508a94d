"""The engine's background work: its nursery, and blocking calls run on worker threads.

Every part of the engine runs on the trio thread and hands anything that blocks (source,
cache files) to `Tasks.io`. A call that fails for want of descriptors is retried once after
the open-file table gave back what idle files hold (`on_out_of_fds`), which is how a daemon at
its descriptor limit keeps serving lookups.
"""

from __future__ import annotations

import errno
import logging
from typing import Awaitable, Callable, TypeVar

import trio

from ..fairness import FairLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")
METADATA_THREADS = 16


class Tasks:
    """The nursery the engine's background work runs in, and its worker threads."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        # shared round-robin between the users whose requests wait for them (fairness.py)
        self.metadata = FairLimiter(METADATA_THREADS)
        # set by the open-file table: close idle files; True if any descriptor was freed
        self.on_out_of_fds: Callable[[], Awaitable[bool]] | None = None

    async def io(self, fn: Callable[..., T], *args: object,
                 limiter: trio.CapacityLimiter | FairLimiter | None = None) -> T:
        """Run a blocking call on a worker thread (the metadata threads unless a limiter is
        given). Out of descriptors, idle files give theirs back and it is tried once more."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self.metadata)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or self.on_out_of_fds is None:
                raise
            if not await self.on_out_of_fds():
                raise
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self.metadata)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self.nursery is not None, "the engine is not running"
        self.nursery.start_soon(fn, *args)

    def spawn(self, fn: Callable[..., object], *args: object) -> None:
        """Run a blocking housekeeping call in the background; its failure is logged, never
        fatal (an exception escaping a task of the engine's nursery would stop the daemon)."""

        async def guarded() -> None:
            try:
                await self.io(fn, *args)
            except Exception:  # noqa: BLE001
                log.exception("background %s%r failed", getattr(fn, "__name__", fn), args)

        self.start_soon(guarded)
