"""A kill -9 of the serving process on real mounts: the supervisor keeps the connection and
starts a new serving process from the journal. Readers that hold open files and mappings and
keep reopening see a pause, never an error or a wrong byte, and nothing cached is fetched
again; a journal that cannot be taken ends the mount with one log line."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusecache import control, journal, mounts

from .conftest import SESSION, file_bytes, run_cli, wait_gone
from .helpers import fill, reader_processes
from .readers import FILES, WAIT, MiB, Readers, wait_for_the_journal

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(SESSION != "kernel", reason="only fusecache's own session is supervised")]


def _new_serving_pid(m, old: int) -> int:
    """The pid of the process the supervisor started in place of old (status answers again)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            pid = m.status()["pid"]
            if pid != old:
                return pid
        except control.ControlError:  # the control socket is bound anew by the new process
            pass
        assert time.monotonic() < deadline, "no new serving process"
        time.sleep(0.05)


def _journal_of(m) -> Path:
    return Path(m.status()["cache"]) / journal.NAME


def _wait_for_journal(m) -> None:
    path = _journal_of(m)
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, "no journal written"
        time.sleep(0.05)


@pytest.mark.parametrize("passthrough, reading", [("on", "auto"), ("off", "auto"), ("off", "processes")])
def test_readers_see_no_error_through_a_kill9_of_the_serving_process(tmp_path, make_mount, passthrough, reading):
    """readers=processes: the reader processes die with the daemon (PR_SET_PDEATHSIG), and the
    requests they had read are sent again to the next one's."""
    src = tmp_path / "src"
    contents = fill(src, FILES)
    m = make_mount(src, options=["session=kernel", f"passthrough={passthrough}", "queues=4", f"readers={reading}"])
    assert m.supervisor_pid and m.supervisor_pid != m.pid
    for name, data in contents.items():  # the first fill
        assert file_bytes(m.mountpoint / name) == data
    with Readers(m.mountpoint, contents) as readers:
        readers.wait_for_passes(2)
        for _ in range(2):
            old = m.pid
            readers.wait_for_the_journal(_journal_of(m), m.pid)
            children = reader_processes(old)
            assert children or reading != "processes"
            m.kill9_serving()
            for child in children:  # its reader processes die with it
                wait_gone(child)
            m.pid = _new_serving_pid(m, old)
            # the fusecache installed now, exec'd: not a fork carrying the supervisor's modules
            assert b"--recover-fd" in Path(f"/proc/{m.pid}/cmdline").read_bytes().split(b"\0")[1:]
            readers.wait_for_passes(2)
        # a live restart still works under the supervisor, which adopts the new daemon
        old = m.pid
        run_cli("restart", m.mountpoint)
        m.pid = m.status()["pid"]
        wait_gone(old)
        readers.wait_for_passes(2)
        old = m.pid
        readers.wait_for_the_journal(_journal_of(m), m.pid)
        m.kill9_serving()  # the restarted daemon is supervised too
        m.pid = _new_serving_pid(m, old)
        readers.wait_for_passes(2)
    assert readers.errors == []
    status = m.status()
    assert status["supervisor_pid"] == m.supervisor_pid
    log_text = (Path(status["cache"]) / "daemon.log").read_text()
    assert log_text.count("died: starting a new serving process") == 3  # the kills: none died on its own
    assert status["metrics"]["bytes_from_source"] == 0  # nothing cached was fetched again
    assert status["passthrough"] == ("on" if passthrough == "on" else "turned off (passthrough=off)")
    assert sorted(os.listdir(m.mountpoint / "ckpt")) == sorted(name.split("/")[1] for name in FILES)
    m.unmount()  # stops the daemon and the supervisor
    assert not mounts.find_mount(str(m.mountpoint))


