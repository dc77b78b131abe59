"""Typed values from the environment (`EnvReader`): a bad value is recorded as a problem that
names the variable and what to use, never raised, so `Settings.from_env` reports them all."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T", int, float)


class EnvReader:
    """Reads typed values from the environment, recording a problem instead of raising."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default).strip() or default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.env.get(name, default).strip() or default
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        self.problems.append(f"{name}={value!r} is not valid: use one of {', '.join(choices)}")
        return default

    def _number(
        self,
        name: str,
        default: T,
        convert: Callable[[str], T],
        valid: Callable[[T], bool],
        use: str,
    ) -> T:
        """`name` converted and checked; empty gives `default`; a bad value is recorded (the
        problem says what to `use`) and gives `default`."""
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = convert(raw)
        except ValueError:
            value = None
        if value is None or not valid(value):
            self.problems.append(f"{name}={raw!r} is not valid: use {use}")
            return default
        return value

    def positive_int(self, name: str, default: int, *, maximum: int | None = None) -> int:
        limit = f" no larger than {maximum}" if maximum is not None else ""
        return self._number(
            name,
            default,
            int,
            lambda v: v > 0 and (maximum is None or v <= maximum),
            f"a positive integer{limit}",
        )

    def non_negative_int(self, name: str, default: int) -> int:
        """A whole number of at least 0 (empty: `default`); 0 usually means "off"."""
        return self._number(name, default, int, lambda v: v >= 0, "0 (off) or a positive integer")

    def positive_float(self, name: str, default: float) -> float:
        return self._number(
            name, default, float, lambda v: 0 < v < math.inf, "a positive number of seconds"
        )
