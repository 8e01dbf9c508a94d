"""The exporters (fusecache.exporters), in process: the sampler fills the gauges from a
running engine, the textfile is written (and a failure is logged once, not every time), an
address in use is a one-line error."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request

import pytest
import trio
import trio.testing

from fusecache import exporters
from fusecache.metrics import Metrics, prometheus_registry

from .inprocess import CHUNK, allocated, harness, read_file  # noqa: F401 - fixture


async def test_the_sampler_fills_the_gauges(harness):
    harness.write("f", 2 * CHUNK)
    engine = await harness.start()
    held = await engine.open("f")
    try:
        await read_file(engine, "f")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporters.sample, engine, lambda: 3, lambda: 7, engine.metrics)
            await trio.testing.wait_all_tasks_blocked()  # sampled once, asleep until the next
            nursery.cancel_scope.cancel()
        m = engine.metrics
        assert (m.passthrough_files, m.inodes_held, m.cache_bytes, m.files_open) == (3, 7, allocated(harness.store), 1)
        assert m.cache_limit_bytes == engine.budget.limit
    finally:
        await engine.release(held)


async def test_the_textfile_is_written_and_a_failure_logged_once(harness, tmp_path, caplog, monkeypatch):
    engine = await harness.start()
    registry = prometheus_registry(engine.metrics)
    monkeypatch.setattr(exporters, "TEXTFILE_INTERVAL", 0.01)
    good, bad = tmp_path / "out" / "f.prom", tmp_path / "gone" / "f.prom"
    good.parent.mkdir()
    with caplog.at_level(logging.WARNING, logger="fusecache.exporters"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporters.write_textfile, good, registry)
            nursery.start_soon(exporters.write_textfile, bad, registry)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert "fusecache_source_bytes_total" in good.read_text()
    assert len([r for r in caplog.records if str(bad) in r.getMessage()]) == 1


def test_an_address_in_use_is_a_one_line_error():
    exporters.serve_http(None, None)  # not asked for: nothing served
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(exporters.ExporterError, match=f"^cannot serve metrics on 127.0.0.1:{port}: Address already in use$"):
            exporters.serve_http(("127.0.0.1", port), None)


def test_idle_connections_to_the_metrics_endpoint_take_a_bounded_number_of_threads(monkeypatch, capfd):
    """Each connection took a thread of the daemon for as long as it stayed open: anyone on
    the node could grow the daemon a thread per idle connection. Now a few at once, each
    closed once idle, quietly (a traceback on stderr for each filled daemon.log). (Found by
    review.)"""
    monkeypatch.setattr(exporters, "HTTP_CONNECTIONS", 2)
    monkeypatch.setattr(exporters, "HTTP_IDLE_TIMEOUT", 0.3)
    server = exporters.serve_http(("127.0.0.1", 0), prometheus_registry(Metrics()))
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        time.sleep(0.1)
        serving = [t for t in threading.enumerate() if "process_request_thread" in t.name]
        assert len(serving) <= 2
        for conn in idle:  # closed by the server: each idle one after the timeout, the rest at once
            conn.settimeout(5)
            assert conn.recv(1) == b""
    finally:
        for conn in idle:
            conn.close()
    assert capfd.readouterr().err == ""
    deadline = time.monotonic() + 10
    while True:  # the slots come back as the idle connections close
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert b"fusecache_source_bytes_total" in reply.read()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    server.shutdown()


async def test_a_daemon_taking_a_mount_over_binds_the_metrics_address_once_it_is_free(caplog, monkeypatch):
    """A restart or a recovery binds the address the old daemon let go; taken meanwhile (by
    anyone on the node), that failed the new daemon and with it the mount. (Found by review.)"""
    monkeypatch.setattr(exporters, "HTTP_RETRY", 0.05)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with caplog.at_level(logging.INFO, logger="fusecache.exporters"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporters.serve_http_once_free, ("127.0.0.1", port), prometheus_registry(Metrics()))
            await trio.sleep(0.2)
            taken.close()
            with trio.fail_after(5):
                while not any("serving Prometheus" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.05)
    assert any("Address already in use: trying again" in r.getMessage() for r in caplog.records)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
