"""The engine driven through its facade, in process: no FUSE mount, no root.

What it proves, judged by what a counting, fault-injecting Source saw being read:
- the fetcher: concurrent reads of one range fetch each byte once (single-flight), also
  while a prefetch streams the same file; one failed fetch fails every reader waiting on it
  with EIO and the next read fetches again; bytes of a file modified during their fetch are
  never cached; a cache file damaged behind the daemon's back is re-verified and only its bad
  chunk fetched again, within a run and across a restart;
- the evictor: a cache over its limit drops the least recently used idle file; open and
  pinned files stay, and reads that find no room (at open, or when a fill reserves its run)
  go straight to the source;
- the stream scheduler: a prefetch ends with the whole file verified, or with an error; a file
  modified during its prefetch is fetched again, a file that keeps changing is given up;
- the checkpoint policy: opening one shard streams its siblings in the order of the
  checkpoint index, and an index that is malformed, huge or a FIFO is ignored;
- descriptors: an open past the daemon's descriptor budget fails alone; idle files give
  theirs back.

Through a mount each of these needs root, a second FUSE filesystem to count source reads
(countingfs) and timing luck; here a gate holds a source read exactly where a race needs it.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import threading
import time
from typing import Awaitable, Callable

import pytest
import trio
import trio.testing

from fusecache import acl, kernelcopy, linux
from fusecache.budget import CacheBudget
from fusecache.engine import ReadError
from fusecache.engine import evictor, files as files_module, shards
from fusecache.engine.tasks import Tasks
from fusecache.inodes import ROOT_INODE
from fusecache.store import CacheEntry, CacheStore

from .inprocess import (CHUNK, GATE_TIMEOUT, CountingSource, allocated, buffer, damage, harness, read_file, read_handle,  # noqa: F401 - fixture
                        settled, wait_for)
from .inprocess import ctx, fuse_errno, operations, read_all
from .test_store_inprocess import file_size_limit


# ---- the fetcher -------------------------------------------------------------------------

@pytest.mark.parametrize("cache_in_memory", [False, True], ids=["threads", "mapped"])
async def test_a_read_fetches_its_chunks_once_and_then_serves_them(harness, cache_in_memory):
    data = harness.write("dir/f", 5 * CHUNK + 77)
    engine = await harness.start(cache_in_memory=cache_in_memory)
    src = harness.source
    assert await read_file(engine, "dir/f", step=CHUNK // 3) == data
    assert src.counts("dir/f", len(data)).tolist() == [1] * len(data)
    assert engine.cached_extent("dir/f") == (len(data), len(data))
    assert harness.store.index_of("dir/f")["cached"] == len(data)
    reads = src.calls("dir/f")
    assert await read_file(engine, "dir/f", step=3 * CHUNK) == data  # now all from the cache
    assert src.calls("dir/f") == reads
    assert engine.metrics.bytes_served == 2 * len(data) and engine.metrics.bytes_from_source == len(data)
    assert engine.metrics.chunk_hits > 0 and engine.metrics.chunk_misses > 0
    handle = await engine.open("dir/f")
    assert bytes(await engine.read(handle, len(data), 10, buffer(10))) == b""  # at and past the end
    assert bytes(await engine.read(handle, len(data) - 5, 100, buffer(100))) == data[-5:]
    st = await engine.fstat(handle)
    assert st.st_size == len(data)
    assert engine.activity() == (1, 0)
    assert engine.open_files() == [{"path": "dir/f", "size": len(data), "cached": len(data), "users": 1,
                                    "streaming": False, "inflight_chunks": 0}]
    await engine.release(handle)
    assert engine.activity() == (0, 0)


async def test_concurrent_reads_of_one_range_fetch_each_byte_once(harness):
    data = harness.write("f", 6 * CHUNK)
    engine = await harness.start()
    src = harness.source
    gate = src.hold("f", offset=0)  # the first fetch stalls until every reader waits for it
    handles = [await engine.open("f") for _ in range(3)]  # several opens share one fetch too
    start, size = CHUNK // 2, 3 * CHUNK
    results = []

    async def reader(handle) -> None:
        results.append(bytes(await engine.read(handle, start, size, buffer(size))))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, handles[i % 3])
            await gate.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
    assert results == [data[start:start + size]] * 8
    counts = src.counts("f", len(data))
    assert counts[:4 * CHUNK].tolist() == [1] * (4 * CHUNK)  # chunks 0-3, each fetched once
    assert not counts[4 * CHUNK:].any()
    for handle in handles:
        await engine.release(handle)


@pytest.mark.parametrize("cache_in_memory", [False, True], ids=["disk", "memory"])
async def test_demand_reads_during_a_prefetch_read_each_byte_once(harness, cache_in_memory):
    """In memory the stream's copies into the file take turns: the demand read's does not."""
    data = harness.write("f", 12 * CHUNK)  # three stream blocks of four chunks
    engine = await harness.start(cache_in_memory=cache_in_memory)
    src = harness.source
    stream_gate = src.hold("f", offset=0)
    demand_gate = src.hold("f", offset=9 * CHUNK)
    engine.prefetch("f")
    await stream_gate.wait_entered()  # the stream is fetching block 0 and stalls there
    handle = await engine.open("f")
    replies = {}

    async def read(chunk: int) -> None:
        replies[chunk] = bytes(await engine.read(handle, chunk * CHUNK, CHUNK, buffer(CHUNK)))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            # chunk 9, which nobody fetches yet: the demand lane does not queue behind the stream
            nursery.start_soon(read, 9)
            await demand_gate.wait_entered()
            # chunk 1: the stream's flight has it; the reader waits for that one
            nursery.start_soon(read, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert not replies
            stream_gate.open()
            # the stream goes on past chunk 9 (in flight for the demand read) to the end
            await wait_for(lambda: engine.cached_extent("f")[0] == 11 * CHUNK)
            assert 1 in replies and 9 not in replies
            demand_gate.open()
        await settled(engine, "f")
    assert replies == {1: data[CHUNK:2 * CHUNK], 9: data[9 * CHUNK:10 * CHUNK]}
    assert engine.stream_state("f") == (False, None)
    assert engine.cached_extent("f") == (len(data), len(data))
    assert src.counts("f", len(data)).tolist() == [1] * len(data)
    assert await read_handle(engine, handle) == data
    await engine.release(handle)


async def test_a_failed_fetch_fails_its_waiters_and_the_next_read_fetches_again(harness):
    data = harness.write("f", 4 * CHUNK)
    engine = await harness.start()
    src = harness.source
    handle = await engine.open("f")
    src.fail("f", errno.EIO)
    gate = src.hold("f")
    errors = []

    async def reader() -> None:
        with pytest.raises(ReadError) as info:
            await engine.read(handle, 0, CHUNK, buffer(CHUNK))
        errors.append(info.value.errno)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
            await gate.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
    assert errors == [errno.EIO] * 3
    assert src.calls("f") == 1  # one failed fetch, shared
    assert engine.metrics.errors == {"EIO": 1}
    assert engine.cached_extent("f") == (0, len(data))
    src.clear("f")
    assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == data[:CHUNK]
    assert await read_handle(engine, handle) == data
    await engine.release(handle)


@pytest.mark.parametrize("change", ["rewritten", "truncated", "rewritten, mtime put back",
                                    "rewritten, mtime put back, unstable inodes"])
async def test_bytes_of_a_file_modified_during_their_fetch_are_not_cached(harness, change):
    data = harness.write("f", 4 * CHUNK)
    engine = await harness.start(source=CountingSource(harness.src, stable_inodes="unstable" not in change))
    src = harness.source
    handle = await engine.open("f")
    gate = src.hold("f")
    new = os.urandom(len(data) if change.startswith("rewritten") else CHUNK)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises(ReadError) as info:
                    await engine.read(handle, 0, 2 * CHUNK, buffer(2 * CHUNK))
                assert info.value.errno == errno.EIO

            nursery.start_soon(reader)
            await gate.wait_entered()
            harness.rewrite("f", new, keep_mtime="mtime put back" in change)  # in place, under the fetch
            gate.open()
    assert engine.metrics.errors == {"ESTALE": 1}
    assert engine.cached_extent("f") == (0, len(data))  # nothing of the mix of versions was kept
    assert harness.store.index_of("f")["cached"] == 0
    await engine.release(handle)
    assert await read_file(engine, "f") == new  # a new open serves the new version
    assert harness.store.index_of("f") | {"last_used": 0} == {"path": "f", "size": len(new), "cached": len(new),
                                                              "last_used": 0}


@pytest.mark.parametrize("stable_inodes", [True, False])
async def test_one_open_never_reads_two_versions_of_a_file_rewritten_with_its_mtime_put_back(harness, stable_inodes):
    """Rewritten in place between two fills of one open, the size kept and the mtime put back:
    only the ctime moved. The rest of the old open fails rather than serve the new bytes."""
    old = harness.write("f", 4 * CHUNK)
    engine = await harness.start(source=CountingSource(harness.src, stable_inodes=stable_inodes))
    handle = await engine.open("f")
    assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == old[:CHUNK]
    new = harness.rewrite("f", os.urandom(len(old)), keep_mtime=True)
    with pytest.raises(ReadError) as info:
        await engine.read(handle, 2 * CHUNK, CHUNK, buffer(CHUNK))
    assert info.value.errno == errno.EIO
    assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == old[:CHUNK]  # what it had cached
    assert engine.cached_extent("f") == (CHUNK, len(old))  # nothing of the new version under the old
    await engine.release(handle)
    assert await read_file(engine, "f") == new


async def test_a_changed_file_is_dropped_and_its_open_handles_keep_their_version(harness):
    old = harness.write("f", 3 * CHUNK)
    engine = await harness.start()
    first = await engine.open("f")
    assert await read_handle(engine, first) == old
    new = harness.replace("f", os.urandom(2 * CHUNK))
    st = await engine.lstat("f")  # a lookup notices the change
    assert st.st_size == len(new)
    assert engine.cached_extent("f") is None  # no longer handed out
    second = await engine.open("f")
    assert second.identity != first.identity
    assert await read_handle(engine, second) == new
    assert await read_handle(engine, first) == old  # the old handle keeps reading its own bytes
    await engine.release(first)
    await engine.release(second)
    third = await engine.open("f")
    assert third.identity == second.identity
    await engine.release(third)


async def test_a_damaged_cache_file_is_reverified_and_only_its_bad_chunk_refetched(harness):
    data = harness.write("f", 4 * CHUNK)
    engine = await harness.start()
    src = harness.source
    handle = await engine.open("f")
    assert await read_handle(engine, handle) == data
    await trio.sleep(0.02)  # a new ctime even where timestamps are coarse
    damage(harness.store, "f", 2 * CHUNK + 100)
    assert await read_handle(engine, handle) == data
    assert engine.metrics.checksum_failures == 1
    counts = src.counts("f", len(data))
    assert counts[2 * CHUNK:3 * CHUNK].tolist() == [2] * CHUNK
    assert counts[:2 * CHUNK].max() == 1 and counts[3 * CHUNK:].max() == 1
    await engine.release(handle)


async def test_a_cache_file_cut_short_after_its_check_is_never_a_short_reply(harness, monkeypatch):
    """A read checks the data file's stamp, then reads it. Truncated in between (by root or
    the daemon's user), the read came back short, and a short reply is end of file to the
    kernel, which then takes the file for shorter than it is. The race is made certain by
    having the check pass after the truncation. (Found by review.)"""
    data = harness.write("f", 4 * CHUNK)
    engine = await harness.start()
    handle = await engine.open("f")
    assert await read_handle(engine, handle) == data
    os.truncate(harness.store.paths("f")[0], CHUNK)
    monkeypatch.setattr(CacheEntry, "unchanged_since", lambda entry, generation: True)
    with pytest.raises(ReadError) as info:
        await engine.read(handle, 0, 4 * CHUNK, buffer(4 * CHUNK))
    assert info.value.errno == errno.EIO
    await engine.release(handle)


async def test_a_restart_reverifies_the_cache_and_refetches_only_damaged_chunks(harness):
    data = harness.write("f", 4 * CHUNK)
    harness.write("pinned/g", CHUNK)
    first = await harness.start()
    assert await read_file(first, "f") == data
    await first.set_pins({"pinned"})
    await harness.stop(first)
    damage(harness.store, "f", CHUNK + 1)  # lost to a power cut, its record kept

    second = await harness.start()  # a new store object and source over the same dirs
    src = harness.source
    assert second.budget.used == allocated(harness.store)  # loaded from the store: blocks taken
    assert second.pins == {"pinned"} and second.is_pinned("pinned/g") and not second.is_pinned("pinnedx")
    assert await read_file(second, "f") == data
    assert second.metrics.checksum_failures == 1
    counts = src.counts("f", len(data))
    assert counts[CHUNK:2 * CHUNK].tolist() == [1] * CHUNK and counts.sum() == CHUNK


async def test_checking_a_whole_file_runs_as_many_flights_at_once_as_the_lane_has_threads(harness):
    """A passthrough open of a file an earlier daemon filled checks all its chunks. It started
    a flight and a task for every run at once: 50,000 for a 400 GB single-file checkpoint.
    (Found by review.)"""
    data = harness.write("f", 40 * CHUNK)
    first = await harness.start()
    assert await read_file(first, "f") == data
    await harness.stop(first)
    second = await harness.start()
    lane = second.fetcher.verify
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, lane.flights)
            await trio.sleep(0)

    handle = await second.open("f")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        assert await second.wait_verified_whole(handle, wait=5)
        nursery.cancel_scope.cancel()
    assert 1 <= most <= lane.threads < 40 // lane.max_chunks
    assert harness.source.calls("f") == 0  # checked, not fetched
    await second.release(handle)


async def test_without_room_on_the_cache_filesystem_reads_go_to_the_source(harness):
    class FullStore(CacheStore):
        """A cache filesystem with no space left."""

        def open_entry(self, relpath, identity, chunk_size):
            raise OSError(errno.ENOSPC, "No space left on device")

    data = harness.write("f", 3 * CHUNK)
    store = FullStore(harness.cache, os.path.realpath(harness.src))
    store.prepare()
    engine = await harness.start(store=store)
    assert await read_file(engine, "f") == data
    assert engine.metrics.bytes_read_through == len(data)
    assert set(engine.metrics.errors) == {"ENOSPC"}
    assert engine.cached_extent("f") is None  # the stand-in is not kept: the next open retries
    assert engine.budget.files() == {}  # nor counted: opens of many such files grow no table
    engine.prefetch("f")
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, "no space in the cache")


@pytest.mark.parametrize("fill", ["copy", "mapped"])
async def test_no_room_when_a_fill_writes_its_run_sends_reads_to_the_source(harness, monkeypatch, fill):
    def full(*args: int) -> None:  # the cache filesystem fills up mid-run
        raise OSError(errno.ENOSPC, "No space left on device")

    def unsupported(*args: int) -> None:
        raise kernelcopy.Unsupported()

    data = harness.write("f", 3 * CHUNK)
    engine = await harness.start()
    if fill == "copy":  # the kernel's copy into the cache file runs out of room
        monkeypatch.setattr(kernelcopy, "_copy_file_range", full)
    else:  # no copy between these files: the reservation for the mapping finds no room
        monkeypatch.setattr(kernelcopy.KernelCopy, "copy", unsupported)
        monkeypatch.setattr(linux, "fallocate", full)
    assert await read_file(engine, "f") == data
    assert engine.metrics.bytes_read_through == len(data)
    assert "ENOSPC" in engine.metrics.errors
    assert engine.cached_extent("f") == (0, len(data))  # nothing recorded: every chunk still missing


async def test_a_cache_filesystem_full_below_the_limit_lowers_it_and_evicts_the_least_recently_used(harness,
                                                                                                      monkeypatch):
    """reliability.md: the cache filesystem full below cache_size (another tenant took the
    space): the limit comes down to what the cache takes, and the least recently used files
    go, so that the next files are cached again rather than all read from the source.
    (Found by review: nothing tested the limit or the eviction.)"""
    files = {name: harness.write(name, 4 * CHUNK) for name in ("old", "recent", "next", "after")}
    engine = await harness.start(stream_read_size=4 * CHUNK)  # evicting one file makes room for one
    for name in ("old", "recent"):
        assert await read_file(engine, name) == files[name]
        await trio.sleep(0.002)
    used = engine.budget.used
    copy = kernelcopy._copy_file_range
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_once(*args: int) -> int:
        if failures:
            raise failures.pop()
        return copy(*args)

    monkeypatch.setattr(kernelcopy, "_copy_file_range", full_once)
    assert await read_file(engine, "next") == files["next"]  # read through this once
    assert engine.budget.limit < 2 * used  # was unlimited: now about what the cache took when it filled
    assert engine.metrics.files_evicted == 1 and engine.cached_extent("old") is None
    assert engine.cached_extent("recent") == (4 * CHUNK, 4 * CHUNK)
    assert await read_file(engine, "after") == files["after"]
    assert engine.cached_extent("after") == (4 * CHUNK, 4 * CHUNK)  # cached: there is room again


async def test_a_limit_a_full_cache_filesystem_lowered_comes_back_with_the_space(harness, monkeypatch):
    """A passing ENOSPC (another tenant filled the disk for a while) shrank the cache for the
    rest of the daemon's life. The limit comes back up, as space does, to what it was."""
    monkeypatch.setattr(evictor, "LIMIT_RECHECK", 0.01)
    harness.write("f", 4 * CHUNK)
    engine = await harness.start()
    engine.budget.limit = configured = 1 << 40
    failures = [OSError(errno.ENOSPC, "No space left on device")]
    copy = kernelcopy._copy_file_range

    def full_once(*args: int) -> int:
        if failures:
            raise failures.pop()
        return copy(*args)

    monkeypatch.setattr(kernelcopy, "_copy_file_range", full_once)
    await read_file(engine, "f")
    assert engine.budget.limit < configured
    free = harness.store.free_bytes()
    await wait_for(lambda: engine.budget.limit >= min(configured, engine.budget.used + free // 4))
    assert engine.budget.limit <= configured


async def test_a_cache_file_failing_its_fstat_after_a_fetch_fails_no_reader_and_not_the_engine(harness, monkeypatch):
    """A fetch's last step counts what the cache file takes (an fstat of it). A cache
    filesystem failing that call (EIO, ESTALE) left the fetch's waiters asleep and its
    chunks in flight for good, and the error ended the engine. (Found by review.)"""
    data = harness.write("f", 2 * CHUNK)
    engine = await harness.start()
    handle = await engine.open("f")

    def failing(entry):
        raise OSError(errno.EIO, "the cache filesystem failed an fstat")

    monkeypatch.setattr(CacheEntry, "disk_bytes", failing)
    with trio.fail_after(5):
        assert await read_handle(engine, handle) == data
    monkeypatch.undo()
    await engine.release(handle)
    assert await read_file(engine, "f") == data  # the engine serves on


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def interrupted_at_once(request, entered: Callable[[], Awaitable[None]]) -> None:
    """Run request, cancel it (as an INTERRUPT does) once it waits on the source (entered),
    and require that it ends at once, while the source goes on not answering."""
    ended = trio.Event()

    async def run(scope: trio.CancelScope) -> None:
        with scope:
            await request()
        ended.set()

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, scope)
        await entered()
        scope.cancel()
        with trio.fail_after(2):  # the source holds it for GATE_TIMEOUT
            await ended.wait()


async def test_an_open_waiting_for_a_source_that_does_not_answer_ends_at_its_interrupt(harness):
    """Every open asks the source (to validate what is cached). A killed opener on a source
    that does not answer (an NFS hard mount whose server is down) stayed in D state until the
    source answered: the open's thread could not be given up. (Found by review.)"""
    entered, answer = threading.Event(), threading.Event()

    class HungOpens(CountingSource):
        def open(self, relpath: str) -> tuple[int, os.stat_result]:
            entered.set()
            answer.wait(GATE_TIMEOUT)
            return super().open(relpath)

    harness.write("f", CHUNK)
    engine = await harness.start(source=HungOpens(harness.src))
    before = open_fds()
    await interrupted_at_once(lambda: engine.open("f"),
                              lambda: trio.to_thread.run_sync(entered.wait, GATE_TIMEOUT))
    answer.set()  # the source answers at last: the descriptor it opened is closed
    await wait_for(lambda: open_fds() == before)


async def test_a_read_through_waiting_for_a_source_that_does_not_answer_ends_at_its_interrupt(harness):
    """A read served straight from the source (no room in the cache) could not be given up
    either; its late result must not land in the reply buffer, given back meanwhile."""
    harness.write("f", 4 * CHUNK)
    engine = await harness.start()
    engine.budget.limit = 0  # no room: read through
    handle = await engine.open("f")
    before = open_fds()
    gate = harness.source.hold("f")
    reply = buffer(CHUNK)
    await interrupted_at_once(lambda: engine.read(handle, 0, CHUNK, reply), gate.wait_entered)
    gate.open()
    await wait_for(lambda: open_fds() == before)  # the read's own descriptor, closed once it ended
    assert bytes(reply) == bytes(CHUNK)
    await engine.release(handle)


async def test_a_call_given_up_before_its_thread_started_never_runs_and_lets_go_of_its_arguments():
    """A request interrupted while its call waits for a thread: the call never runs later
    (it would use a descriptor given back meanwhile), and `unused` lets go of what it held."""
    tasks = Tasks()
    threads = trio.CapacityLimiter(1)
    ran, let_go = [], []
    async with threads:  # every thread taken
        with trio.move_on_after(0.1):
            await tasks.abandonable(ran.append, "ran", key="k", unused=lambda: let_go.append("let go"), limiter=threads)
    await trio.sleep(0.1)
    assert (ran, let_go) == ([], ["let go"])


async def test_sequential_reads_fetch_ahead_of_the_reader(harness):
    data = harness.write("f.dat", 8 * CHUNK)  # not a shard: no stream with readahead=shards
    engine = await harness.start(readahead="shards", sequential_window=2 * CHUNK)
    src = harness.source
    handle = await engine.open("f.dat")
    assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == data[:CHUNK]
    assert bytes(await engine.read(handle, CHUNK, CHUNK, buffer(CHUNK))) == data[CHUNK:2 * CHUNK]  # sequential
    await wait_for(lambda: engine.cached_extent("f.dat")[0] == 4 * CHUNK)  # chunks 2-3 fetched unasked
    hits = engine.metrics.chunk_hits
    assert bytes(await engine.read(handle, 2 * CHUNK, CHUNK, buffer(CHUNK))) == data[2 * CHUNK:3 * CHUNK]
    assert engine.metrics.chunk_hits == hits + 1
    assert src.counts("f.dat", len(data))[:4 * CHUNK].max() == 1
    await engine.release(handle)


# ---- the evictor -------------------------------------------------------------------------

async def test_a_full_cache_evicts_the_least_recently_used_idle_file(harness):
    files = {name: harness.write(name, 4 * CHUNK) for name in ("a", "b", "c")}
    engine = await harness.start()
    src = harness.source
    for name in ("a", "b"):
        assert await read_file(engine, name) == files[name]
        await trio.sleep(0.002)  # distinct last-use times
    engine.budget.limit = 10 * CHUNK  # room for a and b, not for c as well
    assert await read_file(engine, "c") == files["c"]
    assert engine.metrics.files_evicted == 1
    assert engine.cached_extent("a") is None and harness.store.index_of("a") is None
    assert harness.store.index_of("b")["cached"] == 4 * CHUNK
    assert engine.cached_extent("c") == (4 * CHUNK, 4 * CHUNK)
    assert engine.budget.used <= engine.budget.limit
    assert engine.metrics.bytes_read_through == 0
    assert await read_file(engine, "a") == files["a"]  # evicted: fetched again, b goes now
    assert src.counts("a", 4 * CHUNK).tolist() == [2] * (4 * CHUNK)
    assert harness.store.index_of("b") is None and engine.metrics.files_evicted == 2


async def test_a_prefetched_file_is_not_evicted_before_files_used_before_it(harness):
    """A file filled by a stream (prefetch, readahead of its siblings) and never opened counted
    as used at time 0, the first to go: a prefetch of a model larger than the room left
    evicted its own first shards, which the load then fetched again. (Found by review.)"""
    files = {name: harness.write(name, 4 * CHUNK) for name in ("old", "p1", "p2")}
    engine = await harness.start()
    assert await read_file(engine, "old") == files["old"]
    await trio.sleep(0.002)
    engine.budget.limit = 2 * engine.budget.used  # room for two of the three files
    for name in ("p1", "p2"):
        engine.prefetch(name)
        await settled(engine, name)
    assert engine.metrics.files_evicted == 1
    assert engine.cached_extent("old") is None  # used before the prefetch: the one to go
    assert engine.cached_extent("p1") == (4 * CHUNK, 4 * CHUNK)
    assert engine.cached_extent("p2") == (4 * CHUNK, 4 * CHUNK)


def test_eviction_order_is_least_recently_used_across_a_restart_and_later_uses():
    """The budget keeps its files in order of use instead of sorting them all for each
    fetch on a full cache; the store's files come at start in the order it finds them."""
    budget = CacheBudget(limit=4)
    for name, used in (("c", 30.0), ("a", 10.0), ("d", 40.0), ("b", 20.0)):  # as the store lists them
        budget.set_cached(name, 1, 1, used)
    assert budget.victims(2, lambda path: True) == ["a", "b"]
    budget.touch("a", 50.0)
    budget.set_cached("e", 1, 1)  # filled now, never opened
    assert budget.victims(3, lambda path: path != "c") == ["b", "d", "a", "e"]
    assert budget.victims(9, lambda path: True) is None


async def test_many_tiny_files_keep_what_the_cache_takes_on_disk_under_the_limit(harness):
    """Each cached file takes whole blocks of data and an index besides its bytes: 300 files
    of one byte take over 2 MB. The limit is of the allocated blocks (audit 2, item 13)."""
    files = {f"tiny/{i:04d}": harness.write(f"tiny/{i:04d}", 1) for i in range(300)}
    engine = await harness.start()
    engine.budget.limit = 256 * 1024
    for name, data in files.items():
        assert await read_file(engine, name) == data
        assert allocated(harness.store) <= engine.budget.limit
    assert engine.budget.used == allocated(harness.store)
    assert engine.metrics.files_evicted > 200


async def test_open_and_pinned_files_are_never_evicted_and_reads_go_through(harness):
    files = {name: harness.write(name, 4 * CHUNK) for name in ("open", "pins/b", "d")}
    engine = await harness.start()
    src = harness.source
    await engine.set_pins({"pins"})
    assert await read_file(engine, "pins/b") == files["pins/b"]
    held = await engine.open("open")
    assert await read_handle(engine, held) == files["open"]
    engine.budget.limit = 8 * CHUNK  # exactly full

    assert await read_file(engine, "d") == files["d"]
    assert engine.metrics.bytes_read_through == 4 * CHUNK
    assert engine.metrics.files_evicted == 0
    assert engine.cached_extent("open") == (4 * CHUNK, 4 * CHUNK)
    assert engine.cached_extent("pins/b") == (4 * CHUNK, 4 * CHUNK)
    assert engine.cached_extent("d") == (0, 4 * CHUNK)
    assert await read_file(engine, "d") == files["d"]  # not cached: from the source again
    assert src.counts("d", 4 * CHUNK).tolist() == [2] * (4 * CHUNK)

    assert await engine.evict("open") is False
    assert await engine.evict("pins/b") is False
    assert harness.store.index_of("open")["cached"] == 4 * CHUNK
    await engine.release(held)
    assert await engine.evict("open") is True
    assert harness.store.index_of("open") is None and engine.cached_extent("open") is None
    await engine.set_pins(set())
    assert harness.store.load_pins() == set()
    assert await engine.evict("pins/b") is True
    assert engine.budget.used == allocated(harness.store)  # d's index, nothing else


async def test_a_read_through_that_fails_is_eio(harness):
    harness.write("kept", 4 * CHUNK)
    harness.write("d", CHUNK)
    engine = await harness.start()
    held = await engine.open("kept")
    await read_handle(engine, held)
    engine.budget.limit = 4 * CHUNK  # full of an open file
    harness.source.fail("d", errno.EIO)
    handle = await engine.open("d")
    with pytest.raises(ReadError) as info:
        await engine.read(handle, 0, CHUNK, buffer(CHUNK))
    assert info.value.errno == errno.EIO and engine.metrics.errors == {"EIO": 1}
    harness.source.clear("d")
    assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == (harness.src / "d").read_bytes()
    assert engine.metrics.bytes_read_through == CHUNK
    await engine.release(handle)
    await engine.release(held)


async def test_a_file_being_streamed_is_not_evicted(harness):
    harness.write("f", 8 * CHUNK)
    engine = await harness.start()
    gate = harness.source.hold("f")
    engine.prefetch("f")
    await gate.wait_entered()
    assert await engine.evict("f") is False
    gate.open()
    await settled(engine, "f")
    assert await engine.evict("f") is True


# ---- the stream scheduler ----------------------------------------------------------------

async def test_a_prefetch_leaves_the_whole_file_verified(harness):
    data = harness.write("f", 10 * CHUNK + 123)
    engine = await harness.start()
    src = harness.source
    engine.prefetch("f")
    assert engine.stream_state("f") == (True, None)
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None)
    assert engine.cached_extent("f") == (len(data), len(data))
    assert engine.metrics.files_streamed == 1
    assert src.counts("f", len(data)).tolist() == [1] * len(data)
    calls = src.calls("f")
    engine.prefetch("f")  # already cached: nothing to read
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None) and src.calls("f") == calls
    assert await read_file(engine, "f") == data and src.calls("f") == calls


