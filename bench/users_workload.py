"""The many-users workload that bench_app_users.py (through the app) and engine_users.py (through the
engine alone) both run, so that their numbers compare."""

from __future__ import annotations

import argparse

SINK, WINDOW = 4, 1024  # every user's cache settings (the app's defaults)


def message(name: str, turn: int) -> str:
    """What user `name` says at `turn` (its name in it, to check for cross-talk)."""
    return f"I am {name}. Tell me something about the number {turn}."


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--users", nargs="+", type=int, default=[8])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
