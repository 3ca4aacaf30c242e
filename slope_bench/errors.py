"""Readable configuration errors: one line naming the key and what is allowed."""

from __future__ import annotations

from typing import Any

from slope_bench.sparsity import NM


class ConfigError(ValueError):
    """A bad configuration value.

    Example: ``ConfigError("w_bits", 9, "an integer in 1..8")`` prints as
    ``w_bits=9 is not allowed: expected an integer in 1..8``. The training entry point
    prefixes the config group (``method.w_bits``) before printing it.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.key}={self.value!r} is not allowed: expected {self.allowed}"

    def within(self, group: str) -> ConfigError:
        """The same error with its key qualified by ``group`` (``method.w_bits``)."""
        key = self.key if self.key.startswith(group + ".") else f"{group}.{self.key}"
        return ConfigError(key, self.value, self.allowed)


def check_bits(bits: Any, low: int = 1, high: int = 8, key: str = "w_bits") -> int:
    """An integer bit width in ``low..high``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(key, bits, f"an integer in {low}..{high}")
    return bits


def check_nm(n: Any, m: Any, order: str = "input") -> NM | None:
    """An :class:`NM` pattern, or ``None`` when both are ``None``."""
    if n is None and m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError("m", m, "an integer >= 1")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m:
        raise ConfigError("n", n, f"an integer in 1..m (m={m})")
    if order not in ("input", "channel_major"):
        raise ConfigError("nm_order", order, "one of input, channel_major")
    return NM(n, m, order)


def check_range(
    key: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A number within bounds (open or closed at each end)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(key, value, f"a number in {interval}")
    return float(value)


def check_choice(key: str, value: Any, choices: tuple | list) -> Any:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, choices)))
    return value


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) within ``low..high`` (either bound may be ``None``)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            allowed = f"an integer in {low}..{high}"
        elif low is not None:
            allowed = f"an integer >= {low}"
        elif high is not None:
            allowed = f"an integer <= {high}"
        else:
            allowed = "an integer"
        raise ConfigError(key, value, allowed)
    return value


def check_bool(key: str, value: Any) -> bool:
    """``true`` or ``false`` (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value
