"""Request ids minted in batches: still 32 hex digits of fresh randomness each."""

from __future__ import annotations

import os
import re

from app.middlewares import new_request_id
from tests.conftest import GatewayFactory


def test_ids_are_unique_across_batches() -> None:
    ids = [new_request_id() for _ in range(1000)]  # many batches of 64
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    new_request_id()  # a batch is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id != new_request_id()  # the parent's next id from the same batch differs


async def test_responses_carry_minted_ids(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")
    seen = set()
    for _ in range(100):
        resp = await gw.client.get("/healthz")
        seen.add(resp.headers["X-Request-Id"])
    assert len(seen) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in seen)
