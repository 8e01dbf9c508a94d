"""A lock per key (a path), existing only while someone holds or waits for it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


class KeyedLock:
    """One trio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str, wait: bool = True) -> AsyncIterator[None]:
        """Hold key's lock; with wait=False raise trio.WouldBlock at once if it is taken."""
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            if wait:
                await lock.acquire()
            else:
                lock.acquire_nowait()
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
