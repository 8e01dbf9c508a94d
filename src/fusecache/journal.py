"""The journal: the serving process's adapter state (livestate.LiveState), kept in the store
dir so that a process the supervisor starts after a crash (supervisor.py) can answer the
inode numbers and handles the kernel still holds.

Never on the read path: the adapter marks it changed (a lookup, forget, open, release,
opendir, releasedir) and a task writes it at most every INTERVAL seconds, atomically
(private.write_file), from a worker thread. What changed after the last write is lost at a
crash, and what that costs is bounded (docs/semantics.md, "A crash of the serving process"):
- an inode the kernel got since is unknown: ESTALE, and the kernel looks its path up again;
- a handle opened since is unknown: it is opened again at its first read on the version its
  inode names if that inode is known, else its reads fail with EIO (never another file's
  bytes: `for_recovery` moves the new process's handle numbers past any the dead one gave out);
- backing ids are never in the window: `flush()` writes at once before a passthrough inode's
  first id is answered and before its last is closed;
- a handle released since is opened again and held until unmount; a lookup count is off
  by what was looked up or forgotten since (an entry kept too long, or an ESTALE).
A journal of another format or damaged is refused (StateError, one line): nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from . import private
from .livestate import LiveState, StateError, decode, encode

log = logging.getLogger(__name__)

NAME = "journal.json"
INTERVAL = 0.5  # seconds: the most a crash can lose of the adapter's changes, plus a write
FIRST_POLL = 0.01  # seconds: how often the first state is looked for, until INIT is answered
# Handle numbers a process can give out between two journal writes are far fewer than this:
# a recovered process numbers its handles from here on, so no new handle takes the number
# of one the kernel holds from after the last write.
FH_GAP = 1 << 40


class Journal:
    """Writes `snapshot()` to path whenever `changed()` was called, at most every INTERVAL."""

    def __init__(self, path: Path, snapshot: Callable[[], LiveState | None]) -> None:
        """snapshot: the state now, or None while there is none to write (before INIT)."""
        self.path = path
        self.snapshot = snapshot
        self._dirty = True  # a new process writes its state once at least
        self.writes = 0
        self._writing = trio.Lock()  # one write at a time: they share the temporary file

    def changed(self) -> None:
        self._dirty = True

    def take(self) -> bytes | None:
        """The state to write if it changed since the last take(), else None. On the trio
        thread (the adapter's tables are only consistent there)."""
        if not self._dirty:
            return None
        state = self.snapshot()
        if state is None:
            return None
        self._dirty = False
        return encode(state)

    def write(self, data: bytes) -> None:
        private.write_file(self.path, data)
        self.writes += 1

    async def flush(self) -> bool:
        """Write the state now (before a passthrough inode's first backing id is answered,
        before its last is closed: the kernel holds one backing file per inode, and a journal
        that named another would make the inode's opens fail after a crash); whether the
        journal holds it now (not if the write failed, or there is no state yet)."""
        self._dirty = True
        return await self._write_taken()

    async def _write_taken(self) -> bool:
        async with self._writing:
            data = self.take()
            if data is None:
                return not self._dirty  # nothing changed (written), or no state yet
            try:
                await trio.to_thread.run_sync(self.write, data)
            except OSError as e:  # a full disk must not end the mount: retried next time
                log.warning("cannot write the journal %s: %s", self.path, e)
                self._dirty = True
                return False
            return True

    async def run(self) -> None:
        """Write the state when it changed, every INTERVAL seconds, until cancelled; the first
        time as soon as there is one (INIT answered): a crash before it ends the mount."""
        while True:
            await trio.sleep(INTERVAL if self.writes else FIRST_POLL)
            await self._write_taken()

    def remove(self) -> None:
        """The mount ended cleanly (or was handed over): no process will recover from it."""
        self.path.unlink(missing_ok=True)


def read(path: Path) -> LiveState:
    """The journal at path; StateError (one line) if missing, damaged or of another format."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"no journal at {path} (the serving process died before writing one)") from None
    return decode(data)


def for_recovery(state: LiveState) -> LiveState:
    """The journal's state made safe to serve after a crash: handle numbers move on by
    FH_GAP (its backing ids are all kept: passthrough.Passthrough.import_state)."""
    adapter = state.adapter
    return dataclasses.replace(state, adapter=dataclasses.replace(adapter, next_fh=adapter.next_fh + FH_GAP))
