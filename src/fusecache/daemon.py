"""The daemon: wires source, store, engine, FUSE adapter, control handlers and exporters
together, loads the store, mounts, serves until unmounted or signalled, and unmounts on the
way out.

This is the composition root, the one module that knows every other; `fs.py` (the adapter)
is imported here and nowhere else. Its parts each have their own module: the checks before
mounting (precheck.py), the control commands (handlers.py), the exporters (exporters.py).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import trio

from . import exporters, handover, journal, mounts, private, sdnotify, supervisor
from .budget import CacheBudget
from .config import MountConfig
from .control import ControlError, socket_path
from .controlserver import ControlServer
from .engine import Engine
from .fs import FuseOperations
from .handlers import ControlHandlers, DaemonParts
from .handover import HandoverServer, MountArguments
from .journal import Journal
from .livestate import FORMAT, LiveState, OtherFormat, StateError
from .metrics import Metrics, prometheus_registry
from .passthrough import probe
from .precheck import FUSECACHE_FSTYPE, MountError, OtherRelease
from .session.kernel import KernelSession, SessionConfig, SessionError
from .session.mount import MountSpec, connected
from .session.types import Session
from .source import Source
from .store import CacheStore, StoreError

log = logging.getLogger(__name__)

Ready = Callable[[], None]
DEFAULT_CACHE_FRACTION = 0.8
STORE_WAIT = 30.0  # seconds a restarted daemon waits for the old one to let go of the store


def make_session(cfg: MountConfig, operations: FuseOperations, mountpoint: str, source_root: str,
                 in_memory: bool = False) -> Session:
    """The FUSE session cfg asks for: ours (kernel protocol), or pyfuse3's; its readers processes
    or threads (readers=auto: processes for a cache in memory, session/reader_process.py)."""
    spec = MountSpec(mountpoint=mountpoint, fsname=source_root, allow_other=cfg.allow_other)
    if cfg.session == "pyfuse3":
        from .session.pyfuse3_session import Pyfuse3Session  # libfuse only where asked for
        return Pyfuse3Session(operations, spec, cfg.workers)
    if cfg.readers == "processes" and not in_memory:
        log.warning("readers=processes on a cache on disk: the cache files' pages read for replies stay in "
                    "the page cache beside the mount's (readers=auto gives threads here, which drop them)")
    processes = "always" if cfg.readers == "processes" else "auto" if cfg.readers == "auto" and in_memory else "never"
    return KernelSession(operations, spec, SessionConfig(cfg.workers, cfg.max_background, cfg.passthrough, cfg.queues,
                                                         processes=processes))


def passthrough_state(cfg: MountConfig, session, store: CacheStore) -> str | None:
    """None if passthrough can be used on this mount, else why not (probed once)."""
    if not cfg.passthrough:
        return "turned off (passthrough=off)"
    if cfg.session != "kernel":
        return f"the {cfg.session} session has none (session=kernel has)"
    if session.backing is None:
        return "the kernel does not offer it (Linux 6.9 or newer with CONFIG_FUSE_PASSTHROUGH needed)"
    return probe(session.backing, store.lock_fd)


def run(cfg: MountConfig, store: CacheStore, ready: Ready, takeover: bool = False,
        recover_fd: int | None = None) -> int | None:
    """Mount and serve until unmounted; `ready` is called once the mount is live. takeover:
    serve the mount cfg names by taking it over from the daemon serving it (handover.py);
    recover_fd: serve the connection on this descriptor, whose serving process died, from
    the journal (journal.py; started by the supervisor, or by systemd with the descriptor
    its fd store kept). In both the store is not locked yet (the old daemon holds it until
    it exits). Returns None once unmounted or handed over, or the connection's descriptor
    when the daemon stopped serving to restart in place (handover.py): the caller execs."""
    raise_fd_limit()
    try:
        return trio.run(_serve, cfg, store, ready, takeover, recover_fd)
    except MountError:
        if recover_fd is not None and uses_fd_store(cfg):
            sdnotify.remove_fd(sdnotify.FUSE_FD_NAME)  # never served: the mount ends, as with a supervisor
        raise


def uses_fd_store(cfg: MountConfig) -> bool:
    """Whether systemd's fd store keeps this daemon's connection: a daemon of our session that
    systemd runs itself (in the foreground of a Type=notify service). A detached daemon has
    its supervisor: one keeper per mount."""
    return cfg.foreground and cfg.session == "kernel" and sdnotify.available()


def stored_connection(cfg: MountConfig) -> tuple[MountConfig, int] | None:
    """The connection systemd's fd store kept for this service while its daemon died, and cfg
    with the mountpoint as the mount table lists it (never stat'ed: that would wait on this
    very process); None for a first start. A kept connection that has ended meanwhile
    (unmounted, aborted) is dropped from the store, and the mount is made anew."""
    passed = sdnotify.passed_fds()
    kept = passed.pop(sdnotify.FUSE_FD_NAME, [])
    for fd in [fd for fds in passed.values() for fd in fds] + kept[1:]:
        os.close(fd)  # not ours, or a second copy of the same connection
    if not kept:
        return None
    fd = kept[0]
    mountpoint = mounts.resolve_mountpoint(str(cfg.mountpoint))
    info = mounts.find_mount(mountpoint)
    if info is None or info.fstype != FUSECACHE_FSTYPE or not connected(fd):
        log.warning("the connection the fd store kept for %s has ended: mounting anew", mountpoint)
        os.close(fd)
        sdnotify.remove_fd(sdnotify.FUSE_FD_NAME)
        return None
    log.info("the fd store kept the connection of %s: serving it again from the journal", mountpoint)
    return replace(cfg, mountpoint=Path(mountpoint)), fd


def raise_fd_limit() -> None:
    """Every file open through the mount holds descriptors in the daemon: take all the
    descriptors the hard limit allows (the soft default, 1024, runs out at a few hundred)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("descriptor limit raised from %d to %d", soft, hard)


