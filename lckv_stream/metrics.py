"""Timing and memory measurements read by the CLI and the UI (never recomputed there)."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch


def device_name(device: torch.device) -> str:
    """Human name of the device the model runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (no GPU)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory_mb(device: torch.device) -> dict[str, float] | None:
    """Allocated / reserved / peak GPU memory of this process in MB; None on CPU."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.memory_allocated(device) / 2**20,
        "reserved": torch.cuda.memory_reserved(device) / 2**20,
        "peak": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def process_rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class Stopwatch:
    """Host timer; `lap()` returns ms since the last lap. Callers synchronize the device first."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = (now - self._last) * 1e3, now
        return elapsed


@dataclass
class TurnMetrics:
    """One assistant turn: prompt encoding, time to first token and per-token latencies."""

    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    token_ms: list[float] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def new_tokens(self) -> int:
        return len(self.token_ms)

    @property
    def decode_ms_per_token(self) -> float:
        """Mean latency of tokens after the first (the first includes the prompt encoding)."""
        rest = self.token_ms[1:]
        return sum(rest) / len(rest) if rest else 0.0

    @property
    def tokens_per_s(self) -> float:
        rest = self.token_ms[1:]
        return 1e3 * len(rest) / sum(rest) if rest and sum(rest) > 0 else 0.0


@dataclass
class ConversationMetrics:
    """Latency history over the whole conversation (bounded), for plots across turns."""

    history_limit: int = 20000
    token_ms: deque = field(default_factory=deque)
    turns: list[TurnMetrics] = field(default_factory=list)
    tokens_generated: int = 0

    def record_token(self, latency_ms: float) -> None:
        self.tokens_generated += 1
        self.token_ms.append((self.tokens_generated, latency_ms))
        while len(self.token_ms) > self.history_limit:
            self.token_ms.popleft()

    def record_turn(self, turn: TurnMetrics) -> None:
        self.turns.append(turn)
        del self.turns[: -self.history_limit]

    def latency_series(self, max_points: int) -> list[tuple[int, float]]:
        """(token number, ms) over the whole history in at most `max_points` points: every token
        while they fit, else the mean of equal runs of consecutive tokens (each at its last token),
        so a plot of a long conversation costs the same to send as a short one."""
        points = list(self.token_ms)
        if len(points) <= max_points:
            return points
        run = -(-len(points) // max_points)
        return [(chunk[-1][0], sum(ms for _, ms in chunk) / len(chunk))
                for chunk in (points[i : i + run] for i in range(0, len(points), run))]

    @property
    def last_turn(self) -> TurnMetrics | None:
        return self.turns[-1] if self.turns else None
