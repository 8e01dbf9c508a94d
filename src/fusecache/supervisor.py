"""The supervisor: a small process that holds a mount's /dev/fuse descriptor, so that the
connection outlives the process serving it (a kill -9, an OOM kill, a crash).

It never reads /dev/fuse and runs nothing but this loop (no trio, no engine): the less it
does, the less can kill it. Killing the supervisor itself ends the mount as a crash did
before it existed (the kernel aborts the connection once no process holds it).

Every serving process registers on the supervisor's socket (`register`): it sends a
duplicate of the descriptor, and keeps the connection open for its whole life, so the
supervisor learns of its end, whatever the cause, as end-of-file on that connection. The
processes registered are kept in order; the first one serves. When it ends:
- another registered process follows it: a live restart (handover.py) took the connection
  over, and the new daemon registered before it told the old one to go;
- else, if the kernel still holds the connection open (the serving process died without
  unmounting), `spawn` starts a new serving process that takes it over from the journal
  (journal.py): at once, or, where serving processes keep dying, after a pause;
- else the mount was unmounted: the supervisor exits.
A process started by `spawn` that ends before registering (a journal refused, say) ends the
mount: the supervisor lets the descriptor go and exits.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import linux
from .session.mount import connected

log = logging.getLogger(__name__)

HELLO = b"serving\n"
POLL_SECONDS = 1.0  # how often children are reaped while nothing else happens
# A serving process that dies is replaced at once, unless QUICK_DEATHS died within
# DEATH_WINDOW seconds already: then the next starts after a pause, doubling with each further
# death up to PAUSE_MAX. A request that kills every daemon it reaches (a bug) would otherwise
# have them started, each loading the store, as fast as they die. The mount stays: readers
# wait, as during any recovery.
QUICK_DEATHS = 3
DEATH_WINDOW = 60.0
PAUSE_MAX = 30.0

# spawn(fuse_fd, installed): start a serving process that takes the connection on fuse_fd over,
# running the fusecache installed now (installed) or the supervisor's own modules; its pid
Spawn = Callable[[int, bool], int]
# How a serving process started to take the connection over says it cannot, being another
# release than the one that served it (the journal is of another state format); exit status
# 2, a usage error, says so too (an older release that has no --recover-fd, or refuses an
# option). The supervisor then starts one from its own modules, the release that wrote it.
OTHER_RELEASE = 3


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_ctime_ns) == (b.st_dev, b.st_ino, b.st_ctime_ns)


def socket_for(control_socket: Path) -> Path:
    """The supervisor's socket, beside the mount's control socket (same private directory)."""
    return control_socket.with_suffix(".supervisor")


def listen(path: Path) -> socket.socket:
    """Bind the supervisor's socket (mode 0600: only the mount's owner registers)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(8)
    return sock