async def test_a_prefetch_that_fails_ends_with_an_error(harness):
    data = harness.write("bad", 6 * CHUNK)
    os.mkfifo(harness.src / "pipe")
    engine = await harness.start()
    src = harness.source
    src.fail("bad", errno.EIO)
    for path in ("bad", "missing", "pipe"):
        engine.prefetch(path)
    await settled(engine, "bad", "missing", "pipe")
    pending, error = engine.stream_state("bad")
    assert not pending and "injected" in error
    assert "No such file" in engine.stream_state("missing")[1]
    assert "not a regular file" in engine.stream_state("pipe")[1]
    src.clear("bad")
    engine.prefetch("bad")  # a new prefetch forgets the old error
    await settled(engine, "bad")
    assert engine.stream_state("bad") == (False, None)
    assert await read_file(engine, "bad") == data


async def test_a_file_modified_during_its_prefetch_is_fetched_again(harness):
    harness.write("f", 8 * CHUNK)
    engine = await harness.start()
    src = harness.source
    gate = src.hold("f", offset=0)
    engine.prefetch("f")
    await gate.wait_entered()
    new = harness.rewrite("f", os.urandom(9 * CHUNK))
    gate.open()
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None)
    assert engine.cached_extent("f") == (len(new), len(new))
    calls = src.calls("f")
    assert await read_file(engine, "f") == new and src.calls("f") == calls


