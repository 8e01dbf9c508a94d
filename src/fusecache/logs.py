"""The daemon's log: a file of bounded size, and warnings that cannot flood it.

A detached daemon logs to daemon.log in its store for as long as it runs, possibly months;
left alone the file would grow by a line for every open that meets a full cache. So the file
is rotated at LOG_MAX_BYTES, keeping LOG_BACKUPS older ones, each created as the store's other
files are (private.open_file: 0600, never through a symlink). And a warning that can repeat
for every open or read (a full cache, a source that fails) goes through a `Throttle`: the first
of its kind is logged, the repeats within THROTTLE_SECONDS are counted and said with the next.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from . import private

LOG_MAX_BYTES = 4 << 20
LOG_BACKUPS = 2
THROTTLE_SECONDS = 60.0


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are private to the daemon's user, and which keeps
    `stderr_fd` on the current file: what the daemon writes to stderr (a traceback, libfuse)
    lands there too, and never in a rotated-away file."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
                 stderr_fd: int = 2) -> None:
        self._stderr_fd = stderr_fd
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> TextIO:
        fd = private.open_file(Path(self.baseFilename), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:
        super().doRollover()
        if self.stream is not None:
            os.dup2(self.stream.fileno(), self._stderr_fd)


class Throttle:
    """Logs a warning that repeats at most once per `interval` seconds for each message (its
    format string, so repeats about different files count as one kind); the next one logged
    says how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = THROTTLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # store and source code warn from worker threads
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(msg)
            if last is not None and now - last < self._interval:
                self._left_out[msg] = self._left_out.get(msg, 0) + 1
                return
            self._last[msg] = now
            left_out = self._left_out.pop(msg, 0)
        if left_out:
            msg = f"{msg} ({left_out} more like it left out of the log)"
        self._logger.warning(msg, *args)
