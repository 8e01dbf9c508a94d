"""systemd's service protocol, our side, without libsystemd: messages to the service manager
(sd_notify: READY=1, and the fd store's FDSTORE=1 and FDSTOREREMOVE=1) and the descriptors it
passes back to a service it starts again (sd_listen_fds_with_names).

Under systemd the fd store is what keeps a mount's /dev/fuse connection open across a crash
of the daemon (daemon.py stores it; docs/operations.md). The protocol:
- a message is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket named
  by $NOTIFY_SOCKET (a leading "@" names an abstract socket); descriptors ride along as
  SCM_RIGHTS;
- a started service finds the descriptors of its store from fd 3 on: $LISTEN_FDS of them,
  named by $LISTEN_FDNAMES (":"-separated), meant for it only if $LISTEN_PID is its pid.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Sequence

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
FUSE_FD_NAME = "fuse"  # what the fd store keeps the /dev/fuse connection under
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def available() -> bool:
    """Whether a service manager listens ($NOTIFY_SOCKET is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """Send message (with fds) to the service manager; False if there is none or it cannot be
    reached (a warning: a service manager that went away must not take the mount down)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendmsg([message.encode()], ancillary, 0, address)
    except OSError as e:
        log.warning("could not notify systemd (%s): %s", message.replace("\n", " "), e)
        return False
    return True


def store_fd(fd: int, name: str) -> bool:
    """Keep a duplicate of fd in the service's fd store under name (FileDescriptorStoreMax=
    must allow it); storing the same descriptor again is a no-op for systemd."""
    return notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def remove_fd(name: str) -> bool:
    """Close and forget what the fd store keeps under name."""
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def passed_fds() -> dict[str, list[int]]:
    """The descriptors the service manager passed to this process, by name (several may share
    one), taken once: the variables are removed so that nothing started later takes them for
    its own, and the descriptors are made close-on-exec. Empty when none were passed, or they
    were meant for another process (LISTEN_PID)."""
    values = {name: os.environ.pop(name, None) for name in _LISTEN_VARIABLES}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    passed: dict[str, list[int]] = {}
    for i, fd in enumerate(fds):
        os.set_inheritable(fd, False)
        passed.setdefault(labels[i] if i < len(labels) else "unknown", []).append(fd)
    return passed
