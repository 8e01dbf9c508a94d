"""The journal: the serving process's adapter state (livestate.LiveState), kept in the store
dir so that a process the supervisor starts after a crash (supervisor.py) can answer the
inode numbers and handles the kernel still holds.

Never on the read path: the adapter marks it changed (a lookup, forget, open, release,
opendir, releasedir) and a task writes it at most every INTERVAL seconds, atomically
(private.write_file), from a worker thread. Its snapshot is taken on the event loop and costs
in proportion to what the kernel holds (20,000 inodes: a fifth of a second here), so the
writes are spaced further apart for a large state: the journal takes at most 1/LOOP_SHARE of
the loop, where the requests are answered. What changed after the last write is lost at a
crash, and what that costs is bounded (docs/semantics.md, "A crash of the serving process"):
- an inode the kernel got since is unknown: ESTALE, and the kernel looks its path up again;
- a handle opened since is unknown: it is opened again at its first read on the version its
  inode names if that inode is known, else its reads fail with EIO (never another file's
  bytes: `for_recovery` moves the new process's handle numbers past any the dead one gave out);
- backing ids are never in the window: `flush_backing()` writes them at once, to a file of
  their own beside the journal (BACKING_NAME), before a passthrough inode's first id is
  answered and before its last is closed; `read` takes them from there. The whole state at
  each of those opens and releases was a write of everything the kernel holds: 60 ms an open
  with 2,000 files held, a fifth of a second with 20,000. Each write of the ids names the
  journal written before it (its sha256): ids beside another journal are not paired with it;
- a handle released since is opened again and held until unmount; a lookup count is off
  by what was looked up or forgotten since (an entry kept too long, or an ESTALE).
A journal of another format or damaged is refused (StateError, one line): nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from . import private
from .livestate import FORMAT, Backing, BackingIds, LiveState, StateError, decode, decode_backing, encode

log = logging.getLogger(__name__)

NAME = "journal.json"
BACKING_NAME = "backing.json"  # the backing ids, beside it
INTERVAL = 0.5  # seconds: the most a crash can lose of the adapter's changes, plus a write
LOOP_SHARE = 10  # a write waits at least this many times what its snapshot held the loop
MAX_PAUSE = 5.0  # seconds: but no longer (one stall of the loop must not stretch the window)
FIRST_POLL = 0.01  # seconds: how often the first state is looked for, until INIT is answered
# Handle numbers a process can give out between two journal writes are far fewer than this:
# a recovered process numbers its handles from here on, so no new handle takes the number
# of one the kernel holds from after the last write.
FH_GAP = 1 << 40


class Journal:
    """Writes `snapshot()` to path whenever `changed()` was called, at most every `pause`
    seconds, and `backing()` beside it whenever asked (flush_backing)."""

    def __init__(self, path: Path, snapshot: Callable[[], LiveState | None],
                 backing: Callable[[], list[Backing]] = list) -> None:
        """snapshot: the state now, or None while there is none to write (before INIT);
        backing: the backing ids now (the state's, got without the rest)."""
        self.path = path
        self.backing_path = path.with_name(BACKING_NAME)
        self.snapshot = snapshot
        self.backing = backing
        self._dirty = True  # a new process writes its state once at least
        self.writes = 0
        self.pause = INTERVAL  # seconds until the next write: INTERVAL, more for a large state
        self._writing = trio.Lock()  # one write at a time: they share the temporary files
        self._journal_digest = ""  # sha256 of the last journal this process wrote
        self._had_state = False  # a snapshot was taken: the polling for the first one is over

    def changed(self) -> None:
        self._dirty = True

    def continue_from_disk(self) -> None:
        """This process serves on from the journal on disk (a recovery, or a restart the old
        daemon handed over after writing it): until this process writes one of its own, the
        backing ids it writes name that journal, being newer than it. Naming none, they were
        never paired with it, and a crash before this process's first write (a full disk)
        had the next process take that journal's older ids: ids the kernel holds missing,
        ids closed since given out."""
        try:
            self._journal_digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            pass  # none to follow: ids naming none are paired with none

    def take(self) -> tuple[list[Backing], bytes] | None:
        """(backing ids, state) to write if the state changed since the last take(), else
        None. On the trio thread (the adapter's tables are only consistent there)."""
        if not self._dirty:
            return None
        began = time.monotonic()
        state = self.snapshot()
        if state is None:
            return None
        self._had_state = True
        self._dirty = False
        data = state.adapter.backing, encode(state)
        self.pause = min(MAX_PAUSE, max(INTERVAL, LOOP_SHARE * (time.monotonic() - began)))
        return data

    def write(self, backing: list[Backing], state: bytes | None = None) -> None:
        """The state, then the ids naming it: ids at least as new as the journal they name.
        Should the write of the ids fail, the journal's own are as new as it."""
        if state is not None:
            private.write_file(self.path, state)
            self._journal_digest = hashlib.sha256(state).hexdigest()
            self.writes += 1
        ids = BackingIds(FORMAT, os.getpid(), self._journal_digest, backing)
        private.write_file(self.backing_path, encode(ids))

    async def flush(self) -> bool:
        """Write the state now (a recovered daemon's handle numbers moved on before it gives
        out one; a restart in place); whether the journal holds it now (not if the write
        failed, or there is no state yet)."""
        self._dirty = True
        return await self._write_taken()

    async def flush_backing(self) -> bool:
        """Write the backing ids now: before a passthrough inode's first backing id is
        answered and before its last is closed. The kernel holds one backing file per inode:
        a journal that named another id, or none, would have every open of that inode fail
        after a crash (a new id refused), and one naming an id closed since would have its
        opens given a stale id. Whether they are written (not if the write failed)."""
        async with self._writing:
            return await self._write(self.backing())

    async def _write_taken(self) -> bool:
        async with self._writing:
            data = self.take()
            if data is None:
                return not self._dirty  # nothing changed (written), or no state yet
            if not await self._write(*data):
                self._dirty = True
                return False
            return True

    async def _write(self, backing: list[Backing], state: bytes | None = None) -> bool:
        try:
            await trio.to_thread.run_sync(self.write, backing, state)
        except OSError as e:  # a full disk must not end the mount: retried next time
            log.warning("cannot write the journal %s: %s", self.path, e)
            return False
        return True

    async def run(self) -> None:
        """Write the state when it changed, every `pause` seconds, until cancelled; the first
        time as soon as there is one (INIT answered): a crash before it ends the mount. A
        write that failed (a full disk) is tried again a pause later, not at the first poll's
        pace: each try takes a snapshot on the loop."""
        while True:
            await trio.sleep(self.pause if self._had_state else FIRST_POLL)
            await self._write_taken()

    def remove(self) -> None:
        """The mount ended cleanly (or was handed over): no process will recover from it."""
        self.path.unlink(missing_ok=True)
        self.backing_path.unlink(missing_ok=True)


def read(path: Path) -> LiveState:
    """The journal at path, with the backing ids written after it; StateError (one line) if
    missing, damaged or of another format.

    The ids beside the journal are the newest, so they are the state's. A handle the journal
    lists on an inode whose id the ids do not name as the journal does was released after the
    journal's write: an id is closed only after its inode's last passthrough release, and one
    is registered only while the inode has no other open. Left out: a passthrough handle
    with no id would not hold together, and a cached one would have the inode's opens
    answered in cached mode while the kernel holds it in passthrough mode (EIO).

    Ids that name another journal are left out: written by this fusecache before a
    fusecache that keeps the ids in the journal wrote it (a restart into an earlier
    version), or their write failed after the journal's. Either way the journal's own ids are
    as new as it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"no journal at {path} (the serving process died before writing one)") from None
    except OSError as e:
        raise StateError(f"cannot read the journal {path}: {e.strerror or e}") from None
    state = decode(data)
    try:
        ids = decode_backing(path.with_name(BACKING_NAME).read_bytes())
    except FileNotFoundError:
        return state
    except OSError as e:
        raise StateError(f"cannot read the backing ids beside {path}: {e.strerror or e}") from None
    if ids.journal != hashlib.sha256(data).hexdigest():
        log.warning("backing ids of another journal beside %s: the journal's own are taken", path)
        return state
    journaled = {b.inode: b.backing_id for b in state.adapter.backing}
    newest = {b.inode: b.backing_id for b in ids.backing}
    files = [f for f in state.adapter.files if newest.get(f.inode) == journaled.get(f.inode)]
    return dataclasses.replace(state, adapter=dataclasses.replace(state.adapter, files=files, backing=ids.backing))


def for_recovery(state: LiveState) -> LiveState:
    """The journal's state made safe to serve after a crash: handle numbers move on by
    FH_GAP (its backing ids are all kept: passthrough.Passthrough.import_state)."""
    adapter = state.adapter
    return dataclasses.replace(state, adapter=dataclasses.replace(adapter, next_fh=adapter.next_fh + FH_GAP))
