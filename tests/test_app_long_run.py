"""500 turns through the real app (`python app.py`, default model, CPU) over its API: memory stays flat.

Each turn is what the page does (Send, then the streamed reply) with a short message and a 2-token
reply, so that the plot is skipped between its redraws as in any reply. A 96-token window fills
after a few turns: from turn 20 on the cache must not move at all, and the process may not grow 5%.
On 2 cores a turn takes about 0.7 s (the model reads the turn in ~0.2 s and writes a token in
~0.09 s; the rest is Gradio's two round trips), about 6 minutes in all: more than the default run
can spend, so it runs with LCKV_LONG_RUN=1. LCKV_LONG_RUN_TURNS changes the number of turns.
"""

from __future__ import annotations

import os
import time

import pytest

from app_support.chat_view import LATEST
from lckv_stream.base_model import cache_dir, cached_gguf
from served_app import local_client, serve_subprocess

TURNS = int(os.environ.get("LCKV_LONG_RUN_TURNS", "500"))
SETTLED = 20  # turns after which memory must not move
WINDOW = 96
MAX_NEW_TOKENS = 2
CHAT, STATUS, NUMBERS = 0, 1, 4  # in what /respond returns

pytestmark = [
    pytest.mark.skipif(os.environ.get("LCKV_LONG_RUN") != "1", reason="about 6 minutes: run with LCKV_LONG_RUN=1"),
    pytest.mark.skipif(
        cached_gguf() is None, reason=f"base model not cached in {cache_dir()}: run `python -m lckv_stream fetch-base`"
    ),
]


def test_500_turns_keep_cache_and_process_memory_flat(tmp_path):
    env = {"LCKV_MODEL": "default", "LCKV_WINDOW": str(WINDOW), "LCKV_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
           "HF_HUB_OFFLINE": "1"}
    with serve_subprocess(env, tmp_path / "app.log") as url:
        client = local_client(url)
        per_turn, started = [], time.monotonic()
        for turn in range(TURNS):
            client.predict(f"Hi {turn}", "", 4, WINDOW, None, api_name="/send")
            reply = client.submit(MAX_NEW_TOKENS, 0.7, 0.9, api_name="/respond").result(timeout=120)
            numbers = reply[NUMBERS]
            assert reply[STATUS].startswith("Done:"), f"turn {turn}: {reply[STATUS]}"
            assert numbers["last_turn"]["new_tokens"] >= 1 and numbers["turns"] == turn + 1
            per_turn.append(numbers)
        seconds = time.monotonic() - started
    # Nothing of the transcript is lost: every message, each with its reply; the page shows the latest.
    assert reply[NUMBERS]["messages"] == 2 * TURNS
    assert [m["role"] for m in reply[CHAT]] == ["user", "assistant"] * (LATEST // 2)
    assert [m["content"][0]["text"] for m in reply[CHAT][::2]] == [f"Hi {turn}" for turn in range(TURNS - LATEST // 2, TURNS)]
    settled = per_turn[SETTLED - 1]
    assert all(n["cache_mb"] == settled["cache_mb"] for n in per_turn[SETTLED:])
    last = per_turn[-1]
    assert last["tokens_held"] == last["sink"] + WINDOW < last["conversation_tokens"]
    growth = last["process_rss_mb"] / settled["process_rss_mb"] - 1
    peak = max(n["process_rss_mb"] for n in per_turn[SETTLED:])
    print(f"\n{TURNS} turns: cache {last['cache_mb']:.3f} MB from turn {SETTLED} on, dense {last['dense_cache_mb']:.1f} MB, "
          f"{last['conversation_tokens']:,} tokens; RSS {settled['process_rss_mb']:.0f} -> {last['process_rss_mb']:.0f} MB "
          f"({growth:+.2%}, peak {peak:.0f}); {seconds / TURNS:.2f} s a turn")
    assert growth < 0.05
