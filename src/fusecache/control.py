"""The local control channel: a unix socket per mount, one JSON request and reply per line.
This module is its client side and what both sides share; the daemon's side is
controlserver.py, kept apart so that a command (`status`, `prefetch`, `umount`) starts
without loading trio and the daemon.

The socket lives in the runtime dir under a name derived from the mountpoint, so a client
finds it from the mountpoint alone. It is created mode 0600, and every connection's peer
credentials (SO_PEERCRED) are checked: only root and the user who mounted may use it, since
prefetch and eviction spend the node's network and disk.

A client gives up on a daemon that stays silent (stopped, hung), never on one that is busy:
while a request is worked on, the daemon sends a heartbeat.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat as stat_mod
import time
from pathlib import Path

from . import linux, private, supervisor
from .config import runtime_dirs
from .mounts import find_mount, resolve_mountpoint

MAX_REQUEST = 1 << 20
MAX_REPLY = 1 << 30  # `cache ls` of 200,000 files is some 30 MB
TIMEOUT = 30.0  # seconds of silence after which a client gives up on the daemon
HEARTBEAT = 2.0  # seconds between the daemon's heartbeats, well within any client's TIMEOUT


class ControlError(Exception):
    """A control request failed; the message is shown to the user as is."""


class ControlTimeout(ControlError):
    """The daemon went silent: it is stopped or hung (a busy one sends heartbeats)."""


def socket_path(mountpoint: str, owner_uid: int) -> Path:
    """The socket of the mount at `mountpoint`, spelled as mountinfo lists it. Not resolved
    here: resolving a mountpoint is a request to its daemon (see mounts.resolve_mountpoint).
    Of the places the owner's sockets may be (config.runtime_dirs), the one holding a socket
    of this mount (a daemon's, or its supervisor's, beside which every daemon it starts
    binds), else the preferred one."""
    name = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16] + ".sock"
    dirs = runtime_dirs(owner_uid)
    held = (d for d in dirs if any(os.path.lexists(at) for at in (d / name, supervisor.socket_for(d / name))))
    return next(held, dirs[0]) / name


def call(mountpoint: str, request: dict, timeout: float = TIMEOUT, total: float | None = None) -> dict:
    """Send one request to the daemon serving mountpoint; raise ControlError on failure,
    ControlTimeout if the daemon stays silent for `timeout` seconds, or takes more than
    `total` seconds in all (a question answered from memory: status, pid)."""
    path, owner_uid = _endpoint(mountpoint)
    return send_request(path, request, timeout, mountpoint, peer_uid=owner_uid, total=total)


def socket_of(mountpoint: str) -> Path:
    """The control socket of the daemon serving mountpoint, checked (see _endpoint)."""
    return _endpoint(mountpoint)[0]


def _endpoint(mountpoint: str) -> tuple[Path, int]:
    """The control socket of the daemon serving mountpoint and the uid it runs as (the
    mount's owner). Checked: its directory is the owner's (or root's) alone, and it is a
    socket of the owner's itself. A symlink there, which the owner of a user mount can make,
    would have root's commands act on whatever socket it names, root's own mounts' too."""
    path = resolve_mountpoint(mountpoint)
    info = find_mount(path)
    if info is None or info.owner_uid is None:
        raise ControlError(f"{mountpoint} is not served by a running fusecache daemon")
    sock_path = socket_path(path, info.owner_uid)
    try:
        reason = private.refusal(sock_path.parent, os.lstat(sock_path.parent), (0, info.owner_uid))
        st = os.lstat(sock_path)
    except FileNotFoundError:
        raise ControlError(f"{mountpoint} is not served by a running fusecache daemon") from None
    except OSError as e:  # another user's runtime directory (0700)
        raise ControlError(f"cannot reach the control socket of {mountpoint}: {e.strerror}") from None
    if not reason and (not stat_mod.S_ISSOCK(st.st_mode) or st.st_uid != info.owner_uid):
        reason = f"{sock_path} is not a socket of uid {info.owner_uid}"
    if reason:  # a socket someone else could have put there would answer in the daemon's name
        raise ControlError(f"refusing to use the control socket of {mountpoint}: {reason}")
    return sock_path, info.owner_uid


def is_listening(mountpoint: str, owner_uid: int) -> bool:
    """Whether a daemon still listens on the control socket of the mount at mountpoint,
    answering or not, or its supervisor on its own beside it (between a crash and the control
    socket of the daemon it starts next, the mount lives on: taken for stale, a new mount
    would unmount it). A stopped or hung daemon's socket still takes connections (the kernel
    queues them), a dead one's refuses them or is gone. Asks nothing, so it never waits for
    the daemon; a socket this user may not reach counts as listening."""
    path = socket_path(mountpoint, owner_uid)
    return any(_listening(at) for at in (path, supervisor.socket_for(path)))


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:  # EAGAIN (its queue is full), EACCES (another user's)
            return True
    return True


def send_request(path: Path, request: dict, timeout: float, mountpoint: str, peer_uid: int | None = None,
                 total: float | None = None) -> dict:
    """One exchange over the control socket at path; `mountpoint` names the mount in messages.
    peer_uid: the uid the daemon must run as (refused before anything is sent otherwise).
    total: seconds the whole answer may take, heartbeats or not (None: no limit)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)  # per receive: each heartbeat starts a new wait
        try:
            sock.connect(str(path))
            if peer_uid is not None and (uid := linux.peer_credentials(sock)[1]) != peer_uid:
                raise ControlError(f"refusing the control socket of {mountpoint}: it is served by uid {uid}, "
                                   f"the mount is uid {peer_uid}'s")
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = _reply_line(sock, mountpoint, time.monotonic() + total if total is not None else None)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"{mountpoint} is not served by a running fusecache daemon") from None
        except PermissionError:
            raise ControlError(f"permission denied: cannot use the control socket of {mountpoint}") from None
        except TimeoutError:
            raise ControlTimeout(f"the daemon of {mountpoint} did not answer within {timeout:g}s") from None
        except OSError as e:
            raise ControlError(f"cannot talk to the daemon of {mountpoint}: {e.strerror or e}") from None
    try:
        reply = json.loads(data, parse_constant=_no_constant)  # no NaN or Infinity: no number of ours
    except (ValueError, RecursionError):  # RecursionError: nested deeper than a reply of ours is
        raise ControlError(f"the daemon of {mountpoint} closed the control connection without an answer "
                           "it could read") from None
    if not isinstance(reply, dict):  # a daemon's answer is input: not always ours
        raise ControlError(f"the daemon of {mountpoint} sent a reply that is not one (a JSON {type(reply).__name__})")
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply


def _reply_line(sock: socket.socket, mountpoint: str, deadline: float | None) -> bytes:
    """One reply line, up to MAX_REPLY bytes, by the deadline where there is one (heartbeats
    keep a busy daemon's request alive, not one that only sends heartbeats)."""
    chunks: list[bytes] = []
    size = 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        more = sock.recv(1 << 20)
        if not more:
            break
        chunks.append(more)
        size += len(more)
        if size > MAX_REPLY:
            raise ControlError(f"the daemon of {mountpoint} sent a reply of more than {MAX_REPLY} bytes")
    return b"".join(chunks)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} in a reply")
