"""A long conversation costs the page what a short one does: bench/app_turns.py at 300 turns.

Turns 1-30 and 271-300 go through gradio_client as the page drives them (Send, then the streamed
one-token reply) and are measured; turns 31-270 are written into the same session's transcript
(served_app.fill_transcript), so that the test takes seconds: the conversation the app then serves
is 300 turns long either way. LCKV_LONG_RUN=1 sends all 300 through the API (a few minutes).

Before the chat view was bounded, over 300 API turns the part of a turn outside the engine went
0.21 -> 0.85 s and the largest update 13 -> 62 KB (the whole chat, every time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from served_app import fill_transcript, local_client, serve_in_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from app_turns import WINDOW, median_at, run_turns  # noqa: E402

TURNS = 300
MEASURED = 30  # API turns at each end
ALL_THROUGH_API = os.environ.get("LCKV_LONG_RUN") == "1"
# 40 messages of a few words and a latency plot of at most 200 points, with the panel: ~12 KB.
LARGEST_UPDATE = 20_000


@pytest.fixture(scope="module")
def served():
    with serve_in_process(model="tiny-random", window=WINDOW, idle_minutes=30) as server:
        yield server


def test_300_turns_cost_the_page_what_10_do(served):
    client = local_client(served.url)
    session = lambda: served.app.registry.peek(client.session_hash)  # noqa: E731  (made by the first turn)
    through_api = lambda turn: ALL_THROUGH_API or turn < MEASURED or turn >= TURNS - MEASURED  # noqa: E731
    costs = run_turns(client, TURNS, through_api=through_api, fill=lambda turn: fill_transcript(session(), 1, turn))
    assert session().message_count == 2 * TURNS and session().stats().turns == TURNS
    early, late = median_at(costs, MEASURED, span=20), median_at(costs, TURNS, span=20)
    print(f"\nturns 11-30 / 281-300: overhead {early['overhead_ms']:.0f} / {late['overhead_ms']:.0f} ms a turn, "
          f"engine {early['engine_ms']:.0f} / {late['engine_ms']:.0f} ms, largest update "
          f"{early['largest_message']:,.0f} / {late['largest_message']:,.0f} B, "
          f"{early['total_bytes']:,.0f} / {late['total_bytes']:,.0f} B a turn")
    assert late["overhead_ms"] <= 1.25 * early["overhead_ms"]
    assert max(cost.largest_message for cost in costs) <= LARGEST_UPDATE
