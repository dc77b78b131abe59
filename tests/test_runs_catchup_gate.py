"""The catch-up gate (app/runs/catchup.py): permits granted round robin between applications,
a waiter giving up with its deadline, permits never lost when waiters leave."""

from __future__ import annotations

import asyncio

import pytest

from app.runs.catchup import CatchupGate, turn_of
from app.sessions.backend import StoreUnavailable


async def _hold(
    gate: CatchupGate,
    app_id: str,
    order: list[str],
    release: asyncio.Event,
    client: str = "c",
) -> None:
    async with gate.slot(app_id, client, wait=5):
        order.append(f"{app_id}/{client}")
        await release.wait()


async def test_a_freed_slot_goes_to_the_application_whose_turn_it_is_not_the_longest_queue() -> (
    None
):
    gate = CatchupGate(2)
    order: list[str] = []
    release = asyncio.Event()
    holders = [asyncio.create_task(_hold(gate, "shop", order, release)) for _ in range(2)]
    await asyncio.sleep(0)
    # shop queues 20 more readers, then other queues one.
    shop_waiters = [asyncio.create_task(_hold(gate, "shop", order, release)) for _ in range(20)]
    await asyncio.sleep(0)
    other = asyncio.create_task(_hold(gate, "other", order, release))
    await asyncio.sleep(0)
    assert gate.waiting == 21
    release.set()
    await asyncio.gather(*holders, *shop_waiters, other)
    # Two holders, then shop's first waiter (it queued first), then other, not after 20.
    assert order.index("other/c") <= 4, order
    assert gate.waiting == 0


async def test_a_waiter_gives_up_with_its_deadline_when_no_slot_frees() -> None:
    gate = CatchupGate(1)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, "shop", [], release))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(StoreUnavailable, match="RUN_CATCHUP_READS"):
        async with gate.slot("other", "c", wait=0.1):
            pass
    assert 0.09 <= loop.time() - began < 1.0
    assert gate.waiting == 0
    release.set()
    await holder
    async with gate.slot("other", "c", wait=0.1):  # the slot is back
        pass


async def test_waiters_that_leave_lose_no_slot() -> None:
    gate = CatchupGate(2)
    release = asyncio.Event()
    holders = [asyncio.create_task(_hold(gate, "shop", [], release)) for _ in range(2)]
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(_hold(gate, "shop", [], release)) for _ in range(10)]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert gate.waiting == 0
    # A waiter granted a slot and cancelled in the same turn hands it on.
    late = asyncio.create_task(_hold(gate, "other", [], release))
    await asyncio.sleep(0)
    release.set()
    late.cancel()
    await asyncio.gather(*holders, late, return_exceptions=True)
    async with asyncio.timeout(1):
        async with gate.slot("a", "c", wait=1), gate.slot("b", "c", wait=1):
            pass  # both permits are free again


async def test_within_an_application_clients_take_turns() -> None:
    gate = CatchupGate(1)
    order: list[str] = []
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, "shop", order, release, "hostile"))
    await asyncio.sleep(0)
    flood = [asyncio.create_task(_hold(gate, "shop", order, release, "hostile")) for _ in range(20)]
    await asyncio.sleep(0)
    user = asyncio.create_task(_hold(gate, "shop", order, release, "user"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *flood, user)
    assert order.index("shop/user") <= 2, order


async def test_a_read_failing_in_the_gate_fails_every_waiter_at_once() -> None:
    """Redis stalled: the reads in the gate fail with their deadline; the waiters learn it
    then, not one deadline per slot's worth of waiters later."""
    gate = CatchupGate(1)
    failed = asyncio.Event()

    async def failing_read() -> None:
        async with gate.slot("shop", "a", wait=5):
            await failed.wait()
            raise StoreUnavailable("TimeoutError: no answer within 1 s")

    async def waiter(app_id: str) -> None:
        async with gate.slot(app_id, "b", wait=30):
            pass

    reader = asyncio.create_task(failing_read())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(waiter(app)) for app in ("shop", "other") * 10]
    await asyncio.sleep(0)
    failed.set()
    results = await asyncio.wait_for(asyncio.gather(reader, *waiters, return_exceptions=True), 1)
    assert all(isinstance(result, StoreUnavailable) for result in results), results
    assert gate.waiting == 0
    async with gate.slot("other", "b", wait=0.1):  # the slot is back
        pass


def test_an_ipv6_client_takes_its_turn_by_its_48() -> None:
    """attack-gate-9: 64 /64s of one /56 held 64 turns of their application."""
    assert turn_of("2001:db8:1:2::/64") == turn_of("2001:db8:1:ff00::/64") == "2001:db8:1::/48"
    assert turn_of("2001:db8:2::/64") != turn_of("2001:db8:1::/64")
    assert turn_of("203.0.113.7") == "203.0.113.7"
    assert turn_of("not an address") == "not an address"
