"""The opens whose reads the session's readers answer themselves, without the trio thread.

An open of a file complete and checked in the cache (at open, or since) is routed: its
handle maps to the `DirectFile` its reads are served from. The table is written on the trio
thread only; reader threads (session/queues.py) look handles up in it directly, reader
processes (session/processes.py) are told of each change, as a watcher.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from .types import DirectFile

log = logging.getLogger(__name__)


class RouteWatcher(Protocol):
    def added(self, fh: int, file: DirectFile) -> None: ...

    def removed(self, fh: int) -> None: ...


class Routes:
    """fh -> the DirectFile its reads are answered from (see the module docstring)."""

    def __init__(self) -> None:
        self._files: dict[int, DirectFile] = {}
        self._watchers: list[RouteWatcher] = []

    def watch(self, watcher: RouteWatcher) -> None:
        self._watchers.append(watcher)

    def get(self, fh: int) -> DirectFile | None:
        """Safe from any thread (one dict lookup)."""
        return self._files.get(fh)

    def __contains__(self, fh: int) -> bool:
        return fh in self._files

    def __iter__(self) -> Iterator[tuple[int, DirectFile]]:
        return iter(list(self._files.items()))

    def add(self, fh: int, file: DirectFile) -> None:
        """Route an open (before its reply). A watcher that cannot take the route (the cache
        file's statx failed) leaves that reader's reads of it to the trio thread: the open is
        answered all the same. Failed instead, it left a handle the kernel never releases."""
        self._files[fh] = file
        for watcher in self._watchers:
            try:
                watcher.added(fh, file)
            except OSError as e:
                log.warning("reads of handle %d go through the daemon: %s", fh, e)

    def remove(self, fh: int) -> None:
        if self._files.pop(fh, None) is not None:
            for watcher in self._watchers:
                watcher.removed(fh)
