"""Automatic pipelining: the Redis commands of concurrent requests share round trips.

redis-py spends most of a command's cost around the command, not in it: taking a pooled
connection (a lock, a condition, a readiness probe), a timeout context per read, response
callbacks. One command costs ~75-90 µs of CPU on its own and ~20 µs inside a pipeline of
fifty. Under load many requests need Redis in the same event-loop iteration, so
`CommandPipeliner` collects every command issued during one iteration and sends them, at the
start of the next, as one pipelined write on one pooled connection; the replies are read in
order and each goes to the future of the request that asked. An idle gateway pays nothing
extra: a lone command is a batch of one, sent one loop iteration later (no timer, no delay).

Semantics are those of sending each command alone (what `RedisBackend._run` relies on):
- Each caller gets its own reply or its own error. A `ResponseError` (`WRONGTYPE`,
  `NOSCRIPT`, `OOM`, `READONLY`) belongs to its command only; the rest of the batch is unaffected.
- A connection failure (refused, reset, timeout) fails every command of that batch still
  waiting for its reply, with the same redis-py exception a lone command would get; the
  connection is dropped, never reused with replies in flight. Each caller then retries on its
  own budget (`RedisBackend._run`: at most 3 retries, its own deadline), joining a later batch.
  Our commands are all safe to repeat after a lost reply (see `RedisBackend`).
- A caller that gives up (its deadline cancels the wait) cancels only its own future; the batch
  still reads that reply, so the connection stays in step.
- A batch's reads share one deadline of `socket_timeout` (the connection's), after which the
  connection is dropped and its waiting commands fail with redis-py's `TimeoutError`.
- Pool limits hold: each batch in flight holds one pooled connection (`get_connection` blocks
  up to the pool timeout, then "No connection available." as for a lone command).
"""

from __future__ import annotations

import asyncio
import functools
import math
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A command, already in its RESP encoding, and the future its caller awaits.
_Pending = tuple[bytes, "asyncio.Future[Any]"]

# Commands per pipelined write: bounds one batch's size on the wire and in Redis's output
# buffer; a busier iteration is split into several batches on several connections.
MAX_BATCH = 256


class CommandPipeliner:
    """Sends the commands of one event-loop iteration as one pipeline (see the module doc).

    `execute(*args)` returns a future with the raw RESP2 reply (bytes, int, None, list) or
    the redis-py exception that command would have raised alone. `close()` fails whatever is
    still queued and waits for batches in flight.
    """

    def __init__(self, pool: aioredis.ConnectionPool, *, max_batch: int = MAX_BATCH) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._flush_scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # pipelined writes sent (observability, tests)
        self.commands = 0  # commands sent in them

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for the next flush; await the returned future for its reply.

        Raises `TypeError` at once for an argument Redis cannot take (see `pack_command`):
        a bad command fails its own caller, never the batch it would have joined."""
        packed = pack_command(args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("the Redis client was closed"))
            return future
        self._queue.append((packed, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Start one batch task per `max_batch` commands still wanted."""
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        wanted = [pending for pending in queue if not pending[1].done()]
        loop = asyncio.get_running_loop()
        for start in range(0, len(wanted), self._max_batch):
            batch = wanted[start : start + self._max_batch]
            task = loop.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(functools.partial(self._batch_done, batch))

    def _batch_done(self, batch: list[_Pending], task: asyncio.Task[None]) -> None:
        """No caller waits forever: a batch cancelled before it even started (`close()`)
        fails its commands here."""
        self._in_flight.discard(task)
        _fail(batch, RedisConnectionError("the Redis client was closed"))

    async def _send(self, batch: list[_Pending]) -> None:
        """One batch on one pooled connection. A failure goes to every command still waiting;
        a cancellation (`close()`) leaves that to `_batch_done`."""
        try:
            # redis-py leaves get_connection unannotated
            connection: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as err:
            _fail(batch, err)
            return
        try:
            await self._exchange(connection, batch)
        except BaseException as err:
            # Replies may still be on their way: this connection is out of step for good.
            await connection.disconnect(nowait=True)
            if isinstance(err, asyncio.CancelledError):
                raise
            _fail(batch, err)
        finally:
            await self._pool.release(connection)

    async def _exchange(self, connection: AbstractConnection, batch: list[_Pending]) -> None:
        """Write the batch in one go, then hand each reply to its future, in order."""
        await connection.send_packed_command(b"".join([packed for packed, _ in batch]))
        self.batches += 1
        self.commands += len(batch)
        timeout = connection.socket_timeout
        try:
            async with asyncio.timeout(timeout if timeout else None):
                for _, future in batch:
                    try:
                        # math.inf: no per-read timeout context; the batch has one deadline.
                        reply = await connection.read_response(timeout=math.inf)
                    except ResponseError as err:
                        if not future.done():
                            future.set_exception(err)
                        continue
                    if not future.done():
                        future.set_result(reply)
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout reading from {_address(connection)}") from None

    async def close(self) -> None:
        """Fail queued commands, cancel batches in flight and wait for them."""
        self._closed = True
        queue, self._queue = self._queue, []
        _fail(queue, RedisConnectionError("the Redis client was closed"))
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def pack_command(args: tuple[Any, ...]) -> bytes:
    """The RESP encoding of one command, as redis-py's `pack_command` would write it (str as
    UTF-8, int and float in decimal), in one bytes object and at a third of its cost (it also
    handles encoders and large-value buffers we do not need). Raises `TypeError` for any
    other argument type (bool included, which redis-py refuses too)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % _bulk(arg))
    return b"".join(out)


def _bulk(arg: Any) -> tuple[int, bytes]:
    if isinstance(arg, bytes):
        value = arg
    elif isinstance(arg, str):
        value = arg.encode("utf-8")
    elif isinstance(arg, bool):
        raise TypeError("a bool is not a Redis argument; send 0/1 or a string")
    elif isinstance(arg, int):
        value = b"%d" % arg
    elif isinstance(arg, float):
        value = repr(arg).encode("ascii")
    elif isinstance(arg, (bytearray, memoryview)):
        value = bytes(arg)
    else:
        raise TypeError(f"cannot send {type(arg).__name__} to Redis")
    return len(value), value


def _fail(batch: list[_Pending], err: BaseException) -> None:
    """Give `err` to every command of `batch` whose caller still waits."""
    for _, future in batch:
        if not future.done():
            future.set_exception(err)


def _address(connection: AbstractConnection) -> str:
    host = getattr(connection, "host", "?")
    port = getattr(connection, "port", "?")
    return f"{host}:{port}"