@pytest.mark.parametrize("blocks", [
    2,
    1,  # replaced during its last block: the completed stream was of a retired version
])
async def test_a_file_replaced_during_its_prefetch_is_fetched_again(harness, blocks):
    harness.write("f", blocks * 4 * CHUNK)
    engine = await harness.start()
    gate = harness.source.hold("f", offset=0)
    engine.prefetch("f")
    await gate.wait_entered()
    new = harness.replace("f", os.urandom(5 * CHUNK))  # renamed over: the old inode is intact
    await engine.lstat("f")  # a lookup sees it: the version being streamed is retired
    gate.open()
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None)
    assert engine.cached_extent("f") == (len(new), len(new))
    calls = harness.source.calls("f")
    assert await read_file(engine, "f") == new and harness.source.calls("f") == calls


async def test_a_lookup_with_lagging_attributes_leaves_one_live_version(harness, caplog):
    """A network filesystem's attribute cache can show a lookup the version before the one
    the daemon has open. That lookup retires the open version; the next open finds it is the
    source's version after all and takes it back. Loaded a second time instead, two live
    entries would write one pair of cache files, each fetching again what the other holds
    and taking the other's writes for foreign ones."""
    harness.write("f", 3 * CHUNK)
    stale = os.lstat(harness.src / "f")  # what a lagging attribute cache keeps showing
    data = harness.rewrite("f", os.urandom(4 * CHUNK))
    engine = await harness.start()
    src = harness.source
    first = await engine.open("f")
    assert bytes(await engine.read(first, 0, CHUNK, buffer(CHUNK))) == data[:CHUNK]
    lstat = src.lstat
    src.lstat = lambda relpath: stale if relpath == "f" else lstat(relpath)
    await engine.lstat("f")  # retires the open version
    second = await engine.open("f")
    assert bytes(await engine.read(second, CHUNK, CHUNK, buffer(CHUNK))) == data[CHUNK:2 * CHUNK]
    assert bytes(await engine.read(first, 0, 3 * CHUNK, buffer(3 * CHUNK))) == data[:3 * CHUNK]
    assert src.counts("f", len(data)).tolist() == [1] * (3 * CHUNK) + [0] * CHUNK
    assert "behind fusecache's back" not in caplog.text
    assert [info["users"] for info in engine.open_files()] == [2]  # one version, both handles on it
    await engine.release(first)
    await engine.release(second)
    assert engine.activity() == (0, 0)