def register(path: Path, fuse_fd: int) -> tuple[socket.socket, int] | None:
    """Register this process as serving the connection on fuse_fd with the supervisor at
    path: the connection to keep open for the process's whole life, and the supervisor's
    pid; None if no supervisor listens there (a mount without one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        sock.sendmsg([HELLO], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fuse_fd]))])
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    pid, _uid, _gid = linux.peer_credentials(sock)
    return sock, pid


@dataclass
class _Serving:
    conn: socket.socket
    pid: int


class Supervisor:
    """The loop (see the module docstring)."""

    def __init__(self, listener: socket.socket, spawn: Spawn, first_pid: int) -> None:
        """first_pid: the serving process started with the supervisor, not registered yet."""
        self.listener = listener
        self._bound = os.stat(listener.getsockname())  # its socket file, removed at the end if still ours
        self.spawn = spawn
        self.fuse_fd: int | None = None
        self.serving: list[_Serving] = []
        self.starting: int | None = first_pid  # a process started to serve that has not registered
        self.starting_installed = False  # whether it runs the fusecache installed now (not ours)
        self.start_at: float | None = None  # when to start the next serving process, after a death
        self._deaths: list[float] = []  # when serving processes died, within DEATH_WINDOW

    def run(self) -> int:
        """Supervise until the mount ends; the exit status."""
        while True:
            readable, _, _ = select.select([self.listener, *(s.conn for s in self.serving)], [], [], POLL_SECONDS)
            for ready in readable:
                if ready is self.listener:
                    self._accept()
                else:
                    self._ended(next(s for s in self.serving if s.conn is ready))
            self._start_if_due()
            if self._reap_starting_failed():
                log.error("the process started to serve the mount exited before serving: the mount ends")
                return self._finish(1)
            if not self.serving and self.starting is None and self.start_at is None:
                return self._finish(0)

    def close_in_child(self) -> None:
        """In a process forked from the supervisor: let go of the supervisor's sockets."""
        self.listener.close()
        for s in self.serving:
            s.conn.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, len(HELLO), 1)
            pid = linux.peer_credentials(conn)[0]
        except OSError as e:
            log.warning("a registration failed: %s", e)
            conn.close()
            return
        for fd in fds:
            if self.fuse_fd is None:
                self.fuse_fd = fd
            else:
                os.close(fd)  # the same connection: one descriptor is enough
        if self.fuse_fd is None:
            conn.close()
            return
        self.serving.append(_Serving(conn, pid))
        if pid == self.starting:
            self.starting = None
        log.info("pid %d %s", pid, "serves the mount" if len(self.serving) == 1 else "registered to take it over")

    def _ended(self, ended: _Serving) -> None:
        """A registered process ended (its connection reads end-of-file)."""
        ended.conn.close()
        current = self.serving[0] is ended
        self.serving.remove(ended)
        if not current:
            return  # a restart that did not go through
        if self.serving:
            log.info("pid %d handed the mount over to pid %d", ended.pid, self.serving[0].pid)
        else:
            self._died(ended.pid, "serving the mount")

    def _died(self, pid: int, doing: str) -> None:
        """The process serving the mount, or starting to, died: another is started, at once or
        after a pause (see the module docstring), while the kernel holds the connection."""
        if self.fuse_fd is not None and connected(self.fuse_fd):
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
            quick = len(self._deaths) - QUICK_DEATHS
            pause = 0.0 if quick <= 0 else min(PAUSE_MAX, float(2 ** (quick - 1)))
            log.warning("pid %d, %s, died%s: starting a new serving process%s", pid, doing,
                        f" ({len(self._deaths)} in {DEATH_WINDOW:g} s)" if pause else "",
                        f" in {pause:g} s" if pause else "")
            self.start_at = now + pause
            self._start_if_due()

    def _start_if_due(self) -> None:
        """Start the serving process a death called for, once its pause is over (if the
        kernel still holds the connection: an unmount meanwhile ends the mount instead)."""
        if self.start_at is None or time.monotonic() < self.start_at:
            return
        self.start_at = None
        if self.fuse_fd is not None and connected(self.fuse_fd):
            self.starting, self.starting_installed = self.spawn(self.fuse_fd, True), True

    def _reap_starting_failed(self) -> bool:
        """Reap exited children; True if the one starting to serve exited before registering."""
        failed = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return failed
            if pid == 0:
                return failed
            if pid == self.starting:
                self.starting = None
                if os.WIFSIGNALED(status) and self.fuse_fd is not None and not self.serving:
                    # killed (the OOM killer, kill -9) while it took the mount over: not a
                    # journal it refused, which ends the mount: another is started
                    self._died(pid, "taking the mount over")
                elif (self.starting_installed and os.WIFEXITED(status) and os.WEXITSTATUS(status) in (2, OTHER_RELEASE)
                      and self.fuse_fd is not None and not self.serving and connected(self.fuse_fd)):
                    log.warning("the fusecache installed now cannot take the mount over (pid %d, exit status %d): "
                                "recovering with the fusecache it was mounted with", pid, os.WEXITSTATUS(status))
                    self.starting, self.starting_installed = self.spawn(self.fuse_fd, False), False
                else:
                    failed = not self.serving

    def _finish(self, status: int) -> int:
        if self.fuse_fd is not None:
            os.close(self.fuse_fd)
        path = self.listener.getsockname()
        self.listener.close()
        try:  # unless a supervisor of the next mount at the path bound it anew since (the inode
            # number alone may be the freed one's again: the ctime tells them apart)
            now = os.stat(path)
            if _same_file(now, self._bound):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return status
