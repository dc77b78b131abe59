"""What one bench run does (`Options`; `--smoke` is every row once, briefly) and the gateway paths
it loads."""

from __future__ import annotations

from dataclasses import dataclass

SESSION_PATH = "/apps/demo/session"
AGENT_PATH = "/apps/demo/agent/stream"


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    reps: int = 3
    seconds: float = 8.0
    warmup: float = 2.0
    connections: int = 64
    sse_connections: int = 32
    sessions: int = 1000
    ttfe_streams: int = 300
    active_runs: int = 200
    memory_sessions: int = 100_000
    mixed_warmup: float = 10.0
    mixed_seconds: float = 60.0
    mixed_users: int = 50
    server_cpu: int | None = 0
    client_cpu: int | None = 1
    rows: tuple[str, ...] = ()
    log_level_row: bool = True
    # Rows for what optional features cost on top of the default configuration: the Redis
    # gateway with SESSION_ENCRYPTION_KEYS, and SSE through one whose application has rate
    # limits (never reached: the cost of checking them).
    cost_rows: bool = True
    profile: tuple[str, ...] = ()  # row keys to sample with py-spy after the measured runs

    @classmethod
    def smoke(cls) -> Options:
        return cls(
            reps=1,
            seconds=1.0,
            warmup=0.0,
            connections=16,
            sse_connections=8,
            sessions=20,
            ttfe_streams=10,
            active_runs=20,
            memory_sessions=2000,
            mixed_warmup=0.5,
            mixed_seconds=1.0,
            mixed_users=8,
            log_level_row=False,
        )