async def test_a_file_that_keeps_changing_is_given_up(harness):
    harness.write("f", 2 * CHUNK)
    engine = await harness.start()
    src = harness.source
    src.hooks["f"] = lambda offset: harness.rewrite("f", os.urandom(2 * CHUNK))
    engine.prefetch("f")
    await settled(engine, "f")
    pending, error = engine.stream_state("f")
    assert not pending and "keeps changing" in error
    assert 1 < src.calls("f") <= 10  # tried again, but not forever


async def test_automatic_readahead_streams_what_is_opened(harness):
    big = harness.write("big", 6 * CHUNK)
    harness.write("small", CHUNK)
    engine = await harness.start(readahead="all", readahead_min_size=2 * CHUNK)
    for path in ("big", "small"):
        await engine.release(await engine.open(path))
    await wait_for(lambda: engine.cached_extent("big") == (len(big), len(big)))
    await settled(engine, "big")
    assert engine.cached_extent("small") == (0, CHUNK)  # below readahead_min_size


async def test_automatic_readahead_of_a_file_modified_under_it_waits_for_the_next_open(harness):
    harness.write("f", 8 * CHUNK)
    engine = await harness.start(readahead="all")
    gate = harness.source.hold("f", offset=0)
    await engine.release(await engine.open("f"))
    await gate.wait_entered()
    new = harness.rewrite("f", os.urandom(6 * CHUNK))
    gate.open()
    await settled(engine, "f")
    assert engine.stream_state("f") == (False, None)  # no error: nobody asked for this stream
    assert engine.cached_extent("f") == (0, 8 * CHUNK)  # and no retry of its own
    await engine.release(await engine.open("f"))  # the next open streams the new version
    await wait_for(lambda: engine.cached_extent("f") == (len(new), len(new)))
    calls = harness.source.calls("f")
    assert await read_file(engine, "f") == new and harness.source.calls("f") == calls


