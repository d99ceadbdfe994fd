"""The range and default of every user-facing setting, in one place: the page's controls, the CLI's
flags, `SamplingSettings` and `CacheSettings` read them from here, so the page and the terminal
accept the same values.

Imports nothing heavy: the CLI checks its flags with `check` before torch and transformers load.
"""

from __future__ import annotations

import math

# (low, high), inclusive.
LIMITS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 1000),
    "repetition_penalty": (1.0, 2.0),
    "max_new_tokens": (1, 4096),
    # The library's CacheSettings takes any window up to 1M tokens; a person chooses from these.
    "sink": (0, 64),
    "window": (16, 8192),
    "seed": (0, 2**63 - 1),
}
DEFAULTS: dict[str, float] = {
    "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "max_new_tokens": 512,
    "sink": 4, "window": 1024,
}
WHOLE = frozenset({"top_k", "max_new_tokens", "sink", "window", "seed"})


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown(value: object, limit: int = 40) -> str:
    """`value` for an error message: repr (which escapes lone surrogates and control characters), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check(name: str, value: object, limits: tuple[float, float] | None = None, whole: bool | None = None) -> int | float:
    """`value` as setting `name` takes it (an int for whole-number settings).

    Raises ValueError naming the setting, its range and the value given: for a value that is not a
    number (a string, None, a bool), not whole where it must be, not finite or out of range.
    `limits` and `whole` default to the setting's entry in LIMITS and WHOLE.
    """
    low, high = LIMITS[name] if limits is None else limits
    whole = name in WHOLE if whole is None else whole
    span = f"between {_bound(low)} and {_bound(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {'a whole number' if whole else 'a number'} {span}, got {shown(value)}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be {span}, got {shown(value)}")
    if whole:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {shown(value)}")
        return int(value)
    return value


def parse(name: str, text: str) -> int | float:
    """A command-line value for setting `name` (argparse `type=`): ValueError saying what is accepted."""
    try:
        number = int(text) if name in WHOLE else float(text)
    except ValueError:
        number = text  # check() says what was expected
    return check(name, number)