def stable_inodes(cfg: MountConfig, fstype: str | None) -> bool:
    """Whether the source's inode numbers identify files for good: source_inodes=stable or
    unstable, or by default all but FUSE filesystems, whose daemons may make numbers up per
    mount (sshfs without use_ino numbers files as the kernel looks them up, and renumbers
    them once the kernel forgets them)."""
    if cfg.source_inodes != "auto":
        return cfg.source_inodes == "stable"
    stable = not (fstype or "").startswith("fuse") or fstype == "fuseblk"
    if not stable:
        log.info("source is on %s, whose inode numbers may change: cached files are validated "
                 "by size, mtime and ctime (source_inodes=stable to trust them)", fstype)
    return stable


async def _serve(cfg: MountConfig, store: CacheStore, ready: Ready, takeover: bool,
                 recover_fd: int | None) -> int | None:
    for message in cfg.deprecations:
        log.warning("%s", message)
    source_fstype = mounts.fstype_of(str(cfg.source))
    source = Source(cfg.source, stable_inodes=stable_inodes(cfg, source_fstype))
    metrics = Metrics()
    budget = CacheBudget(limit=sys.maxsize)  # the real limit is set once the store is loaded
    in_memory = mounts.fstype_of(str(store.root)) == "tmpfs"
    engine = Engine(cfg, source, store, metrics, budget, cache_in_memory=in_memory)
    operations = FuseOperations(engine, cfg.attr_timeout)
    # resolved by the supervisor for a recovery: a stat of the mountpoint would wait for this process
    mountpoint = str(cfg.mountpoint) if recover_fd is not None else os.path.realpath(cfg.mountpoint)
    supervised = _Supervised(supervisor.socket_for(socket_path(mountpoint, os.getuid())))
    handlers = ControlHandlers(DaemonParts(
        mountpoint, engine, store, metrics, passthrough_opens=operations.passthrough_opens,
        passthrough_state=lambda: operations.passthrough.off_reason or "on", supervisor_pid=supervised.pid))
    session = make_session(cfg, operations, mountpoint, source.root, in_memory)
    kernel = session if isinstance(session, KernelSession) else None
    if kernel is not None:
        metrics.count_elsewhere(kernel.served_by_processes)
    fd_store = uses_fd_store(cfg)
    journal_ = _journal(store, kernel, operations)
    restarts = HandoverServer(kernel, operations.export_state,
                              MountArguments(str(cfg.source), cfg.options, str(cfg.cache_dir), cfg.log_level,
                                             cfg.foreground),
                              journal=journal_.flush if journal_ is not None else None, in_place=fd_store)
    control = ControlServer(socket_path(mountpoint, os.getuid()), handlers.table() | restarts.table(),
                            owner_uid=os.getuid())
    registry = prometheus_registry(metrics)
    received = None
    try:
        control.prepare()
        if takeover:  # asked for before anything is bound: refused, the old daemon serves on
            received = await trio.to_thread.run_sync(handover.request, mountpoint, supervised.register)
            await trio.to_thread.run_sync(store.lock, STORE_WAIT)
        elif recover_fd is not None:
            received = _recover(store, recover_fd)
            await trio.to_thread.run_sync(store.lock, STORE_WAIT)
        elif journal_ is not None:
            journal_.remove()  # a journal of an earlier mount must never be taken for this one's
        if received is None:  # a mount taken over is served already: see serve_http_once_free below
            exporters.serve_http(cfg.metrics_addr, registry)
    except (private.UntrustedPath, exporters.ExporterError, ControlError, StoreError) as e:
        raise MountError(str(e)) from None
    failure = None
    async with trio.open_nursery() as nursery:
        # The store is loaded before mounting: a mountpoint whose INIT waited for it would
        # hang every process that touches it (a stat took 8.8 s with 30k cached files).
        await nursery.start(engine.run)
        budget.limit = cache_limit(cfg, store, budget.used)
        log.info("cache limit %d bytes, %d in use", budget.limit, budget.used)
        await nursery.start(control.serve)
        try:
            if received is None:
                session.mount()
                if kernel is not None:
                    supervised.register(kernel.fd)
            else:
                await _adopt(cfg, session, operations, store, received, after_crash=recover_fd is not None)
                # written before a request is served: after a crash, the handle numbers moved on
                # (journal.for_recovery), which another crash must not give out again; and the
                # backing ids this process writes are paired with a journal of its own (with the
                # one it serves on from, until its own is written)
                if journal_ is not None:
                    journal_.continue_from_disk()
                    await journal_.flush()
                if recover_fd is not None:
                    supervised.register(recover_fd)
                    _resend(session)
            if fd_store and kernel is not None:
                sdnotify.store_fd(kernel.fd, sdnotify.FUSE_FD_NAME)
        except OSError as e:
            failure = f"cannot mount {mountpoint}: {e}"  # raised out of the nursery, as itself
        else:
            try:
                nursery.start_soon(_terminate_on_signal, session)
                if journal_ is not None:
                    nursery.start_soon(journal_.run)
                nursery.start_soon(exporters.sample, engine, lambda: len(operations.passthrough_opens()),
                                   lambda: len(operations.inodes), metrics)
                if cfg.metrics_textfile is not None:
                    nursery.start_soon(exporters.write_textfile, cfg.metrics_textfile, registry)
                if received is not None:
                    nursery.start_soon(exporters.serve_http_once_free, cfg.metrics_addr, registry)
                if received is None:
                    nursery.start_soon(_announce_when_live, cfg, mountpoint, ready, session, operations, store)
                else:
                    ready()
                    sdnotify.notify("READY=1")
                log.info("serving %s at %s (cache %s, %s session)", source.root, mountpoint, store.root, cfg.session)
                try:
                    await session.serve()
                except SessionError as e:
                    log.error("%s", e)
                except BaseException as e:  # or cancelled: a task beside it failed (logged at exit)
                    if kernel is not None and (supervised.sock is not None or fd_store):  # a new one is started
                        log.error("serving failed: leaving the connection to its keeper",
                                  exc_info=isinstance(e, Exception))
                        kernel.handed_over()
                    raise
                if not restarts.taken:  # unmounted: no one recovers from it
                    if journal_ is not None:
                        journal_.remove()
                    if fd_store:
                        sdnotify.remove_fd(sdnotify.FUSE_FD_NAME)
            finally:
                session.close()
                log.info("handed %s over" if restarts.taken else "unmounted %s", mountpoint)
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise MountError(failure)
    return restarts.exec_fd