# ---- the checkpoint policy ---------------------------------------------------------------

SHARDS = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]


def checkpoint(harness, index: bytes | None) -> None:
    """ckpt/: four shards, a shard not in any index, files that are not shards, and the index."""
    for name in SHARDS + ["extra.safetensors", "config.json", "tokenizer.model"]:
        harness.write(f"ckpt/{name}", 2 * CHUNK)
    (harness.src / "ckpt" / "sub.safetensors").mkdir()  # not a regular file
    if index is not None:
        (harness.src / "ckpt" / "model.safetensors.index.json").write_bytes(index)


async def stream_order(harness, opened: str) -> list[str]:
    engine = await harness.start(readahead="shards", streams=1)
    await engine.release(await engine.open(f"ckpt/{opened}"))
    expected = {f"ckpt/{name}" for name in SHARDS + ["extra.safetensors"]}
    await wait_for(lambda: all(engine.cached_extent(p) == (2 * CHUNK, 2 * CHUNK) for p in expected))
    await settled(engine, *expected)
    order = [p.removeprefix("ckpt/") for p in harness.source.first_read_order()]
    assert set(order) == {p.removeprefix("ckpt/") for p in expected}  # shards only, each once
    return order


async def test_opening_a_shard_streams_its_siblings_in_index_order(harness):
    weight_map = {"a": SHARDS[2], "b": SHARDS[0], "c": SHARDS[2], "d": SHARDS[3], "e": SHARDS[1],
                  "f": "../elsewhere.safetensors", "g": "sub/x.safetensors", "h": 3}
    checkpoint(harness, json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    order = await stream_order(harness, SHARDS[1])
    assert order == [SHARDS[1], SHARDS[2], SHARDS[0], SHARDS[3], "extra.safetensors"]


async def test_a_directory_of_more_entries_than_a_checkpoint_has_streams_no_siblings(harness, monkeypatch):
    """A first shard opened in a dataset's directory (or a hostile tree of empty .bin files)
    listed and stat'ed all of it into memory, and queued every entry. (Found by review.)"""
    monkeypatch.setattr(shards, "MAX_DIRECTORY_ENTRIES", 7)  # the checkpoint's directory holds 8
    checkpoint(harness, None)
    engine = await harness.start(readahead="shards", streams=1)
    opened = f"ckpt/{SHARDS[0]}"
    await engine.release(await engine.open(opened))
    await wait_for(lambda: engine.cached_extent(opened) == (2 * CHUNK, 2 * CHUNK))
    await trio.sleep(0.1)  # time for siblings, had any been queued, to start (one stream at a time)
    await settled(engine, *(f"ckpt/{name}" for name in SHARDS))
    assert harness.source.first_read_order() == [opened]  # itself, no sibling


@pytest.mark.parametrize("index", ["malformed", "no-weight-map-object", "oversized", "fifo", "symlink"])
async def test_an_unusable_index_is_ignored(harness, index):
    checkpoint(harness, None)
    path = harness.src / "ckpt" / "model.safetensors.index.json"
    reverse = {"weight_map": {str(i): name for i, name in enumerate(reversed(SHARDS))}}
    if index == "malformed":
        path.write_bytes(b'{"weight_map": {')
    elif index == "no-weight-map-object":
        path.write_text(json.dumps({"weight_map": list(reversed(SHARDS))}))
    elif index == "oversized":  # valid JSON, reversed order, but too large to be an index
        body = json.dumps(reverse).encode()
        path.write_bytes(body)
        os.truncate(path, 1 << 30)  # sparse: costs nothing (real indexes are a few MiB)
    elif index == "fifo":  # opening it must not hang the planner
        os.mkfifo(path)
    else:
        (harness.tmp / "index.json").write_text(json.dumps(reverse))
        path.symlink_to(harness.tmp / "index.json")
    with trio.fail_after(10):
        order = await stream_order(harness, SHARDS[2])
    assert order == [SHARDS[2], "extra.safetensors", SHARDS[0], SHARDS[1], SHARDS[3]]  # by name


async def test_a_malformed_acl_denies_all_but_root(harness):
    class MalformedAcls(CountingSource):
        """A source whose ACL xattrs cannot be parsed (the kernel refuses to store such, but
        a network filesystem may hand one out)."""

        def acl_chain(self, relpath):
            raise acl.MalformedAcl("ACL version 9, expected 2")

    harness.write("f", 10)
    source = MalformedAcls(harness.src)
    source.has_acls = True  # whatever tmp_path's filesystem supports
    engine = await harness.start(source=source)
    with pytest.raises(OSError) as info:
        await engine.check_access("f", acl.R, 1000, 1000, os.getpid())
    assert info.value.errno == errno.EACCES
    await engine.check_access("f", acl.R, 0, 0, os.getpid())


# ---- descriptors -------------------------------------------------------------------------

async def test_an_open_past_the_descriptor_budget_fails_alone(harness):
    """Open files hold descriptors; the engine sizes its budget from RLIMIT_NOFILE when it is
    made (less a reserve for lookups and directories), so a low limit while it is made gives
    it a small budget (the process itself gets its limit back at once)."""
    for i in range(40):
        harness.write(f"f{i}", CHUNK)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128 + 30, hard))  # today: a budget of 30, ten files
    try:
        engine = await harness.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    handles = []
    with pytest.raises(OSError) as info:
        for i in range(40):
            handles.append(await engine.open(f"f{i}"))
    assert info.value.errno == errno.EMFILE and 0 < len(handles) < 40
    refused = f"f{len(handles)}"
    fd = await engine.opendir("")  # directories have a share of the reserve
    engine.closedir(fd)
    assert await read_handle(engine, handles[0]) == (harness.src / "f0").read_bytes()  # others go on
    await engine.release(handles.pop())
    handles.append(await engine.open(refused))  # the idle file gave its descriptors back
    assert await read_handle(engine, handles[-1]) == (harness.src / refused).read_bytes()
    for handle in handles:
        await engine.release(handle)
    assert len(engine.open_files()) < len(handles)  # fewer idle files are kept open under a low limit


