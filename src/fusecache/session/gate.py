"""The pause of a session's read loop, for a restart's hand-over (handover.py).

A pause stops the reading at the loop's next wait (never between reading a request and
dispatching it), then waits until every request read is answered: the connection can then
change hands with nothing of it half done, while the kernel queues what comes meanwhile.
"""

from __future__ import annotations

import trio


class ReadGate:
    """Counts the requests in flight, and holds the read loop while paused."""

    def __init__(self) -> None:
        self._reading: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None  # set once the read loop stopped for a pause
        self._resumed = trio.Event()
        self._in_flight = 0
        self._drained = trio.Event()  # set when _in_flight drops to 0

    def reading(self) -> trio.CancelScope:
        """The scope the read loop runs in; pause() cancels it."""
        self._reading = trio.CancelScope()
        return self._reading

    def closed(self) -> None:
        """The read loop ended for good (the session is over): nothing to pause any more."""
        self._reading = None

    async def hold(self) -> None:
        """Called by the read loop once its scope was cancelled: returns when to read again."""
        assert self._stopped is not None  # only pause() cancels the reading
        self._stopped.set()
        await self._resumed.wait()
        self._stopped, self._resumed = None, trio.Event()

    def started(self) -> None:
        self._in_flight += 1

    def finished(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._drained.set()

    async def pause(self, timeout: float) -> bool:
        """Stop the reading and wait until every request read is answered; False, and reading
        again, if that takes over `timeout` seconds (a request stuck on the source must not
        hold every reader up). RuntimeError if the loop is not reading."""
        if self._reading is None or self._stopped is not None:
            raise RuntimeError("the session is not serving")
        self._stopped = trio.Event()
        self._reading.cancel()
        with trio.move_on_after(timeout):
            await self._stopped.wait()
            while self._in_flight:
                self._drained = trio.Event()
                await self._drained.wait()
            return True
        self.resume()
        return False

    def resume(self) -> None:
        """Read again after pause() (the hand-over failed)."""
        self._resumed.set()