@dataclass
class _Supervised:
    """This process's registration with the mount's supervisor (supervisor.py), if it has one."""

    path: Path
    sock: socket.socket | None = None  # kept open for the process's life: its end tells the supervisor
    supervisor: int | None = None

    def register(self, fuse_fd: int) -> None:
        try:
            registered = supervisor.register(self.path, fuse_fd)
        except OSError as e:
            log.warning("cannot register with the supervisor: %s (a crash will end the mount)", e)
            return
        if registered is not None:
            self.sock, self.supervisor = registered
            log.info("supervised by pid %d: a crash of this process leaves the mount to a new one", self.supervisor)

    def pid(self) -> int | None:
        return self.supervisor


def _journal(store: CacheStore, session: KernelSession | None, operations: FuseOperations) -> Journal | None:
    """The journal of the adapter's state, for a successor after a crash; None for a session
    that cannot hand its connection over (pyfuse3's)."""
    if session is None:
        return None

    def snapshot() -> LiveState | None:
        if not session.minor:
            return None  # INIT not answered yet: nothing a successor could serve
        return LiveState(FORMAT, os.getpid(), session.negotiated(), operations.export_state())

    kept = Journal(store.root / journal.NAME, snapshot, operations.export_backing)
    operations.changed = kept.changed
    operations.persist_backing = kept.flush_backing
    return kept


