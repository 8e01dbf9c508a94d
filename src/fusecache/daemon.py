"""The daemon: checks a mount request, wires source, store, engine and FUSE adapter together,
mounts, serves until unmounted or signalled, and unmounts on the way out.

This is the composition root, the one module that knows every other; `fs.py` (the adapter)
is imported here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import stat as stat_mod
import sys
from pathlib import Path
from typing import Callable

import prometheus_client
import trio
from prometheus_client import CollectorRegistry

from . import mounts, private, textfile
from .config import MountConfig
from .control import ControlError, ControlServer, socket_path
from .engine import Engine
from .fs import FuseOperations
from .passthrough import probe
from .session.kernel import KernelSession, SessionConfig, SessionError
from .session.mount import MountSpec
from .session.types import Session
from .budget import CacheBudget
from .metrics import Metrics, prometheus_registry
from .source import Source, is_under, is_valid_name
from .store import CacheStore

log = logging.getLogger(__name__)

Ready = Callable[[], None]
DEFAULT_CACHE_FRACTION = 0.8
TEXTFILE_INTERVAL = 5.0


class MountError(Exception):
    """The mount cannot be made; the message is the one-line error shown to the user."""


def check_request(cfg: MountConfig) -> CacheStore:
    """Everything that can be checked before mounting, with a clear message for each failure.
    Returns the store, locked for this process."""
    try:
        fuse_device = os.stat("/dev/fuse")
    except OSError:
        fuse_device = None
    if fuse_device is None or not stat_mod.S_ISCHR(fuse_device.st_mode) or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is missing or not accessible: load the fuse module (modprobe fuse)")
    source = cfg.source
    if not source.exists():
        raise MountError(f"source {source} does not exist")
    if not source.is_dir():
        raise MountError(f"source {source} is not a directory")
    if not os.access(source, os.R_OK | os.X_OK):
        raise MountError(f"source {source} is not readable")
    _check_overlap(cfg)
    _check_mountpoint(cfg.mountpoint)
    if cfg.metrics_textfile is not None:
        try:
            textfile.check(cfg.metrics_textfile)
        except textfile.TextfileError as e:
            raise MountError(str(e)) from None
    store = CacheStore(cfg.cache_dir, os.path.realpath(source))
    try:
        store.prepare()
        store.lock()
    except Exception as e:  # StoreError carries the one-line message
        raise MountError(str(e)) from None
    return store


def _check_overlap(cfg: MountConfig) -> None:
    """Source, mountpoint and cache dir must not contain one another. A mountpoint inside the
    source makes the daemon read its own mount (it deadlocks on its own requests); a source
    inside the mountpoint is hidden by the mount; a cache dir inside the mountpoint too (the
    daemon blocks on its own mount and never comes up); a cache dir inside the source is shown
    through the mount. Compared as real paths (the cache dir may not exist yet: realpath()
    resolves what exists of it) by whole components: /a/bc is not inside /a/b."""
    source, mountpoint, cache = (Path(os.path.realpath(p)) for p in (cfg.source, cfg.mountpoint, cfg.cache_dir))
    if mountpoint == source:
        raise MountError("source and mountpoint must differ")
    if mountpoint.is_relative_to(source):
        raise MountError(f"mountpoint {cfg.mountpoint} must be outside the source {cfg.source}")
    if source.is_relative_to(mountpoint):
        raise MountError(f"source {cfg.source} must be outside the mountpoint {cfg.mountpoint}")
    if cache.is_relative_to(mountpoint):
        raise MountError(f"cache dir {cfg.cache_dir} must be outside the mountpoint {cfg.mountpoint}")
    if cache.is_relative_to(source):
        raise MountError(f"cache dir {cfg.cache_dir} must be outside the source {cfg.source}")


def _check_mountpoint(mountpoint: Path) -> None:
    path = str(mountpoint)
    if mounts.is_stale(path):
        log.warning("%s is a stale mount left by a crashed daemon; unmounting it", path)
        try:
            mounts.unmount(path, lazy=True)
        except OSError as e:
            raise MountError(f"mountpoint {path} is a stale mount and could not be cleaned: {e.strerror}") from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        raise MountError(f"mountpoint {path} cannot be used: {e.strerror}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if mounts.find_mount(os.path.realpath(path)) is not None:
        raise MountError(f"mountpoint {path} is already mounted")
    if os.listdir(path):
        raise MountError(f"mountpoint {path} is not empty")


def make_session(cfg: MountConfig, operations: FuseOperations, mountpoint: str, source_root: str) -> Session:
    """The FUSE session cfg asks for: ours (kernel protocol), or pyfuse3's."""
    spec = MountSpec(mountpoint=mountpoint, fsname=source_root, allow_other=cfg.allow_other)
    if cfg.session == "pyfuse3":
        from .session.pyfuse3_session import Pyfuse3Session  # libfuse only where asked for
        return Pyfuse3Session(operations, spec, cfg.workers)
    return KernelSession(operations, spec, SessionConfig(cfg.workers, cfg.max_background, cfg.passthrough))


