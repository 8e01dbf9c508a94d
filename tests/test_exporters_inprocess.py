"""The exporters (fusecache.exporters), in process: the sampler fills the gauges from a
running engine, the textfile is written (and a failure is logged once, not every time), an
address in use is a one-line error."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.testing

from fusecache import exporters
from fusecache.metrics import prometheus_registry

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
