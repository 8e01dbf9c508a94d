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

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        """Rotate at the size limit; but first follow a rotation another process made. The
        supervisor and the daemons it starts log to one file, each through a handler of its
        own: one that rotated a file the other already had (its own copy still open on the
        renamed file, full) renamed the fresh file away too, and the last rotation's lines
        were deleted."""
        if self.stream is not None and self._rotated_elsewhere():
            self.stream.close()
            self.stream = self._open()
            os.dup2(self.stream.fileno(), self._stderr_fd)
        return bool(super().shouldRollover(record))

    def _rotated_elsewhere(self) -> bool:
        try:
            now = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        held = os.fstat(self.stream.fileno())
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

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


def printable(text: str) -> str:
    """text with what a terminal would act on escaped, as `ls -b` does: control characters
    (C0, DEL, C1), other non-printable ones (bidi overrides, line separators), bytes that are
    not UTF-8 (surrogateescape) and the backslash itself. A source file name can then neither
    drive root's terminal nor pass for another name, and a message stays one line."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


class EscapingFormatter(logging.Formatter):
    """Log lines with the message escaped (printable): it names the source's files, anyone's
    names, which could otherwise forge whole log lines (a newline and a timestamp) or drive the
    terminal of whoever reads the log. A traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)