async def test_one_user_cannot_spend_every_other_users_descriptors(harness, caplog):
    """Issue 23 item 10: the files one uid holds open may hold at most half the descriptor
    budget; past it only that uid's opens fail (EMFILE, logged once), other users' and root's
    go on. Through the adapter, which attributes each open to the requester's uid."""
    for i in range(40):
        harness.write(f"f{i}", CHUNK)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128 + 30, hard))  # a budget of 30: ten files
    try:
        ops = await operations(harness)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    hog, other = ctx(uid=1000, gid=1000), ctx(uid=2000, gid=2000)

    async def open_as(who, relpath: str) -> int:
        return (await ops.open((await ops.lookup(ROOT_INODE, relpath.encode(), who)).ino, os.O_RDONLY, who)).fh

    hogged = []
    with pytest.raises(OSError) as info:
        for i in range(40):
            hogged.append(await open_as(hog, f"f{i}"))
    assert info.value.errno == errno.EMFILE and len(hogged) == 5  # half of the budget
    hogged.append(await open_as(hog, "f0"))  # a file it holds already costs nothing more
    assert await fuse_errno(open_as(hog, "f39")) == errno.EMFILE
    assert sum("uid 1000 holds" in r.getMessage() for r in caplog.records) == 1  # once, not per open
    theirs = [await open_as(other, f"f{i}") for i in range(10, 14)]  # another user opens on
    mine = await open_as(ctx(), "f20")  # and root
    assert await read_all(ops, theirs[0]) == (harness.src / "f10").read_bytes()
    await ops.release(hogged.pop(0))
    await ops.release(hogged.pop())  # its last handle on f0: a file of its share given back
    hogged.append(await open_as(hog, "f39"))
    for fh in hogged + theirs + [mine]:
        await ops.release(fh)
    assert ops.engine.files.shares.held(1000) == 0 and ops.engine.files.shares.held(2000) == 0


