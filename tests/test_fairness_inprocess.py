"""The metadata threads shared fairly between requesters (audit 2, item 11): a user queueing
thousands of calls delays another user's call by at most one of theirs, not all of them."""

from __future__ import annotations

import trio
import trio.testing

from fusecache.fairness import FairLimiter, requester


async def _call(limiter: FairLimiter, uid: int | None, order: list, gate: trio.Event, name: object) -> None:
    requester.set(uid)
    token = object()
    await limiter.acquire_on_behalf_of(token)
    order.append(name)
    await gate.wait()
    limiter.release_on_behalf_of(token)


async def test_a_second_user_is_served_next_not_after_the_first_users_queue():
    limiter = FairLimiter(2)
    order: list = []
    gates: dict = {}

    async def arrive(uid: int | None, name: object) -> None:
        gates[name] = trio.Event()
        nursery.start_soon(_call, limiter, uid, order, gates[name], name)
        await trio.testing.wait_all_tasks_blocked()  # queued in this order

    async def finish(name: object) -> None:
        gates[name].set()
        await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        for i in range(50):  # the storm: user 1000 queues 50 calls
            await arrive(1000, ("storm", i))
        assert limiter.borrowed_tokens == 2 and limiter.waiting == 48
        await arrive(0, "root")
        await arrive(None, "daemon")
        await finish(("storm", 0))
        await finish(("storm", 1))
        # the storm's turn came first (it queued first), then root's: not after 48 calls
        assert order == [("storm", 0), ("storm", 1), ("storm", 2), "root"]
        await finish(("storm", 2))
        assert order[-1] == "daemon"
        await finish("root")
        await finish("daemon")
        for i in range(3, 50):
            await finish(("storm", i))
    assert order[5:] == [("storm", i) for i in range(3, 50)]  # a requester's calls in arrival order
    assert limiter.borrowed_tokens == 0 and limiter.waiting == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_a_cancelled_grant_is_passed_on():
    limiter = FairLimiter(1)
    held = object()
    await limiter.acquire_on_behalf_of(held)
    order: list = []
    gate = trio.Event()
    gate.set()
    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await _call(limiter, 7, order, gate, "cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_call, limiter, 5, order, gate, "later")
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == 2
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == 1
        limiter.release_on_behalf_of(held)
    assert order == ["later"] and limiter.borrowed_tokens == 0 and limiter.waiting == 0


async def test_threads_run_under_it():
    limiter = FairLimiter(3)
    results = []
    async with trio.open_nursery() as nursery:
        for i in range(20):
            async def one(i=i) -> None:
                requester.set(i % 4)
                results.append(await trio.to_thread.run_sync(lambda: i * i, limiter=limiter))
            nursery.start_soon(one)
    assert sorted(results) == [i * i for i in range(20)] and limiter.borrowed_tokens == 0


async def test_an_acquire_that_is_cancelled_takes_no_thread():
    """The contract trio.to_thread relies on: it gives back only what an acquire that returned
    took. An acquire cancelled with a thread free (a request interrupted while an earlier call
    of its ran) must raise before taking it, or the thread is gone for good: sixteen such
    interrupted opens once left none for anything else."""
    limiter = FairLimiter(2)
    for _ in range(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            await limiter.acquire_on_behalf_of(object())
        assert scope.cancelled_caught
    assert limiter.borrowed_tokens == 0
    with trio.fail_after(5):
        assert await trio.to_thread.run_sync(lambda: 42, limiter=limiter) == 42
