"""Sharing the daemon's metadata threads fairly between the users of a mount.

Lookups, listings, opens and stats all run their blocking calls on one small pool of worker
threads. Handed out first come, first served, one user listing directories from 2000 threads
queues thousands of calls, and every other user's `open` waits behind all of them (43-66 s
for a 1-byte `cat` in the audit). Here each requester (the uid the kernel names in the
request) has a queue of its own, and a thread that comes free goes to the queues in turn: a
user waits behind at most one call of each other busy user, however many they queue.

The requester is a context variable: the FUSE session sets it once per request, and every
task and thread call made while answering inherits it. Work done for no request (streams,
housekeeping) runs as `None`, a requester of its own.
"""

from __future__ import annotations

import contextvars
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import trio

# uid of the process whose request is being answered; None for the daemon's own work
requester: contextvars.ContextVar[int | None] = contextvars.ContextVar("requester", default=None)


@dataclass(eq=False)
class _Waiter:
    borrower: object
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False


class FairLimiter:
    """A capacity limiter (what `trio.to_thread.run_sync` takes as `limiter`) that serves
    waiting requesters round-robin, each in its own arrival order."""

    def __init__(self, total: int) -> None:
        self.total_tokens = total
        self._borrowers: set[object] = set()
        self._queues: OrderedDict[int | None, deque[_Waiter]] = OrderedDict()  # in turn order

    @property
    def borrowed_tokens(self) -> int:
        return len(self._borrowers)

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        if len(self._borrowers) < self.total_tokens and not self._queues:
            # cancelled before the thread is taken, never after (as trio's CapacityLimiter):
            # trio.to_thread gives back only what an acquire that returned took, so a cancel
            # after taking it would lose the thread for good, and with it, in time, all 16
            await trio.lowlevel.checkpoint_if_cancelled()
            self._borrowers.add(borrower)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(borrower)
        self._queues.setdefault(requester.get(), deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # granted as we were cancelled: pass the thread on
                self.release_on_behalf_of(borrower)
            else:
                self._withdraw(waiter)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self._borrowers.remove(borrower)
        if self._queues:
            self._grant_next()

    def _grant_next(self) -> None:
        """Give the free thread to the first waiter of the requester whose turn it is; that
        requester goes to the back of the turn order."""
        who, queue = next(iter(self._queues.items()))
        waiter = queue.popleft()
        del self._queues[who]
        if queue:
            self._queues[who] = queue  # back of the line
        self._borrowers.add(waiter.borrower)
        waiter.granted = True
        waiter.event.set()

    def _withdraw(self, waiter: _Waiter) -> None:
        for who, queue in self._queues.items():
            if waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del self._queues[who]
                return
