"""The engine's background work: its nursery, and blocking calls run on worker threads.

Every part of the engine runs on the trio thread and hands anything that blocks (source,
cache files) to `Tasks.io`. A call that fails for want of descriptors is retried once after
the open-file table gave back what idle files hold (`on_out_of_fds`), which is how a daemon at
its descriptor limit keeps serving lookups.
"""

from __future__ import annotations

import errno
import inspect
import logging
import threading
from typing import Awaitable, Callable, Hashable, TypeVar

import trio

from ..fairness import FairLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")
# trio 0.23 renamed to_thread.run_sync's `cancellable` `abandon_on_cancel` (the old name warns since)
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")
METADATA_THREADS = 16


class Tasks:
    """The nursery the engine's background work runs in, and its worker threads."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        # shared round-robin between the users whose requests wait for them (fairness.py)
        self.metadata = FairLimiter(METADATA_THREADS)
        # set by the open-file table: close idle files; True if any descriptor was freed
        self.on_out_of_fds: Callable[[], Awaitable[bool]] | None = None
        # abandoned calls still running on their threads, by key: the next call waits for them
        self._abandoned: dict[Hashable, trio.Event] = {}

    async def io(self, fn: Callable[..., T], *args: object,
                 limiter: trio.CapacityLimiter | FairLimiter | None = None) -> T:
        """Run a blocking call on a worker thread (the metadata threads unless a limiter is
        given). Out of descriptors, idle files give theirs back and it is tried once more."""
        limiter = limiter or self.metadata
        return await self.out_of_fds_retried(lambda: trio.to_thread.run_sync(fn, *args, limiter=limiter))

    async def out_of_fds_retried(self, run: Callable[[], Awaitable[T]]) -> T:
        """run(), and once more if it fails for want of descriptors after the open-file table
        gave back what idle files hold. Only for a run that consumes nothing of its own (a
        descriptor it closes), which a second run would use again."""
        try:
            return await run()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or self.on_out_of_fds is None:
                raise
            if not await self.on_out_of_fds():
                raise
        return await run()

    async def abandonable(self, fn: Callable[..., T], *args: object, key: Hashable,
                          discard: Callable[[T], object] | None = None, unused: Callable[[], object] | None = None,
                          limiter: trio.CapacityLimiter | FairLimiter | None = None) -> T:
        """io() for a call a request waits on that the requester may give up: a cancelled
        caller (an INTERRUPT: its process was killed) stops waiting at once, where a source
        that does not answer would otherwise hold it, unkillable, until it does. A call that
        started runs on (its thread keeps its place under the limiter), and what it returns
        then goes to discard (a descriptor closed); one that had not started never runs, and
        unused is called instead (what its arguments hold let go). So an abandoned call must
        use only what is its own: never a descriptor or buffer its caller gives back. Not
        retried for want of descriptors (out_of_fds_retried, where its arguments allow).

        key names what the call waits on (an open of a path): while an abandoned call of a key
        runs on, the next one of that key waits for it (as a killable wait), so that a user
        killing and retrying an open of a file that hangs holds one thread, not a thread per
        attempt until none is left for anyone."""
        try:
            while (pending := self._abandoned.get(key)) is not None:
                await pending.wait()
        except BaseException:  # given up before it started: what its arguments hold goes
            if unused is not None:
                unused()
            raise
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        # then "running" (the thread took it), "ended" (fn returned or raised, the caller still
        # waiting), or "given up" (the caller, first)
        state = "waiting"
        outcome: list[T] = []  # the result of a call that ended before it was given up

        def ended(result: list[T]) -> None:
            """In the thread, once fn returned (result) or raised (empty): hand it over, or
            drop it and let the key go if the caller gave up meanwhile."""
            nonlocal state
            with lock:
                if state != "given up":
                    outcome.extend(result)
                    state = "ended"
                    return
            if result and discard is not None:
                discard(result[0])
            try:
                token.run_sync_soon(self._let_go, key)
            except trio.RunFinishedError:
                pass

        def call() -> T | None:
            nonlocal state
            with lock:
                if state == "given up":
                    return None
                state = "running"
            try:
                result = fn(*args)
            except BaseException:
                ended([])
                raise
            ended([result])
            return result

        try:
            return await trio.to_thread.run_sync(call, limiter=limiter or self.metadata, **{_ABANDON: True})
        except trio.Cancelled:
            with lock:
                before, state = state, "given up"
            if before == "waiting":
                if unused is not None:
                    unused()
            elif before == "ended":  # as the cancellation came: returned (dropped) or raised
                if outcome and discard is not None:
                    discard(outcome[0])
            else:
                self._abandoned[key] = trio.Event()  # set by _let_go once the thread ends
            raise

    def _let_go(self, key: Hashable) -> None:
        """On the trio thread: an abandoned call of key ended."""
        if (pending := self._abandoned.pop(key, None)) is not None:
            pending.set()

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
