"""`agent-bff-loadgen`'s command line: its options with their defaults in `--help`, the parsers
of their values, and the check that refuses a non-loopback target without `--allow-remote`."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from app.loadkit.recording import (
    DEFAULT_AGENT_PATH,
    DEFAULT_MIX,
    DEFAULT_STREAM_BODY,
    MIX_KINDS,
)
from app.loadkit.report import (
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_MIN_SAMPLES,
)

Number = TypeVar("Number", int, float)


class TargetRefused(ValueError):
    """The URL is not loopback and `--allow-remote` was not given (or it is malformed)."""


def check_target(url: str, *, allow_remote: bool) -> None:
    """Accept `http(s)://` URLs on 127.0.0.0/8, ::1 or `localhost` unless `allow_remote`.

    Host names other than `localhost` are refused without resolving them: nothing is sent
    anywhere before the target is known to be this machine.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"--url {url!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise TargetRefused(f"--url {url!r} must not carry a query or fragment")
    if allow_remote:
        return
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost"):
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TargetRefused(
            f"--url {url!r} is not a loopback address (127.0.0.0/8, ::1, localhost); "
            "load only machines you own: add --allow-remote to proceed"
        )


def _number(convert: Callable[[str], Number], text: str) -> Number:
    """`text` as a number, or -1 (refused by every caller) when it is not one."""
    try:
        return convert(text)
    except ValueError:
        return convert("-1")


def parse_mix(text: str) -> dict[str, float]:
    """`read=60,write=20,stream=20` -> weights; kinds left out get 0."""
    mix = dict.fromkeys(MIX_KINDS, 0.0)
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in mix:
            raise argparse.ArgumentTypeError(
                f"mix entry {item!r}: use kind=weight with kind in {', '.join(MIX_KINDS)}"
            )
        weight = _number(float, value)
        if weight < 0:
            raise argparse.ArgumentTypeError(f"mix weight {value!r} must be a number >= 0")
        mix[name] = weight
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix needs at least one positive weight")
    return mix


def parse_rate(text: str) -> float | None:
    """`0.01` or `1%` -> 0.01; `none` (or `off`) -> None (not checked)."""
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a fraction (0.01) or a percentage (1%)"
        ) from err
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 0 and 1 (0% and 100%)")
    return value


def parse_limit(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use a count >= 0, or 'none'")
    return value


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return check


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        if isinstance(default, dict):
            return text + " (default: " + ",".join(f"{k}={v:g}" for k, v in default.items()) + ")"
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        description=(
            "Session-aware load generator for agent-bff: virtual users with their own cookies "
            "create, read and write sessions and run streamed agent requests."
        ),
        epilog="Exit codes: 0 passed, 1 threshold violated, 2 usage, 3 target unreachable.",
    )
    target = p.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8080", help="gateway or LB base URL")
    target.add_argument("--app", default="demo", help="application id")
    target.add_argument(
        "--allow-remote", action="store_true", help="allow a URL that is not loopback"
    )
    target.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable), e.g. an Origin",
    )
    load = p.add_argument_group("load shape")
    load.add_argument("-c", "--concurrency", type=positive(int), default=10, help="virtual users")
    load.add_argument("-d", "--duration", type=positive(float), default=10.0, help="seconds")
    load.add_argument("--ramp-up", type=non_negative, default=0.0, help="seconds to start all")
    load.add_argument("-n", "--requests", type=positive(int), default=None, help="request cap")
    load.add_argument(
        "--mix",
        type=parse_mix,
        default=dict(DEFAULT_MIX),
        help="weights of read, write, stream, resume (resume: a resumable run cut at a random "
        "event and resumed with Last-Event-ID; lost/duplicated events fail the run)",
    )
    load.add_argument("--think-ms", type=non_negative, default=0.0, help="pause between requests")
    load.add_argument("--payload-bytes", type=int, default=64, help="bytes each user stores")
    load.add_argument("--seed", type=int, default=None, help="seed for the request mix")
    stream = p.add_argument_group("streams")
    stream.add_argument(
        "--agent-path",
        default=DEFAULT_AGENT_PATH,
        help="path under /apps/<app>/agent/ (the built-in demo agent and the stub answer chat)",
    )
    stream.add_argument(
        "--stream-body", default=DEFAULT_STREAM_BODY, help="JSON body of each agent request"
    )
    stream.add_argument(
        "--end-event",
        default="done",
        help="SSE event type that ends a complete stream ('' = a clean end is complete)",
    )
    timing = p.add_argument_group("timeouts")
    timing.add_argument("--timeout", type=positive(float), default=10.0, help="per request (s)")
    timing.add_argument(
        "--stream-idle-timeout", type=positive(float), default=30.0, help="silence in a stream"
    )
    timing.add_argument(
        "--grace", type=non_negative, default=5.0, help="after --duration, for in-flight requests"
    )
    timing.add_argument(
        "--no-verify", action="store_true", help="skip each user's final session check"
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="JSON report to PATH, or stdout without PATH (summary then goes to stderr)",
    )
    out.add_argument("--html", default=None, metavar="PATH", help="HTML report with plots")
    progress = out.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None, help="progress line")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    out.add_argument("-q", "--quiet", action="store_true", help="no human summary")
    limits = p.add_argument_group("thresholds (violations exit 1)")
    limits.add_argument(
        "--max-p99-ms",
        type=positive(float),
        default=None,
        help="p99 of create, read and write (each kind with at least --min-samples samples)",
    )
    limits.add_argument(
        "--max-ttfe-p99-ms",
        type=positive(float),
        default=None,
        help="p99 time to first event of streams (with at least --min-samples samples)",
    )
    limits.add_argument(
        "--min-samples",
        type=positive(int),
        default=DEFAULT_MIN_SAMPLES,
        help="a percentile threshold is checked only on this many samples or more; fewer are "
        "reported as 'not enough samples' (a p99 of 50 samples is their maximum)",
    )
    limits.add_argument(
        "--max-error-rate",
        type=parse_rate,
        default=f"{DEFAULT_MAX_ERROR_RATE:.0%}",
        help="errors / requests, as 0.01 or 1%%; 'none' disables",
    )
    limits.add_argument(
        "--max-lost-sessions",
        type=parse_limit,
        default=0,
        help="lost + stale sessions; 'none' disables",
    )
    return p


def parse_headers(values: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name.strip() or any(c in value for c in "\r\n"):
            parser.error(f"--header {value!r}: use 'Name: value'")
        headers[name.strip()] = rest.strip()
    return headers