def passthrough_state(cfg: MountConfig, session, store: CacheStore) -> str | None:
    """None if passthrough can be used on this mount, else why not (probed once)."""
    if not cfg.passthrough:
        return "turned off (passthrough=off)"
    if cfg.session != "kernel":
        return f"the {cfg.session} session has none (session=kernel has)"
    if session.backing is None:
        return "the kernel does not offer it (Linux 6.9 or newer with CONFIG_FUSE_PASSTHROUGH needed)"
    return probe(session.backing, store.lock_fd)


def run(cfg: MountConfig, store: CacheStore, ready: Ready) -> None:
    """Mount and serve until unmounted; `ready` is called once the mount is live."""
    raise_fd_limit()
    trio.run(_serve, cfg, store, ready)


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


async def _serve(cfg: MountConfig, store: CacheStore, ready: Ready) -> None:
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
    control = ControlServer(socket_path(mountpoint, os.getuid()),
                            control_handlers(engine, operations, store, metrics, mountpoint), owner_uid=os.getuid())
    registry = prometheus_registry(metrics)
    try:
        control.prepare()
    except private.UntrustedPath as e:
        raise MountError(str(e)) from None
    _serve_metrics(cfg, registry)
    session = make_session(cfg, operations, mountpoint, source.root)
    try:
        session.mount()
    except OSError as e:
        raise MountError(f"cannot mount {mountpoint}: {e}") from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            budget.limit = cache_limit(cfg, store, budget.used)
            log.info("cache limit %d bytes, %d in use", budget.limit, budget.used)
            await nursery.start(control.serve)
            nursery.start_soon(_terminate_on_signal, session)
            nursery.start_soon(_sample, engine, operations, metrics)
            if cfg.metrics_textfile is not None:
                nursery.start_soon(_write_textfile, cfg.metrics_textfile, registry)
            nursery.start_soon(_announce_when_live, cfg, mountpoint, ready, session, operations, store)
            log.info("serving %s at %s (cache %s, %s session)", source.root, mountpoint, store.root, cfg.session)
            try:
                await session.serve()
            except SessionError as e:
                log.error("%s", e)
            nursery.cancel_scope.cancel()
    finally:
        session.close()
        log.info("unmounted %s", mountpoint)


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
    why_not = passthrough_state(cfg, session, store)
    if why_not is None:
        operations.passthrough.enable(session.backing, cfg.passthrough_wait)
        log.info("passthrough on: complete cache files are read by the kernel directly")
    else:
        operations.passthrough.off_reason = why_not
        log.info("passthrough off: %s", why_not)
    ready()
    _notify_systemd()


async def _terminate_on_signal(session) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            session.terminate()
            return


async def _sample(engine: Engine, operations: FuseOperations, metrics: Metrics) -> None:
    """Once a second: the source rate window and the gauges the exporters read."""
    while True:
        metrics.sample()
        metrics.passthrough_files = len(operations.passthrough_opens())
        metrics.pending_bytes = engine.files.pending_bytes()
        metrics.cache_bytes, metrics.cache_limit_bytes = engine.budget.used, engine.budget.limit
        metrics.files_open, metrics.files_streaming = engine.activity()
        metrics.fill_reads, metrics.fill_reads_limit, metrics.fill_buffer_bytes = engine.fill()
        await trio.sleep(1.0)


def cache_limit(cfg: MountConfig, store: CacheStore, held: int) -> int:
    """cache_size in bytes; a percentage of the cache filesystem; or by default 80% of the
    space free for it now plus what the store already holds."""
    if cfg.cache_size is not None:
        return cfg.cache_size
    vfs = os.statvfs(store.root)
    if cfg.cache_size_percent is not None:
        return int(vfs.f_blocks * vfs.f_frsize * cfg.cache_size_percent / 100)
    return int(DEFAULT_CACHE_FRACTION * vfs.f_bavail * vfs.f_frsize) + held


def _serve_metrics(cfg: MountConfig, registry: CollectorRegistry) -> None:
    """Serve /metrics on metrics_addr. Bound before mounting, so that an address that cannot
    be used (a port in use) fails the mount with its reason instead of only being logged."""
    if cfg.metrics_addr is None:
        return
    host, port = cfg.metrics_addr
    try:
        prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise MountError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)


async def _write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Rewrite a node-exporter textfile every few seconds (textfile.write: atomically, and
    never through a link another user planted). A failure is logged once, not every time."""
    failing = None
    while True:
        try:
            data = prometheus_client.generate_latest(registry)
            await trio.to_thread.run_sync(textfile.write, path, data)
            failing = None
        except (OSError, textfile.TextfileError) as e:
            reason = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
            if reason != failing:
                log.warning("cannot write metrics to %s: %s", path, reason)
            failing = reason
        await trio.sleep(TEXTFILE_INTERVAL)


def _notify_systemd() -> None:
    """Tell systemd (Type=notify units) that the mount is live."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)
    except OSError as e:
        log.warning("could not notify systemd: %s", e)