async def test_one_users_open_directories_cannot_spend_every_other_users_descriptors(harness):
    """Open directories hold descriptors too, and count against their user's share: one user
    listing (or merely holding open) many directories gets EMFILE past its share, and every
    other user's opens go on."""
    for i in range(40):
        harness.write(f"d{i}/f", CHUNK)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128 + 30, hard))  # a budget of 30, a share of 15
    try:
        ops = await operations(harness)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    hog, other = ctx(uid=1000, gid=1000), ctx(uid=2000, gid=2000)
    dirs = [await ops.lookup(ROOT_INODE, f"d{i}".encode(), hog) for i in range(40)]
    held = []
    with pytest.raises(OSError) as info:
        for d in dirs:
            held.append(await ops.opendir(d.ino, hog))
    assert info.value.errno == errno.EMFILE and len(held) == 15  # its share, not the budget
    f = await ops.lookup(dirs[39].ino, b"f", other)
    theirs = await ops.open(f.ino, os.O_RDONLY, other)  # another user opens on
    assert await read_all(ops, theirs.fh) == (harness.src / "d39" / "f").read_bytes()
    await ops.release(theirs.fh)
    for fh in held:
        await ops.releasedir(fh)
    assert ops.engine.files.shares.held(1000) == 0


async def test_a_file_too_large_for_the_cache_filesystem_is_read_from_the_source(harness):
    """A data file the cache filesystem cannot hold (EFBIG: ext4 past 16 TiB) failed every
    open of the file; it is read straight from the source, as for a full cache. (Review.)"""
    data = harness.write("big.bin", 3 * CHUNK + 17)
    engine = await harness.start()
    with file_size_limit(CHUNK):  # what a cache filesystem says of a file too large for it
        assert await read_file(engine, "big.bin") == data
    assert harness.store.index_of("big.bin") is None


async def test_a_file_of_more_chunks_than_are_served_fails_its_open_alone(harness, monkeypatch):
    """A sparse file of petabytes costs its writer nothing, and its chunk states alone took
    the daemon's memory (72 GiB for 32 PiB). An open of a file past MAX_CHUNKS is EFBIG; the
    other files are served. (Found by review.)"""
    monkeypatch.setattr(files_module, "MAX_CHUNKS", 8)
    with open(harness.src / "sparse.img", "wb") as f:
        f.truncate(8 * CHUNK + 1)
    small = harness.write("small.bin", 8 * CHUNK)
    engine = await harness.start()
    with pytest.raises(OSError) as refused:
        await engine.open("sparse.img")
    assert refused.value.errno == errno.EFBIG
    assert await read_file(engine, "small.bin") == small


async def test_opens_killed_and_tried_again_on_a_file_that_hangs_hold_one_thread():
    """An open given up at its INTERRUPT leaves its call to the source running on a thread.
    A user killing and retrying an open of a file whose source hangs took a thread per try,
    until no metadata thread was left for anyone; the next call of the same key now waits
    for the one that runs on, as a killable wait. (Found by review.)"""
    tasks = Tasks()
    answer, started = threading.Event(), []

    def hung_open() -> str:
        started.append(1)
        answer.wait(GATE_TIMEOUT)
        return "opened"

    for _ in range(3):  # killed, tried again
        with trio.move_on_after(0.1):
            await tasks.abandonable(hung_open, key=("open", "f"))
    assert len(started) == 1  # one thread on the source, the tries after it waiting for it
    assert await tasks.abandonable(lambda: "other", key=("open", "g")) == "other"  # others go on
    answer.set()
    with trio.fail_after(5):
        assert await tasks.abandonable(hung_open, key=("open", "f")) == "opened"
    assert len(started) == 2


