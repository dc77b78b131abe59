"""A Locust scenario for people who already run Locust (optional; the kit is scripts/loadgen.py).

    pip install locust        # not a dependency of agent-bff
    locust -f scripts/locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 1m

Each Locust user is one browser (its own cookie jar): it creates a session, then reads, writes
and streams like loadgen's virtual users, and reports a lost session as a failed request named
`continuity`. Environment: `LOADGEN_APP` (default `demo`), `LOADGEN_AGENT_PATH` (`stream`),
`LOADGEN_END_EVENT` (`done`). Not type-checked by mypy (Locust is not installed by default).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from locust import HttpUser, between, task

APP = os.environ.get("LOADGEN_APP", "demo")
AGENT_PATH = os.environ.get("LOADGEN_AGENT_PATH", "stream")
END_EVENT = os.environ.get("LOADGEN_END_EVENT", "done")
CSRF = {"X-CSRF": "1", "Content-Type": "application/json"}


class GatewayUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.token = secrets.token_hex(8)
        self.n = 0
        self.create()

    def create(self) -> None:
        body = {"lg_token": self.token, "lg_n": self.n}
        self.client.patch(
            f"/apps/{APP}/session", data=json.dumps(body), headers=CSRF, name="create"
        )

    def check(self, data: Any) -> None:
        if (
            not isinstance(data, dict)
            or data.get("lg_token") != self.token
            or (data.get("lg_n") != self.n)
        ):
            self.environment.events.request.fire(
                request_type="CHECK",
                name="continuity",
                response_time=0,
                response_length=0,
                exception=AssertionError("session lost or stale"),
                context={},
            )
            self.create()

    @task(6)
    def read(self) -> None:
        with self.client.get(f"/apps/{APP}/session", name="read", catch_response=True) as r:
            if r.status_code == 200:
                self.check(r.json().get("data"))

    @task(2)
    def write(self) -> None:
        self.n += 1
        with self.client.patch(
            f"/apps/{APP}/session",
            data=json.dumps({"lg_n": self.n}),
            headers=CSRF,
            name="write",
            catch_response=True,
        ) as r:
            if r.status_code == 200:
                self.check(r.json().get("data"))

    @task(2)
    def stream(self) -> None:
        started = time.perf_counter()
        headers = {**CSRF, "Accept": "text/event-stream"}
        with self.client.post(
            f"/apps/{APP}/agent/{AGENT_PATH}",
            data=b'{"input": "hello"}',
            headers=headers,
            name="stream",
            stream=True,
            catch_response=True,
        ) as r:
            first = None
            done = False
            for line in r.iter_lines():
                if first is None and line:
                    first = time.perf_counter() - started
                if line == f"event: {END_EVENT}".encode():
                    done = True
            if r.status_code == 200 and not done and END_EVENT:
                r.failure("truncated stream")
            if first is not None:
                self.environment.events.request.fire(
                    request_type="SSE",
                    name="time to first event",
                    response_time=first * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
