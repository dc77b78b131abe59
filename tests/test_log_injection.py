"""Log injection (issue 12 row 11): request-derived text can neither forge a log line nor write
terminal escapes, in text or JSON logs, through a real `python -m app`."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import re
import sys
from unittest import mock

from aiohttp.test_utils import make_mocked_request

from app import logs
from app.forwarding import client_ip
from tests.conftest import GatewayProcessFactory

# A percent-encoded path whose decoded form carries a whole forged record after a newline, an
# ANSI colour escape, DEL, NEL (C1), U+2028 and a backslash.
FORGED = (
    "2026-01-01 00:00:00,000 INFO aiohttp.access: GET /admin 200 0.1ms request_id=forged-1 "
    "app=admin session=-"
)
HOSTILE_PATH = (
    "/apps/demo/x%0d%0a" + FORGED.replace(" ", "%20") + "%1b[31mred%1b[0m%7f%c2%85%e2%80%a8%5cend"
)
DECODED_PATH = "/apps/demo/x\r\n" + FORGED + "\x1b[31mred\x1b[0m\x7f\x85\u2028\\end"
# obs-text in a header value, as a browser-less client can send it: U+2028 in UTF-8, NEL in
# UTF-8, and a byte that is not UTF-8 at all (aiohttp keeps it as a lone surrogate).
HOSTILE_UA = b"evil\xe2\x80\xa8" + FORGED.encode() + b"\xc2\x85\xff"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


async def _send(port: int, target: str, user_agent: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"User-Agent: "
            + user_agent
            + b"\r\nX-Request-Id: hostile-1\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_text_logs_escape_hostile_paths_and_headers(
    gateway_process: GatewayProcessFactory,
) -> None:
    proc = gateway_process({"LOG_FORMAT": "text", "SESSION_STORE": "memory"})
    answer = await _send(proc.port, HOSTILE_PATH, HOSTILE_UA)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:100]
    assert proc.stop() == 0
    raw = proc.stderr_path.read_bytes()
    text = raw.decode("utf-8")  # strict: nothing undecodable was written
    for forbidden in (b"\x1b", b"\x7f", b"\r", "\u2028".encode(), "\x85".encode()):
        assert forbidden not in raw, (forbidden, text)
    lines = text.splitlines()  # also splits on U+2028, NEL, \x1c-\x1e: none may be there
    assert lines == text.split("\n")[:-1]
    for line in lines:
        assert line.isprintable(), repr(line)
        # A record starts in column 0; anything else is an indented continuation.
        assert RECORD_START.match(line) or line.startswith("  "), repr(line)
    access = [line for line in lines if "request_id=hostile-1" in line]
    assert len(access) == 1, text
    line = access[0]
    # The path as the browser sent it (percent-encoded): its decoded spaces cannot pose as
    # fields; the user agent, last, runs to the end of the line.
    message = line.split(" aiohttp.access: ", 1)[1]
    method, path, status, duration, rest = message.split(" ", 4)
    assert re.fullmatch(r"\d+\.\d{3}ms", duration)
    fields, user_agent = rest.split(" ua=", 1)
    assert (method, path, status) == ("GET", HOSTILE_PATH, "404")
    assert dict(field.split("=", 1) for field in fields.split(" ")) == {
        "request_id": "hostile-1",
        "app": "-",
        "session": "-",
        "client": "127.0.0.1",
        "bytes_sent": fields.split("bytes_sent=")[1],
    }
    assert user_agent == "evil\\u2028" + FORGED + "\\x85\\udcff"
    assert line.count(FORGED) == 1  # the user agent's, inside the line
    assert not any(other.startswith(FORGED) for other in lines)


async def test_json_logs_carry_hostile_text_losslessly_and_strictly_valid(
    gateway_process: GatewayProcessFactory,
) -> None:
    proc = gateway_process({"LOG_FORMAT": "json", "SESSION_STORE": "memory"})
    answer = await _send(proc.port, HOSTILE_PATH, HOSTILE_UA)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:100]
    assert proc.stop() == 0
    raw = proc.stderr_path.read_bytes()
    assert raw.isascii()
    records = [json.loads(line) for line in raw.decode().split("\n")[:-1]]  # one object a line
    access = [r for r in records if r.get("request_id") == "hostile-1"]
    assert len(access) == 1, raw
    assert access[0]["path"] == DECODED_PATH  # lossless
    # The undecodable byte is written as text, never as a lone-surrogate escape (which strict
    # parsers such as serde_json or Go's refuse or mangle).
    assert access[0]["user_agent"] == "evil\u2028" + FORGED + "\x85\\udcff"
    assert not re.search(rb"(?<!\\)(?:\\\\)*\\ud[89a-f]", raw)  # an escape, not `\\\\ud..` text
    for record in records:
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # strictly valid Unicode


def test_ordinary_records_and_tracebacks_cannot_forge_lines() -> None:
    """Any record (not only access lines) with request-derived text: an upstream's error text,
    a path in an error message, an exception message in a traceback."""
    formatter = logs.TextFormatter()
    hostile = "bad\n" + FORGED + "\x1b]0;title\x07\u2029"
    try:
        raise ValueError(hostile)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.makeLogRecord(
        {
            "name": "app.proxy",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "upstream said: %s (path %s)",
            "args": (hostile, "/apps/demo/\r\n"),
            "exc_info": exc_info,
        }
    )
    out = formatter.format(record)
    lines = out.split("\n")
    assert RECORD_START.match(lines[0])
    assert lines[0].endswith(
        "upstream said: bad\\x0a"
        + FORGED
        + "\\x1b]0;title\\x07\\u2029 (path /apps/demo/\\x0d\\x0a)"
    )
    assert lines[1] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") and line.isprintable() for line in lines[1:])
    assert "  " + FORGED + "\\x1b]0;title\\x07\\u2029" in lines  # indented: not a record
    assert not any(RECORD_START.match(line) for line in lines[1:])


def test_escape_control_leaves_ordinary_text_alone() -> None:
    for text in ("GET /apps/demo/session 200", "café ☕ 😀 日本", ""):
        assert logs.escape_control(text) is text
    assert logs.escape_control("a\\b\tc\x00\x9b\ud800\U000e0001") == (
        "a\\\\b\\x09c\\x00\\x9b\\ud800\\U000e0001"
    )


def test_a_scoped_address_in_x_forwarded_for_is_never_the_client() -> None:
    """`ipaddress` accepts any text as an IPv6 zone (`fe80::1%a request_id=forged`): behind a
    trusted proxy such a hop would have been the access line's `client`, spaces and all."""
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    for hop in ("fe80::1%a request_id=forged-1", "fe80::1%eth0"):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (
            ("127.0.0.1", 50000) if key == "peername" else default
        )
        request = make_mocked_request(
            "GET", "/", headers={"X-Forwarded-For": f"198.51.100.7, {hop}"}, transport=transport
        )
        assert client_ip(request, trusted) == "127.0.0.1"
    request = make_mocked_request(
        "GET", "/", headers={"X-Forwarded-For": "198.51.100.7"}, transport=transport
    )
    assert client_ip(request, trusted) == "198.51.100.7"


def test_escape_control_fast_paths_agree_with_the_per_character_rule() -> None:
    """The ASCII and `isprintable` shortcuts escape exactly what the per-character rule does."""
    rng = random.Random(12)
    samples = [chr(c) for c in range(0x800)]  # ASCII, C1, Latin, the start of the BMP
    samples += [chr(c) for c in (0x2028, 0x2029, 0x202E, 0xFEFF, 0xD800, 0xDFFF, 0xE0001)]
    for _ in range(5000):
        samples.append(
            "".join(
                chr(rng.choice((rng.randrange(0x80), rng.randrange(0x110000))))
                for _ in range(rng.randrange(1, 12))
            )
        )
    for text in samples:
        expected = "".join(
            char
            if char.isprintable() and char != "\\"
            else "\\\\"
            if char == "\\"
            else f"\\x{ord(char):02x}"
            if ord(char) <= 0xFF
            else f"\\u{ord(char):04x}"
            if ord(char) <= 0xFFFF
            else f"\\U{ord(char):08x}"
            for char in text
        )
        assert logs.escape_control(text) == expected, repr(text)