async def test_without_address_space_to_map_a_cache_file_its_reads_go_to_the_source(harness, monkeypatch):
    """Each entry maps its whole data file, whose size a source's writer chooses (a sparse
    file costs nothing): a few 16 TiB files took the daemon's whole address space, and every
    other fill failed with ENOMEM, which readers got as EIO. Past store.MAPPED_MAX a file is
    read through, correctly, and the cache limit is left alone (nothing is full). (Found by
    review.)"""
    from fusecache import store as store_module

    data = harness.write("f", 3 * CHUNK)
    engine = await harness.start()
    limit = engine.budget.limit
    monkeypatch.setattr(store_module, "MAPPED_MAX", store_module._AddressSpace.mapped + CHUNK)  # not the file
    assert await read_file(engine, "f") == data
    assert engine.metrics.bytes_read_through == len(data) and engine.budget.limit == limit
    monkeypatch.undo()
    assert await read_file(engine, "f") == data  # mapped once there is room: cached
    assert engine.cached_extent("f") == (len(data), len(data))


async def test_pins_set_by_requests_at_once_are_saved_as_last_set(harness):
    """Pin and unpin requests at once saved their sets through one temporary file from
    several threads: some failed ("internal error"), and an older set could be the one kept,
    whose files a restart then let be evicted. (Found by review.)"""
    engine = await harness.start()
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(engine.set_pins, {f"p{i}" for i in range(n + 1)})
    assert harness.store.load_pins() == engine.pins  # the last set, whichever request that was
    assert not list(harness.store.root.glob(".*.tmp"))


async def test_an_open_interrupted_while_it_evicts_for_a_full_disk_keeps_the_budget_right(harness, monkeypatch):
    """An open that meets a full cache filesystem evicts for room; killed while the removal
    waited for a thread, it left the file forgotten by the budget with its files on disk:
    never chosen again, the cache outgrew its limit. (Found by review.)"""
    files = {name: harness.write(name, 4 * CHUNK) for name in ("a", "b", "c")}
    engine = await harness.start()
    for name in ("a", "b"):
        assert await read_file(engine, name) == files[name]
        await trio.sleep(0.002)
    assert engine.budget.used == allocated(harness.store)
    store = harness.store
    real = store.open_entry
    entered, go_on = threading.Event(), threading.Event()

    def open_entry(relpath, identity, chunk_size):
        if relpath == "c" and not entered.is_set():  # the cache filesystem is full, once
            entered.set()
            go_on.wait(GATE_TIMEOUT)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(relpath, identity, chunk_size)

    monkeypatch.setattr(store, "open_entry", open_entry)
    with trio.CancelScope() as scope:
        async def interrupt() -> None:
            assert await trio.to_thread.run_sync(entered.wait, 5.0)
            scope.cancel()  # the opener is killed while its open waits on the cache filesystem
            go_on.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt)
            await engine.open("c")
    await trio.testing.wait_all_tasks_blocked()
    # whatever was evicted or not, the budget must count what the cache holds on disk
    assert engine.budget.used == allocated(harness.store), (engine.budget.files(), store.index_of("a"))


async def test_readahead_streams_a_new_version_opened_after_the_old_ones_idle_file_was_closed(harness, monkeypatch):
    """Automatic readahead is queued once per version: it forgot a version only when retired
    or evicted, not when its idle file was closed (more files than are kept idle), so a
    checkpoint rewritten under the same names was never streamed again. (Found by review.)"""
    monkeypatch.setattr(files_module, "MAX_IDLE_FILES", 1)
    harness.write("f", 6 * CHUNK)
    harness.write("g", CHUNK)
    engine = await harness.start(readahead="all")
    await engine.release(await engine.open("f"))
    await wait_for(lambda: engine.cached_extent("f") == (6 * CHUNK, 6 * CHUNK))
    await settled(engine, "f")
    await engine.release(await engine.open("g"))  # keeping one idle file closes f's
    await settled(engine, "g")
    await wait_for(lambda: engine.cached_extent("f") is None)
    new = harness.rewrite("f", os.urandom(5 * CHUNK))  # a new checkpoint under the same name
    await engine.release(await engine.open("f"))
    await wait_for(lambda: engine.cached_extent("f") == (len(new), len(new)))


async def test_an_open_interrupted_as_its_source_open_fails_leaves_the_next_open_free(harness, monkeypatch):
    """A call given up after it had raised was taken for one still running: the next open of
    the path waited, for good, for it to end. (Found by review.)"""
    harness.write("f", CHUNK)
    engine = await harness.start()
    src = harness.source
    real = src.open
    entered, answer = threading.Event(), threading.Event()

    def source_open(relpath):
        if relpath == "f" and not entered.is_set():
            entered.set()
            answer.wait(GATE_TIMEOUT)
            raise OSError(errno.ETIMEDOUT, "the server did not answer")  # a soft NFS mount gives up
        return real(relpath)

    monkeypatch.setattr(src, "open", source_open)
    with trio.CancelScope() as scope:
        async def interrupt() -> None:
            assert await trio.to_thread.run_sync(entered.wait, 5.0)
            scope.cancel()  # the opener is killed...
            answer.set()  # ...as the source's error comes back
            time.sleep(0.2)  # (the trio thread is busy: the open's thread ends before its task resumes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt)
            await engine.open("f")
    with trio.fail_after(5):  # the source answers at once now
        handle = await engine.open("f")
    await engine.release(handle)


async def test_a_read_through_interrupted_behind_one_that_hangs_leaks_no_descriptor(harness):
    """A read-through given up while it waited behind an abandoned one of its file kept the
    descriptor it had made for its call: one per killed reader while the source hangs.
    (Found by review.)"""
    data = harness.write("f", 2 * CHUNK)
    engine = await harness.start()
    engine.budget.limit = 0  # no room in the cache: reads go straight to the source
    handle = await engine.open("f")
    fds = len(os.listdir("/proc/self/fd"))
    gate = harness.source.hold("f")  # the source hangs on the first read
    with trio.CancelScope() as first:
        async def kill_first() -> None:
            await gate.wait_entered()
            first.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_first)
            await engine.read(handle, 0, CHUNK, buffer(CHUNK))
    for _ in range(3):  # readers killed while they wait behind the abandoned read
        with trio.move_on_after(0.1):
            await engine.read(handle, 0, CHUNK, buffer(CHUNK))
    gate.open()
    with trio.fail_after(5):
        assert bytes(await engine.read(handle, 0, CHUNK, buffer(CHUNK))) == data[:CHUNK]
    assert len(os.listdir("/proc/self/fd")) == fds
    await engine.release(handle)


async def test_pins_are_encoded_off_the_event_loop(harness, monkeypatch):
    """200,000 pins take a fifth of a second to encode: on the trio thread, each pin or unpin
    held every request that long. (Found by review of the day's diff.)"""
    engine = await harness.start()
    where = []
    encode = CacheStore.encode_pins

    def watched(pins):
        where.append(threading.current_thread() is threading.main_thread())
        return encode(pins)

    monkeypatch.setattr(CacheStore, "encode_pins", staticmethod(watched))
    await engine.set_pins({f"dir{i}/model.safetensors" for i in range(10)})
    assert where and not any(where), f"encoded on the event loop {sum(where)} time(s)"
