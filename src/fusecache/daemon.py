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
import sys
from typing import Callable

import trio

from . import exporters, handover, mounts, private
from .budget import CacheBudget
from .config import MountConfig
from .control import ControlError, ControlServer, socket_path
from .engine import Engine
from .fs import FuseOperations
from .handlers import ControlHandlers, DaemonParts
from .handover import HandoverServer, MountArguments
from .metrics import Metrics, prometheus_registry
from .passthrough import probe
from .precheck import MountError
from .session.kernel import KernelSession, SessionConfig, SessionError
from .session.mount import MountSpec
from .session.types import Session
from .source import Source
from .store import CacheStore, StoreError

log = logging.getLogger(__name__)

Ready = Callable[[], None]
DEFAULT_CACHE_FRACTION = 0.8
STORE_WAIT = 30.0  # seconds a restarted daemon waits for the old one to let go of the store


def make_session(cfg: MountConfig, operations: FuseOperations, mountpoint: str, source_root: str) -> Session:
    """The FUSE session cfg asks for: ours (kernel protocol), or pyfuse3's."""
    spec = MountSpec(mountpoint=mountpoint, fsname=source_root, allow_other=cfg.allow_other)
    if cfg.session == "pyfuse3":
        from .session.pyfuse3_session import Pyfuse3Session  # libfuse only where asked for
        return Pyfuse3Session(operations, spec, cfg.workers)
    return KernelSession(operations, spec, SessionConfig(cfg.workers, cfg.max_background, cfg.passthrough, cfg.queues))


def passthrough_state(cfg: MountConfig, session, store: CacheStore) -> str | None:
    """None if passthrough can be used on this mount, else why not (probed once)."""
    if not cfg.passthrough:
        return "turned off (passthrough=off)"
    if cfg.session != "kernel":
        return f"the {cfg.session} session has none (session=kernel has)"
    if session.backing is None:
        return "the kernel does not offer it (Linux 6.9 or newer with CONFIG_FUSE_PASSTHROUGH needed)"
    return probe(session.backing, store.lock_fd)


def run(cfg: MountConfig, store: CacheStore, ready: Ready, takeover: bool = False) -> None:
    """Mount and serve until unmounted; `ready` is called once the mount is live. takeover:
    serve the mount cfg names by taking it over from the daemon serving it (handover.py);
    the store is then not locked yet (the old daemon holds it until it exits)."""
    raise_fd_limit()
    trio.run(_serve, cfg, store, ready, takeover)


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


async def _serve(cfg: MountConfig, store: CacheStore, ready: Ready, takeover: bool) -> None:
    for message in cfg.deprecations:
        log.warning("%s", message)
    source_fstype = mounts.fstype_of(str(cfg.source))
    source = Source(cfg.source, stable_inodes=stable_inodes(cfg, source_fstype))
    metrics = Metrics()
    budget = CacheBudget(limit=sys.maxsize)  # the real limit is set once the store is loaded
    in_memory = mounts.fstype_of(str(store.root)) == "tmpfs"
    engine = Engine(cfg, source, store, metrics, budget, serve_from_memory=in_memory)
    operations = FuseOperations(engine, cfg.attr_timeout)
    mountpoint = os.path.realpath(cfg.mountpoint)
    handlers = ControlHandlers(DaemonParts(
        mountpoint, engine, store, metrics, passthrough_opens=operations.passthrough_opens,
        passthrough_state=lambda: operations.passthrough.off_reason or "on"))
    session = make_session(cfg, operations, mountpoint, source.root)
    restarts = HandoverServer(session if isinstance(session, KernelSession) else None, operations.export_state,
                              MountArguments(str(cfg.source), cfg.options, str(cfg.cache_dir), cfg.log_level,
                                             cfg.foreground))
    control = ControlServer(socket_path(mountpoint, os.getuid()), handlers.table() | restarts.table(),
                            owner_uid=os.getuid())
    registry = prometheus_registry(metrics)
    received = None
    try:
        control.prepare()
        if takeover:  # asked for before anything is bound: refused, the old daemon serves on
            received = await trio.to_thread.run_sync(handover.request, mountpoint)
            await trio.to_thread.run_sync(store.lock, STORE_WAIT)
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
            else:
                await _adopt(cfg, session, operations, store, received)
        except OSError as e:
            failure = f"cannot mount {mountpoint}: {e}"  # raised out of the nursery, as itself
        else:
            try:
                nursery.start_soon(_terminate_on_signal, session)
                nursery.start_soon(exporters.sample, engine, lambda: len(operations.passthrough_opens()),
                                   lambda: len(operations.inodes), metrics)
                if cfg.metrics_textfile is not None:
                    nursery.start_soon(exporters.write_textfile, cfg.metrics_textfile, registry)
                if received is None:
                    nursery.start_soon(_announce_when_live, cfg, mountpoint, ready, session, operations, store)
                else:
                    ready()
                    exporters.notify_systemd()
                log.info("serving %s at %s (cache %s, %s session)", source.root, mountpoint, store.root, cfg.session)
                try:
                    await session.serve()
                except SessionError as e:
                    log.error("%s", e)
            finally:
                session.close()
                log.info("handed %s over" if restarts.taken else "unmounted %s", mountpoint)
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise MountError(failure)


async def _adopt(cfg: MountConfig, session: KernelSession, operations: FuseOperations, store: CacheStore,
                 received: handover.Received) -> None:
    """Take over the connection a restart handed us: the adapter's tables first (handles are
    opened again through the engine), passthrough as it was, and only then a request read."""
    state = received.state
    try:
        lost = await operations.import_state(state.adapter)
    except ValueError as e:
        os.close(received.fd)
        raise OSError(f"the state handed over by pid {state.pid} does not hold together: {e}") from None
    session.adopt(received.fd, state.session)
    session.direct.update(operations.direct_files())
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
    await trio.to_thread.run_sync(os.stat, mountpoint)
    mounts.tune_fuse_mount(mountpoint, cfg.read_ahead_kb, cfg.max_background)
    _set_passthrough(cfg, session, operations, store)
    ready()
    exporters.notify_systemd()


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
    vfs = os.statvfs(store.root)
    if cfg.cache_size_percent is not None:
        return int(vfs.f_blocks * vfs.f_frsize * cfg.cache_size_percent / 100)
    return int(DEFAULT_CACHE_FRACTION * vfs.f_bavail * vfs.f_frsize) + held