def control_handlers(engine: Engine, operations: FuseOperations, store: CacheStore, metrics: Metrics,
                     mountpoint: str) -> dict:
    """The commands of the control channel, bound to this daemon's parts."""

    async def files_report() -> list[dict]:
        files = {f["path"]: f for f in await trio.to_thread.run_sync(store.entries)}
        for live in engine.open_files():
            files[live["path"]] = {**files.get(live["path"], {}), **live}
        passthrough = operations.passthrough_opens()
        for f in files.values():
            f["pinned"] = engine.is_pinned(f["path"])
            f["passthrough"] = passthrough.get(f["path"], 0)
        return sorted(files.values(), key=lambda f: f["path"])

    async def status(request: dict) -> dict:
        return {"mountpoint": mountpoint, "source": engine.source.root, "cache": str(store.root),
                "pid": os.getpid(), "cache_bytes": engine.budget.used, "cache_limit": engine.budget.limit,
                "pending_bytes": engine.files.pending_bytes(),
                "passthrough": operations.passthrough.off_reason or "on",
                "pins": sorted(engine.pins), "metrics": metrics.snapshot(), "files": await files_report()}

    async def cache_ls(request: dict) -> dict:
        return {"cache_bytes": engine.budget.used, "cache_limit": engine.budget.limit,
                "files": await files_report()}

    async def cache_clear(request: dict) -> dict:
        prefixes = _relpaths(request)
        evicted, kept = [], []
        for relpath in sorted(engine.budget.files()):
            if any(is_under(relpath, prefix) for prefix in prefixes):
                (evicted if await engine.evict(relpath) else kept).append(relpath)
        return {"evicted": evicted, "kept": kept}

    async def prefetch(request: dict) -> dict:
        paths = _relpaths(request)
        files = await trio.to_thread.run_sync(_regular_files, engine.source, paths)
        for relpath, _size in files:
            engine.prefetch(relpath)
        return {"files": [{"path": p, "size": s} for p, s in files]}

    async def pin(request: dict) -> dict:
        paths = _relpaths(request)
        await trio.to_thread.run_sync(_regular_files, engine.source, paths)  # they must exist
        await engine.set_pins(engine.pins | set(paths))
        return await prefetch(request)

    async def unpin(request: dict) -> dict:
        paths = set(_relpaths(request))
        unknown = paths - engine.pins
        if unknown:
            raise ControlError(f"not pinned: {', '.join(sorted(unknown))}")
        await engine.set_pins(engine.pins - paths)
        return {"pins": sorted(engine.pins)}

    async def extent_of(relpath: str) -> tuple[int, int] | None:
        """(cached, size) of relpath's current version, else as its index last recorded."""
        extent = engine.cached_extent(relpath)
        if extent is None:
            summary = await trio.to_thread.run_sync(store.index_of, relpath)
            extent = None if summary is None else (summary["cached"], summary["size"])
        return extent

    async def progress(request: dict) -> dict:
        """Where the prefetch of each path stands. Sizes are those of the versions being
        fetched, which differ from what `prefetch` listed if a file changed since; `unknown`
        counts files not opened yet (their size is not in the sum)."""
        cached = size = unknown = pending = 0
        errors = {}
        for relpath in _relpaths(request):
            # the state first: a stream ending while the extent is read leaves it pending here
            streaming, error = engine.stream_state(relpath)
            extent = await extent_of(relpath)
            if extent is None:
                unknown += 1
            else:
                cached, size = cached + extent[0], size + extent[1]
            if streaming:
                pending += 1
            elif error is not None:
                errors[relpath] = error
            elif extent is None or extent[0] < extent[1]:
                errors[relpath] = "not in the cache once fetched (evicted: is the cache too small?)"
        return {"cached": cached, "size": size, "unknown": unknown, "pending": pending,
                "rate": metrics.source_rate(), "errors": errors}

    return {"status": status, "prefetch": prefetch, "progress": progress, "pin": pin, "unpin": unpin,
            "cache_ls": cache_ls, "cache_clear": cache_clear}


def _relpaths(request: dict) -> list[str]:
    paths = request.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ControlError("'paths' must be a list of paths")
    for relpath in paths:
        # the canonical form the engine keys files by: '' or names joined by single slashes
        if relpath and not all(is_valid_name(part) for part in relpath.split("/")):
            raise ControlError(f"invalid path {relpath!r}")
    return paths


def _regular_files(source: Source, relpaths: list[str]) -> list[tuple[str, int]]:
    """Worker thread: expand directories (without following symlinks) into regular files."""
    found: list[tuple[str, int]] = []
    for relpath in relpaths:
        try:
            found += source.regular_files(relpath)
        except OSError as e:
            raise ControlError(f"{relpath or '.'}: {e.strerror}") from None
    return found

