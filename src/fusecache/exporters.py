"""What the daemon tells the world besides the control channel: the gauges sampled once a
second, Prometheus metrics over HTTP (`metrics_addr=`), the node-exporter textfile
(`metrics_textfile=`). (systemd hears from the daemon through sdnotify.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import prometheus_client
import trio
from prometheus_client import CollectorRegistry

from . import textfile
from .engine import Engine
from .metrics import Metrics

log = logging.getLogger(__name__)

TEXTFILE_INTERVAL = 5.0


class ExporterError(Exception):
    """An exporter cannot be started; the message is one line."""


async def sample(engine: Engine, passthrough_files: Callable[[], int], inodes_held: Callable[[], int],
                 metrics: Metrics) -> None:
    """Once a second: the source rate window and the gauges the exporters read (the adapter's
    own as functions: the exporters know the engine, not the adapter)."""
    while True:
        metrics.sample()
        metrics.passthrough_files = passthrough_files()
        metrics.inodes_held = inodes_held()
        metrics.pending_bytes = engine.files.pending_bytes()
        metrics.cache_bytes, metrics.cache_limit_bytes = engine.budget.used, engine.budget.limit
        metrics.files_open, metrics.files_streaming = engine.activity()
        metrics.fill_reads, metrics.fill_reads_limit, metrics.fill_buffer_bytes = engine.fill()
        await trio.sleep(1.0)


def serve_http(addr: tuple[str, int] | None, registry: CollectorRegistry) -> None:
    """Serve /metrics on addr. Bound before mounting, so that an address that cannot be used
    (a port in use) fails the mount with its reason instead of only being logged."""
    if addr is None:
        return
    host, port = addr
    try:
        prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ExporterError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)


async def write_textfile(path: Path, registry: CollectorRegistry) -> None:
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