def _recover(store: CacheStore, fuse_fd: int) -> handover.Received:
    """What a process started after a crash serves from: the journal, made safe (for_recovery)."""
    try:
        state = journal.read(store.root / journal.NAME)
    except OtherFormat as e:  # written by another release: the supervisor's own may take it
        raise OtherRelease(f"journal refused: {e}") from None
    except StateError as e:
        raise MountError(f"journal refused, the mount ends: {e}") from None
    return handover.Received(journal.for_recovery(state), fuse_fd)


def _resend(session: KernelSession) -> None:
    """Have the kernel send again what the dead process had read and not answered."""
    try:
        resent = session.resend()
    except OSError as e:
        log.warning("the kernel refused FUSE_NOTIFY_RESEND (%s): requests in flight at the crash get no answer", e)
        return
    log.info("requests in flight at the crash were asked again (FUSE_NOTIFY_RESEND)" if resent else
             "the kernel cannot replay requests (no FUSE_HAS_RESEND, Linux < 6.9): those in flight "
             "at the crash get no answer until the mount ends")


async def _adopt(cfg: MountConfig, session: KernelSession, operations: FuseOperations, store: CacheStore,
                 received: handover.Received, after_crash: bool) -> None:
    """Take over the connection a restart handed us: the adapter's tables first (handles are
    opened again through the engine), passthrough as it was, and only then a request read."""
    state = received.state
    try:
        lost = await operations.import_state(state.adapter, after_crash)
    except ValueError as e:
        os.close(received.fd)
        raise OSError(f"the state handed over by pid {state.pid} does not hold together: {e}") from None
    session.adopt(received.fd, state.session)
    for fh, file in operations.direct_files().items():
        session.direct.add(fh, file)
    _set_passthrough(cfg, session, operations, store)
    log.info("took over the connection of pid %d: %d inodes, %d open files (%d lost), %d directories",
             state.pid, len(state.adapter.inodes), len(state.adapter.files), lost, len(state.adapter.dirs))


def _set_passthrough(cfg: MountConfig, session, operations: FuseOperations, store: CacheStore) -> None:
    why_not = passthrough_state(cfg, session, store)
    if why_not is None:
        operations.passthrough.enable(session.backing, cfg.passthrough_wait)
        log.info("passthrough on: complete cache files are read by the kernel directly")
    else:
        operations.passthrough.off_reason = why_not
        log.info("passthrough off: %s", why_not)
        if mounts.fstype_of(str(store.root)) == "tmpfs":
            log.warning("the cache is in memory (tmpfs) and served through the daemon: every byte read is held "
                        "twice, in the cache and in the mount's page cache; a disk or NVMe cache holds it once")


async def _announce_when_live(cfg: MountConfig, mountpoint: str, ready: Ready, session,
                              operations: FuseOperations, store: CacheStore) -> None:
    """Tune the mount, turn passthrough on if it can be, and report the mount live once the
    kernel has finished the FUSE handshake.

    A stat of the mountpoint returns only after INIT was answered; tuning earlier is undone,
    since the kernel sets the mount's readahead from the INIT reply. Passthrough is probed
    after INIT too: the kernel accepts backing files only once it negotiated passthrough.
    """
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint)
    except OSError as e:  # the session ended first (its log says why): nothing to announce
        log.error("the mount ended before it came up: %s", e)
        return
    mounts.tune_fuse_mount(mountpoint, cfg.read_ahead_kb, cfg.max_background)
    _set_passthrough(cfg, session, operations, store)
    ready()
    sdnotify.notify("READY=1")


async def _terminate_on_signal(session) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            session.terminate()
            return


def cache_limit(cfg: MountConfig, store: CacheStore, held: int) -> int:
    """cache_size in bytes; a percentage of the cache filesystem; or by default 80% of the
    space free for it now plus what the store already holds."""
    if cfg.cache_size is not None:
        return cfg.cache_size
    if cfg.cache_size_percent is not None:
        vfs = os.statvfs(store.root)
        return int(vfs.f_blocks * vfs.f_frsize * cfg.cache_size_percent / 100)
    return int(DEFAULT_CACHE_FRACTION * store.free_bytes()) + held
