"""The interruptible requests being answered: their cancel scopes, the INTERRUPTs that came
before their request, and the copies of a request the kernel sent again while it is answered.

Only READ and OPEN are interruptible (kernel.INTERRUPTIBLE): they may wait long, for the
source or for a file to be filled. Each has a cancel scope from the moment it is read, since
its INTERRUPT may be the very next request; with several reader threads the INTERRUPT may even
reach the trio thread first, so one for a request not (yet) known is kept for it.

A request can come twice. After a reader process dies, the kernel sends again (NOTIFY_RESEND)
every request it holds as read and not answered, including those the trio thread is still
answering. It marks a request sent again in its unique (FUSE_UNIQUE_RESEND, bit 63), once: a
copy sent a second time comes under the unique of the first copy sent again. Two copies
under one unique must not both be answered under one scope (the first to end would drop the
other's INTERRUPT scope), so the later copy waits until the earlier one ends, and is answered
then only if the earlier one's reply was refused: a resend moves the request back to the
kernel's pending queue, where a reply finds nothing to answer (ENOENT), and the copy read back
from there is then the only one the kernel still waits on. A reply the kernel took finished
the request: the later copy is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import trio

# INTERRUPTs of requests not (yet) known, kept for when the request comes. Uniques are never
# reused, so one that never comes only takes a place until pushed out.
EARLY_INTERRUPTS = 1024


@dataclass(frozen=True)
class Copy:
    """A request read again while its first copy was answered, to answer once that one ends."""

    data: bytes
    fd: int  # the descriptor it was read from
    nursery: trio.Nursery  # where it was to be answered


class InFlight:
    """The interruptible requests being answered, by unique; only on the trio thread."""

    def __init__(self) -> None:
        self._scopes: dict[int, trio.CancelScope] = {}
        self._early: OrderedDict[int, None] = OrderedDict()
        self._again: dict[int, Copy] = {}
        self._refused: set[int] = set()

    def begin(self, unique: int, data: memoryview, fd: int, nursery: trio.Nursery) -> trio.CancelScope | None:
        """The scope to answer a request in (cancelled already if its INTERRUPT came first),
        or None where a copy of it is being answered: this one (data, read from fd) is kept
        for that copy's end (end())."""
        if unique in self._scopes:
            self._again[unique] = Copy(bytes(data), fd, nursery)
            return None
        scope = self._scopes[unique] = trio.CancelScope()
        if unique in self._early:
            del self._early[unique]
            scope.cancel()
        return scope

    def interrupt(self, unique: int) -> None:
        if (scope := self._scopes.get(unique)) is not None:
            scope.cancel()
            return
        self._early[unique] = None
        if len(self._early) > EARLY_INTERRUPTS:
            self._early.popitem(last=False)

    def replied(self, unique: int, taken: bool) -> None:
        """A reply to unique was written: whether the kernel took it. On the trio thread, once
        the write returned (a worker thread's write included)."""
        if unique in self._scopes:
            if taken:
                self._refused.discard(unique)
            else:
                self._refused.add(unique)

    def end(self, unique: int) -> Copy | None:
        """The request's answer is over: the copy read meanwhile, if the kernel still waits
        on it (this answer's reply was refused); None otherwise."""
        self._scopes.pop(unique, None)
        again = self._again.pop(unique, None)
        refused = unique in self._refused
        self._refused.discard(unique)
        return again if refused else None

    def empty(self) -> bool:
        """Nothing registered: no request, early INTERRUPT or copy left behind."""
        return not (self._scopes or self._early or self._again or self._refused)
