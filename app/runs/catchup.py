"""The catch-up gate: at most `slots` catch-up reads of run events in flight per process, each
a reply Redis buffers against `maxmemory` (app/runs/store.py `range_after`).

Granted fairly (attack-replay-7, attack-gate-8): a freed slot goes round robin to the next
application with waiters, and within it round robin to the next client (a browser's address,
an IPv6 one by its /48: `turn_of`; a follower's reads are its first reader's), each
client's waiters in order. So one application's replays (64 readers of 4 MiB runs) delay
another application's read by about one read in flight, and one client's replays delay
another client of the same application the same way (they made replays ~300-650 times
slower, and a live follower lose its run). A client with many addresses (many /48s) still
gets as many turns: address fairness stops one address, not a botnet.

A waiter gives up after `wait` seconds (`StoreUnavailable`), and when a read in the gate fails
with `StoreUnavailable` (Redis stalled, unreachable), every waiter fails with it at once: when
Redis stalls, every reader learns it within about one operation deadline, not one deadline per
`slots` readers queued before it (65 readers: 11-13 s before).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from app.sessions.backend import StoreUnavailable

_Waiters = OrderedDict[str, deque[asyncio.Future[None]]]


def turn_of(client: str) -> str:
    """The gate's client for a per-client cap's key (`app.capacity.client_key`): an IPv6
    client by its /48 (a site; one attacker's /56 held 64 turns of /64s, attack-gate-9), an
    IPv4 address as it is."""
    if not client.endswith("/64"):
        return client
    try:
        network = ipaddress.IPv6Network(client)
    except ValueError:
        return client
    return str(network.supernet(new_prefix=48))


class CatchupGate:
    """`slots` permits, granted round robin between applications, then between the clients
    of one (see the module docstring)."""

    __slots__ = ("_free", "_waiting")

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Application -> client -> its waiters in order; the first of each is served next.
        self._waiting: OrderedDict[str, _Waiters] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(q) for clients in self._waiting.values() for q in clients.values())

    @contextlib.asynccontextmanager
    async def slot(self, app_id: str, client: str, *, wait: float) -> AsyncIterator[None]:
        """Hold one permit inside; waits at most `wait` seconds for it, then raises
        `StoreUnavailable`. A `StoreUnavailable` raised inside fails every waiter too."""
        await self._acquire(app_id, client, wait)
        try:
            yield
        except StoreUnavailable as err:
            self._fail_waiters(err)
            raise
        finally:
            self._release()

    async def _acquire(self, app_id: str, client: str, wait: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        clients = self._waiting.setdefault(app_id, OrderedDict())
        clients.setdefault(client, deque()).append(granted)
        try:
            async with asyncio.timeout(wait):
                await granted
        except BaseException as err:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self._release()  # granted just as the wait ended: hand the slot on
            else:
                self._forget(app_id, client, granted)
            if isinstance(err, TimeoutError):
                raise StoreUnavailable(
                    f"catch-up reads of run events busy for {wait:g} s (RUN_CATCHUP_READS)"
                ) from err
            raise

    def _forget(self, app_id: str, client: str, granted: asyncio.Future[None]) -> None:
        clients = self._waiting.get(app_id)
        queue = None if clients is None else clients.get(client)
        if clients is None or queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(granted)
        if not queue:
            del clients[client]
        if not clients:
            del self._waiting[app_id]

    def _release(self) -> None:
        while self._waiting:
            app_id, clients = self._waiting.popitem(last=False)
            client, queue = clients.popitem(last=False)
            granted = queue.popleft()
            if queue:
                clients[client] = queue  # its next waiter: after the application's others
            if clients:
                self._waiting[app_id] = clients  # after the other applications
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1

    def _fail_waiters(self, err: StoreUnavailable) -> None:
        waiting, self._waiting = self._waiting, OrderedDict()
        for clients in waiting.values():
            for queue in clients.values():
                for granted in queue:
                    if not granted.done():
                        granted.set_exception(StoreUnavailable(f"catch-up read failed: {err}"))
