"""Parallel fill, in process: a stream keeps several reads of one file in flight, and the fill
controller sizes how many by what the source delivers (engine/fill.py); on a cache in memory,
where the kernel copies a source on the cache's filesystem, the stream's copies into one file
take turns instead (CacheEntry.fill_run)."""

from __future__ import annotations

import trio

from fusecache.engine.fill import FillController

from .inprocess import CHUNK, harness, settled  # noqa: F401 - harness is a fixture


def controller(start: int = 2, ceiling: int = 16) -> FillController:
    return FillController(start, ceiling, source_bytes=lambda: 0)


def test_the_limit_doubles_while_the_source_delivers_more_for_it():
    fill = controller()
    for limit, rate in [(2, 100), (4, 200), (8, 390), (16, 700)]:
        assert fill.slots.total_tokens == limit
        fill.decide(rate, in_flight=limit, waiting=3)
        if limit < 16:
            fill.decide(0, in_flight=limit, waiting=3)  # the window after a change is not judged
    assert fill.slots.total_tokens == 16 and not fill.state.growing  # the ceiling
    fill.decide(5000, in_flight=16, waiting=3)
    assert fill.slots.total_tokens == 16


def test_the_limit_goes_back_to_the_best_once_the_rate_stops_growing():
    fill = controller()
    fill.decide(100, in_flight=2, waiting=1)  # 2 -> 4
    fill.decide(1, in_flight=4, waiting=1)  # ramping up: not judged
    fill.decide(200, in_flight=4, waiting=1)  # 4 -> 8
    fill.decide(1, in_flight=8, waiting=1)
    fill.decide(205, in_flight=8, waiting=1)  # not 10% more: back to 4, settled
    assert fill.slots.total_tokens == 4 and not fill.state.growing
    fill.decide(10_000, in_flight=4, waiting=9)  # settled: no more probing while busy
    assert fill.slots.total_tokens == 4


def test_a_limit_that_does_not_bind_teaches_nothing_and_idle_starts_over():
    fill = controller()
    fill.decide(100, in_flight=1, waiting=0)
    assert fill.slots.total_tokens == 2 and fill.state.best_rate == 0
    fill.decide(100, in_flight=2, waiting=1)
    fill.decide(100, in_flight=4, waiting=1)  # not judged
    fill.decide(100, in_flight=4, waiting=1)
    assert fill.slots.total_tokens == 2 and not fill.state.growing
    fill.decide(0, in_flight=0, waiting=0)  # idle: the next load probes again
    assert fill.slots.total_tokens == 2 and fill.state.growing and fill.state.best_rate == 0


def test_a_window_in_which_no_read_landed_is_not_judged():
    """Reads slower than a window: the first window after idle saw none land, and its rate of
    0 was judged a larger limit that gained nothing: settled at the start until the next
    idle. (Found by review.)"""
    fill = controller()
    fill.decide(0, in_flight=2, waiting=3)
    assert fill.state.growing and fill.slots.total_tokens == 2
    fill.decide(100, in_flight=2, waiting=3)
    assert fill.slots.total_tokens == 4


def test_start_and_ceiling_are_kept_in_order():
    assert controller(start=8, ceiling=4).slots.total_tokens == 4


async def test_a_stream_keeps_several_reads_of_one_file_in_flight(harness):
    data = harness.write("f", 4 * 4 * CHUNK)  # four stream reads
    engine = await harness.start(streams=2, fill_reads_max=4)
    gate = harness.source.hold("f", offset=0)
    engine.prefetch("f")
    await gate.wait_entered()
    with trio.fail_after(5):  # the next reads go ahead while the first is held
        while harness.source.calls("f") < 2:
            await trio.sleep(0.01)
    await check_fill(engine, harness, gate, data)


async def test_on_a_cache_in_memory_a_streams_copies_into_one_file_take_turns(harness):
    data = harness.write("f", 4 * 4 * CHUNK)
    engine = await harness.start(streams=2, fill_reads_max=4, cache_in_memory=True)
    gate = harness.source.hold("f", offset=0)
    engine.prefetch("f")
    await gate.wait_entered()  # (another flight may have had its turn first)
    copies = harness.source.calls("f")
    with trio.move_on_after(0.5):  # the next flights start, and wait for the held copy's turn
        while harness.source.calls("f") == copies:
            await trio.sleep(0.01)
    assert harness.source.calls("f") == copies and engine.fill()[0] > 1  # started, waiting for their turn
    await check_fill(engine, harness, gate, data)


async def check_fill(engine, harness, gate, data: bytes) -> None:
    """Once a stream's first read is held: what status shows, then the whole file, each byte
    read once, after the read goes on."""
    in_flight, limit, buffers = engine.fill()  # what status shows
    assert 1 <= in_flight <= limit and buffers == in_flight * 4 * CHUNK  # the held read at least
    gate.open()
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None)
    assert engine.cached_extent("f") == (len(data), len(data))
    assert harness.source.counts("f", len(data)).max() == 1  # each byte read once


async def test_the_limit_starts_at_half_its_ceiling_or_at_streams(harness):
    """A doubling takes a second that a short load cannot spare: few streams still start with
    reads enough in flight (engine/fill.py)."""
    for streams, ceiling, start in [(2, 16, 8), (12, 16, 12), (1, 1, 1)]:
        engine = await harness.start(streams=streams, fill_reads_max=ceiling)
        assert engine.fill()[1] == start  # what status shows as the limit
