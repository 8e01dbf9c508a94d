"""Descriptors per user: what the files one uid holds open through the mount may pin.

Every tracked file in use holds descriptors of the daemon's budget (files.OpenFiles). Left
unbounded, one user (with allow_other) could hold files open until the budget is spent, and
every other user's open would then fail with EMFILE. So each handle is attributed to the uid
that opened it, and the tracked files a uid has handles on may hold at most `limit`
descriptors (half the budget): past that, that uid's opens fail with EMFILE, logged once a
minute per uid, and nobody else's. A file several uids hold is counted for each of them; an
open directory (one descriptor of its own) counts for the uid that opened it. Root (uid 0) is
not bounded: it can exhaust the daemon's resources by other means anyway, and a root loader
on a private mount keeps the whole budget.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Hashable

log = logging.getLogger(__name__)

WARN_INTERVAL = 60.0  # seconds between two log lines about one uid at its limit


class UidShares:
    """Per uid, the tracked files its open handles hold and their descriptors."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._files: dict[int, Counter[Hashable]] = {}  # uid -> tracked file -> its handles
        self._fds: Counter[int] = Counter()  # uid -> descriptors its files hold
        self._warned: dict[int, float] = {}

    def held(self, uid: int) -> int:
        """Descriptors the files uid has open hold."""
        return self._fds[uid]

    def add(self, uid: int, file: Hashable, fds: int) -> None:
        """Attribute one more handle on file (holding fds descriptors) to uid, or raise EMFILE
        if uid's files would then hold more than the limit."""
        files = self._files.setdefault(uid, Counter())
        if not files[file] and uid != 0 and self._fds[uid] + fds > self.limit:
            if not files:
                del self._files[uid]
            self._refuse(uid)
        if not files[file]:
            self._fds[uid] += fds
        files[file] += 1

    def remove(self, uid: int, file: Hashable, fds: int) -> None:
        files = self._files[uid]
        files[file] -= 1
        if files[file]:
            return
        del files[file]
        self._fds[uid] -= fds
        if not files:
            del self._files[uid]
            del self._fds[uid]
            self._warned.pop(uid, None)

    def _refuse(self, uid: int) -> None:
        now = time.monotonic()
        if now - self._warned.get(uid, -WARN_INTERVAL) >= WARN_INTERVAL:
            self._warned[uid] = now
            log.warning("uid %d holds files open through the mount with %d descriptors, its share of %d: "
                        "its further opens fail with EMFILE until it closes some", uid, self._fds[uid], self.limit)
        raise OSError(errno.EMFILE, f"uid {uid} holds its share of the daemon's descriptors")