# Run as `python3 -c FAIL_ONCE mount ...`: fusecache's command line, whose daemons' metrics
# sampler (a task beside the session) raises once the file $FUSECACHE_TEST_FAIL appears,
# and the first daemon to see it removes it. The supervisor forks every daemon from this
# process, so the daemons it starts after the failure carry the patch too, with no file left.
FAIL_ONCE = """
import os, sys, trio
from fusecache import cli, exporters

async def sample(*args):
    while True:
        try:
            os.unlink(os.environ["FUSECACHE_TEST_FAIL"])
        except FileNotFoundError:
            await trio.sleep(0.05)
            continue
        raise RuntimeError("injected: the metrics sampler failed")

exporters.sample = sample
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_task_failing_beside_the_session_leaves_the_mount_to_its_supervisor(tmp_path, make_mount):
    """A task of the daemon other than the session (the journal's, the exporters', the
    engine's) that raises ends the serving process as a crash does: the supervisor starts the
    next from the journal and the mount stays, open files included. It used to cancel the
    session, whose end then unmounted."""
    src = tmp_path / "src"
    contents = fill(src, {"a.bin": 4 * MiB, "b.bin": MiB}, seed=5)
    m = make_mount(src, ["session=kernel", "passthrough=off"], mount=False)
    mark = tmp_path / "fail"
    args = ["mount", src, m.mountpoint, "--cache-dir", m.cache_dir, "-o", "session=kernel", "-o", "passthrough=off"]
    result = subprocess.run([sys.executable, "-c", FAIL_ONCE, *map(str, args)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONMALLOC": "malloc", "FUSECACHE_TEST_FAIL": str(mark)})
    assert result.returncode == 0, result.stderr
    status = m.status()
    m.pid, m.supervisor_pid = status["pid"], status["supervisor_pid"]
    assert {os.readlink(f"/proc/{pid}/cwd") for pid in (m.pid, m.supervisor_pid)} == {"/"}  # nothing kept busy
    with open(m.mountpoint / "a.bin", "rb") as held:
        assert held.read() == contents["a.bin"]
        wait_for_the_journal(_journal_of(m), m.pid, {"a.bin": contents["a.bin"]}, handles=1)
        old = m.pid
        mark.touch()
        m.pid = _new_serving_pid(m, old)
        wait_gone(old)
        assert not mark.exists()
        assert os.pread(held.fileno(), MiB, MiB) == contents["a.bin"][MiB:2 * MiB]
    assert file_bytes(m.mountpoint / "b.bin") == contents["b.bin"]
    log_text = (Path(status["cache"]) / "daemon.log").read_text()
    assert "injected: the metrics sampler failed" in log_text
    assert "leaving the connection to its keeper" in log_text
    m.unmount()


def test_a_read_in_flight_on_a_reader_thread_is_answered_after_a_kill9(counting_source, make_mount):
    """A READ that a reader thread (queues > 1) took off the connection and handed to the trio
    thread, waiting on a slow source when the serving process is killed: the next process is
    sent it again (NOTIFY_RESEND) and answers it with the right bytes. The threads read through
    duplicates of the supervisor's descriptor; had they read through FUSE_DEV_IOC_CLONE clones,
    the kernel would have ended the request with the dead process (ECONNABORTED)."""
    data = fill(counting_source.real, {"slow.bin": 2 * MiB}, seed=21)["slow.bin"]
    counting_source.start()
    m = make_mount(counting_source.path, ["session=kernel", "passthrough=off", "queues=4", "readahead=off"])
    # O_DIRECT: the READ is the reader's own request (a failed readahead would be retried by
    # the kernel with a request of its own, hiding what became of the first)
    fd = os.open(m.mountpoint / "slow.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        wait_for_the_journal(_journal_of(m), m.pid, {"slow.bin": data}, handles=1)
        counting_source.set_faults({"slow.bin": {"delay": 3600}})
        outcome: dict[str, object] = {}

        def read() -> None:
            buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
            try:
                outcome["bytes"] = bytes(buf[:os.preadv(fd, [buf], 0)])
            except OSError as e:
                outcome["error"] = e

        reader = threading.Thread(target=read)
        reader.start()
        counting_source.wait_held()  # the READ reached the daemon, which waits on the source
        old = m.pid
        os.kill(old, signal.SIGKILL)
        # the READ sent again is answered at once; and the dead process's own read of the
        # source ends (a copy from the source may wait for it unkillably)
        counting_source.set_faults({})
        wait_gone(old)
        m.pid = _new_serving_pid(m, old)
        reader.join(WAIT)
        assert outcome == {"bytes": data[:MiB]}
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", [b"{not json", b'{"format": 999}'])
def test_a_damaged_journal_ends_the_mount_with_one_log_line(tmp_path, make_mount, damage):
    src = tmp_path / "src"
    contents = fill(src, {"a.bin": 1 << 20})
    m = make_mount(src)
    assert file_bytes(m.mountpoint / "a.bin") == contents["a.bin"]
    _wait_for_journal(m)
    path = _journal_of(m)
    log_path = path.parent / "daemon.log"
    os.kill(m.supervisor_pid, signal.SIGSTOP)  # the journal is damaged while no one writes it
    try:
        os.kill(m.pid, signal.SIGSTOP)
        path.write_bytes(damage)
        m.kill9_serving()
    finally:
        os.kill(m.supervisor_pid, signal.SIGCONT)
    wait_gone(m.supervisor_pid)  # the mount ends: the supervisor lets the connection go
    m.supervisor_pid = None
    lines = [line for line in log_path.read_text().splitlines() if "journal refused" in line]
    # one of another format is tried again by the release that mounted: refused as well
    assert len(lines) == (2 if b"999" in damage else 1), lines
    with pytest.raises(OSError) as info:
        os.listdir(m.mountpoint)
    assert info.value.errno == errno.ENOTCONN  # as a crash without a supervisor: nothing served
