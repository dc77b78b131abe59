"""Tasks waiting for what one object does next: `wait` returns at the next `wake` or timeout."""

from __future__ import annotations

import asyncio


class Wakeup:
    """The futures of the tasks waiting in `wait`; `wake` resolves them all at once."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the next `wake`; False when it timed out."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            async with asyncio.timeout(seconds):
                await future
        except TimeoutError:
            return False
        finally:
            if future in self._waiters:
                self._waiters.remove(future)
        return True

    def wake(self) -> None:
        """Wake every task waiting now (a later `wait` waits for the next `wake`)."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
