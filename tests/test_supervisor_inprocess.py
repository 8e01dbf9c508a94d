"""The supervisor's choice when a serving process dies (fusecache.supervisor), in process: no
mount, no root. A pipe stands in for the /dev/fuse descriptor (one the kernel still holds
open, as `connected` sees it), socket pairs for the serving processes' registrations, and a
recording function for `spawn`.

What it proves: a serving process that dies is replaced at once, and so are the next two
within a minute; past that each new one starts after a pause that doubles up to a bound (a
request that kills every daemon it reaches must not have them started as fast as they die),
the mount staying all the while; an unmount during a pause starts nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from fusecache import supervisor
from fusecache.supervisor import PAUSE_MAX, QUICK_DEATHS, Supervisor, _Serving


class Started:
    """spawn(): records each start, with a new pid."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.installed: list[bool] = []  # whether each runs the fusecache installed now

    def __call__(self, fuse_fd: int, installed: bool) -> int:
        self.pids.append(1000 + len(self.pids))
        self.installed.append(installed)
        return self.pids[-1]


@pytest.fixture
def watched(tmp_path):
    listener = supervisor.listen(tmp_path / "sup")
    fuse_out, fuse_in = os.pipe()
    started = Started()
    sup = Supervisor(listener, started, first_pid=None)
    sup.fuse_fd = fuse_out
    yield sup, started
    os.close(fuse_in)
    sup._finish(0)


def die(sup: Supervisor, pid: int) -> None:
    """A registered serving process ends: its connection reads end-of-file."""
    ours, theirs = socket.socketpair()
    theirs.close()
    sup.serving.append(_Serving(ours, pid))
    sup.starting = None
    sup._ended(sup.serving[-1])


def test_deaths_in_a_row_are_replaced_at_once_then_after_growing_pauses(watched):
    sup, started = watched
    for n in range(QUICK_DEATHS):
        die(sup, 10 + n)
        assert len(started.pids) == n + 1 and sup.start_at is None  # at once
    pauses = []
    for n in range(8):
        die(sup, 20 + n)
        assert len(started.pids) == QUICK_DEATHS + n  # not yet
        pauses.append(round(sup.start_at - time.monotonic()))
        sup._start_if_due()
        assert len(started.pids) == QUICK_DEATHS + n  # still not: the pause is not over
        sup.start_at = time.monotonic()  # now it is
        sup._start_if_due()
        assert len(started.pids) == QUICK_DEATHS + n + 1 and sup.start_at is None
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 30] and PAUSE_MAX == 30


def test_an_unmount_during_a_pause_starts_nothing(watched):
    sup, started = watched
    for n in range(QUICK_DEATHS + 1):
        die(sup, 10 + n)
    assert sup.start_at is not None and len(started.pids) == QUICK_DEATHS
    os.close(sup.fuse_fd)  # the kernel let the connection go
    sup.fuse_fd = None
    sup.start_at = time.monotonic()
    sup._start_if_due()
    assert len(started.pids) == QUICK_DEATHS and sup.start_at is None


@pytest.mark.parametrize("end, mount_ends", [("killed", False), ("exited", True)])
def test_a_process_taking_the_mount_over_that_is_killed_is_replaced(watched, end, mount_ends):
    """A process started after a death that is itself killed before it registers (the OOM
    killer again, a second kill -9) ended the mount, as one that refused the journal does:
    every reader got ENOTCONN. Killed, it is now replaced like any death; one that exits
    (a journal refused: its one log line says why) still ends the mount. (Found by review.)"""
    sup, started = watched
    child = subprocess.Popen(["sleep", "30"] if end == "killed" else ["false"])
    sup.starting = child.pid
    if end == "killed":
        child.kill()
    deadline = time.monotonic() + 10
    while True:  # as the supervisor's loop reaps
        failed = sup._reap_starting_failed()
        if sup.starting != child.pid:  # reaped: none starting, or the next one
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert failed == mount_ends
    assert started.pids == ([] if mount_ends else [1000])  # replaced at once (the first death)
    child.returncode = 0  # reaped by the supervisor, not by Popen


def test_deaths_further_apart_than_the_window_are_each_replaced_at_once(watched):
    """Only deaths within DEATH_WINDOW count towards the pauses: a daemon that dies once a
    week is always replaced at once. (Found by review: nothing tested the window.)"""
    sup, started = watched
    sup._deaths = [time.monotonic() - supervisor.DEATH_WINDOW - 1] * (QUICK_DEATHS + 5)
    die(sup, 10)
    assert started.pids == [1000] and sup.start_at is None


def test_the_supervisors_socket_goes_with_it_unless_the_next_mount_bound_it_anew(tmp_path):
    """The supervisor's socket was left behind by every mount (thousands of them in the
    runtime directory of a busy node). It is removed at the end, if it is still its own."""
    for rebound in (False, True):
        path = tmp_path / f"sup-{rebound}"
        sup = Supervisor(supervisor.listen(path), Started(), first_pid=None)
        if rebound:
            next_one = supervisor.listen(path)  # the next mount's supervisor, at the same path
        sup._finish(0)
        assert path.exists() == rebound
        if rebound:
            next_one.close()


@pytest.mark.parametrize("status", [2, supervisor.OTHER_RELEASE])
def test_a_recovery_by_another_release_falls_back_to_the_release_that_mounted(watched, status):
    """The supervisor recovers a mount with the fusecache installed now; after an upgrade
    that bumped the state format it refuses the journal (exit 3), after a downgrade it has no
    --recover-fd (exit 2, a usage error). The mount ended; now the supervisor's own modules,
    the release that wrote the journal, take it over. If they cannot either, it ends."""
    sup, started = watched
    die(sup, 10)
    assert started.installed == [True]
    for installed in (False, None):
        child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])
        sup.starting = child.pid
        failed = _reap(sup, child.pid)  # as the supervisor's loop reaps
        child.returncode = status  # reaped by the supervisor, not by Popen
        if installed is None:  # its own modules could not either: the mount ends
            assert failed and started.installed == [True, False]
        else:
            assert not failed and started.installed == [True, installed] and sup.starting == started.pids[-1]


def _reap(sup: Supervisor, pid: int) -> bool:
    deadline = time.monotonic() + 10
    while True:
        failed = sup._reap_starting_failed()
        if sup.starting != pid:
            return failed
        assert time.monotonic() < deadline
        time.sleep(0.01)
