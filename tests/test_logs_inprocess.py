"""fusecache.logs, in process: the daemon's log stays small however long it runs.

What it proves: a warning repeated with every open (a readahead stopped by a full cache) is
logged once per interval with a count of the repeats left out, and the engine's repeated
warnings go through it; daemon.log is rotated at its size limit, keeping a fixed number of
older files, all 0600, with stderr (tracebacks) following the current file (audit 2, item 15).
"""

from __future__ import annotations

import logging
import os
import stat
import sys

import pytest

from fusecache import logs
from fusecache.engine import streams

from .inprocess import CHUNK, harness, read_handle, settled  # noqa: F401 - fixture


def test_a_repeated_warning_is_logged_once_per_interval_with_a_count(caplog):
    now = [0.0]
    throttle = logs.Throttle(logging.getLogger("test.throttle"), interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for i in range(100):
            throttle.warning("readahead of %s stopped: %s", f"shard{i}", "cache is full")
        throttle.warning("another kind: %s", "x")
        now[0] = 59.0
        throttle.warning("readahead of %s stopped: %s", "late", "cache is full")
        now[0] = 61.0
        throttle.warning("readahead of %s stopped: %s", "next", "cache is full")
    assert [r.getMessage() for r in caplog.records] == [
        "readahead of shard0 stopped: cache is full",
        "another kind: x",
        "readahead of next stopped: cache is full (100 more like it left out of the log)",
    ]


async def test_opens_under_a_cache_full_of_open_files_log_one_warning(harness, caplog, monkeypatch):
    monkeypatch.setattr(streams, "repeats", logs.Throttle(streams.log), raising=False)  # fresh: nothing from other tests
    harness.write("held", 4 * CHUNK)
    shards = [f"model-{i:05d}.safetensors" for i in range(6)]
    for shard in shards:
        harness.write(shard, 2 * CHUNK)
    engine = await harness.start()
    held = await engine.open("held")
    await read_handle(engine, held)
    engine.budget.limit = 4 * CHUNK  # full of an open file
    with caplog.at_level(logging.WARNING, logger="fusecache.engine.streams"):
        for shard in shards:
            engine.prefetch(shard)
            await settled(engine, shard)
            assert engine.stream_state(shard)[1] is not None  # each one stopped: cache is full
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert len(stopped) == 1 and "cache is full" in stopped[0]
    await engine.release(held)


def test_the_log_file_is_rotated_private_and_keeps_stderr_on_the_current_file(tmp_path):
    path = tmp_path / "daemon.log"
    stderr_fd = os.open(tmp_path / "stderr-before", os.O_WRONLY | os.O_CREAT, 0o600)
    handler = logs.PrivateRotatingFileHandler(path, max_bytes=10_000, backups=2, stderr_fd=stderr_fd)
    logger = logging.getLogger("test.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(2000):
            logger.warning("line %d of a daemon that runs for months", i)
        os.write(stderr_fd, b"a traceback\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(stderr_fd)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("daemon.log"))
    assert files == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    for name in files:
        st = (tmp_path / name).stat()
        assert st.st_size <= 10_000 + 100 and stat.S_IMODE(st.st_mode) == 0o600
    assert (tmp_path / "daemon.log").read_text().endswith("a traceback\n")
    assert "line 1999 " in (tmp_path / "daemon.log").read_text()


def test_the_log_file_is_never_opened_through_a_symlink(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "daemon.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        logs.PrivateRotatingFileHandler(tmp_path / "daemon.log")


def test_two_processes_logging_to_one_file_rotate_it_once(tmp_path):
    """The supervisor and its daemon log to one daemon.log, each through its own handler.
    The daemon rotated it; the supervisor's handler, still on the renamed (full) file, then
    rotated again at its next line: the fresh file was renamed away and the oldest lines of
    the daemon deleted. A handler now follows a rotation made elsewhere. (Found by review.)"""
    path = tmp_path / "daemon.log"
    stderr_fds = [os.open(tmp_path / f"stderr-{i}", os.O_WRONLY | os.O_CREAT, 0o600) for i in range(2)]
    daemon, supervisor = (logs.PrivateRotatingFileHandler(path, max_bytes=10_000, backups=2, stderr_fd=fd)
                          for fd in stderr_fds)
    record = logging.LogRecord("test", logging.WARNING, __file__, 1, "%s", ("x" * 60,), None)
    try:
        supervisor.emit(record)
        for _ in range(200):  # the daemon fills the file and rotates it
            daemon.emit(record)
        kept = (tmp_path / "daemon.log.1").read_text()
        supervisor.emit(logging.LogRecord("test", logging.WARNING, __file__, 1, "the supervisor's line", (), None))
        assert (tmp_path / "daemon.log.1").read_text() == kept  # not rotated a second time
        assert "the supervisor's line" in path.read_text()
    finally:
        for handler in (daemon, supervisor):
            handler.close()
        for fd in stderr_fds:
            os.close(fd)


def test_a_file_name_cannot_forge_a_log_line_or_reach_a_terminal():
    """A source file name is anyone's: with a newline and a timestamp in it, it forged whole
    lines in daemon.log ("ERROR fusecache.supervisor: ..."); with escape sequences it drove
    the terminal of whoever read the log. Messages are escaped; tracebacks keep their lines.
    (Found by review.)"""
    formatter = logs.EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    name = "evil\x1b[31m\n2026-12-05 08:00:00,000 ERROR fusecache.supervisor: forged"
    line = formatter.format(logging.LogRecord("fusecache.store", logging.WARNING, __file__, 1,
                                              "cannot cache %s", (name,), None))
    assert "\n" not in line and "\x1b" not in line
    assert line == "WARNING fusecache.store: cannot cache evil\\x1b[31m\\x0a2026-12-05 08:00:00,000 ERROR " \
                   "fusecache.supervisor: forged"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("fusecache", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert formatter.format(failed).count("\n") >= 3  # the traceback's lines
