"""What the daemon tells the world besides the control channel: the gauges sampled once a
second, Prometheus metrics over HTTP (`metrics_addr=`), the node-exporter textfile
(`metrics_textfile=`). (systemd hears from the daemon through sdnotify.py.)"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from pathlib import Path
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, make_wsgi_app

from . import textfile
from .engine import Engine
from .metrics import Metrics

log = logging.getLogger(__name__)

TEXTFILE_INTERVAL = 5.0
HTTP_CONNECTIONS = 16  # scrapes served at once
HTTP_IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent
HTTP_RETRY = 5.0  # seconds between binds of an address taken while a restart took the mount over


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


def serve_http(addr: tuple[str, int] | None, registry: CollectorRegistry) -> WSGIServer | None:
    """Serve /metrics on addr, on threads of its own. Bound before mounting, so that an
    address that cannot be used (a port in use) fails the mount with its reason instead of
    only being logged. The server, or None where none was asked for."""
    if addr is None:
        return None
    host, port = addr
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = make_server(host, port, make_wsgi_app(registry), _server_class(family), handler_class=_Handler)
    except OSError as e:
        raise ExporterError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


async def serve_http_once_free(addr: tuple[str, int] | None, registry: CollectorRegistry) -> None:
    """serve_http for a daemon that took a live mount over (a restart, a recovery): the
    mount is served already, so an address taken meanwhile (by anyone on the node) must
    not end it: it is logged, and tried again until it can be bound."""
    while True:
        try:  # on a thread: binding resolves the host's name (a slow DNS must not stall the mount)
            await trio.to_thread.run_sync(serve_http, addr, registry)
            return
        except ExporterError as e:
            log.warning("%s: trying again every %g s", e, HTTP_RETRY)
        await trio.sleep(HTTP_RETRY)


class _Handler(WSGIRequestHandler):
    """A scrape's connection: one that stays idle is closed, and nothing is logged to stderr."""

    def setup(self) -> None:
        self.timeout = HTTP_IDLE_TIMEOUT  # set on the connection by StreamRequestHandler.setup
        super().setup()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _server_class(family: int) -> type[WSGIServer]:
    class Server(socketserver.ThreadingMixIn, WSGIServer):
        """One thread a connection, HTTP_CONNECTIONS at most: beyond, a connection is closed
        at once (idle connections held open by anyone on the node would otherwise grow the
        daemon a thread each)."""

        address_family = family
        daemon_threads = True
        slots = threading.BoundedSemaphore(HTTP_CONNECTIONS)

        def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
            """A client that went silent (the idle timeout) or away: nothing to report. The
            base class printed a traceback to stderr, daemon.log, for each."""

    return Server


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
