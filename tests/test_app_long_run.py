"""500 turns through the real app (`python app.py`, default model, CPU) over its API: memory stays flat.

Short messages, 6 new tokens and a 96-token window; it still takes about 12 minutes on 2 cores, so it
runs only with LCKV_LONG_RUN=1. LCKV_LONG_RUN_TURNS changes the number of turns (default 500).
"""

from __future__ import annotations

import os

import pytest
from gradio_client import Client

from served_app import serve_subprocess

TURNS = int(os.environ.get("LCKV_LONG_RUN_TURNS", "500"))
SETTLED = 20  # turns after which memory must not move
WINDOW = 96
MAX_NEW_TOKENS = 6


@pytest.mark.skipif(os.environ.get("LCKV_LONG_RUN") != "1", reason="long run (~12 min): set LCKV_LONG_RUN=1")
def test_500_turns_keep_cache_and_process_memory_flat(tmp_path):
    env = {"LCKV_MODEL": "default", "LCKV_WINDOW": str(WINDOW), "LCKV_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}
    with serve_subprocess(env, tmp_path / "app.log") as url:
        client = Client(url, verbose=False)
        per_turn = []
        for turn in range(TURNS):
            client.predict(f"Question {turn}: name a color.", [], "", 4, WINDOW, api_name="/send")
            chat, _, status, _, _, numbers = client.submit(MAX_NEW_TOKENS, 0.7, 0.9, api_name="/respond").result(
                timeout=120
            )
            assert status.startswith("Done:"), f"turn {turn}: {status}"
            assert numbers["last_turn"]["new_tokens"] >= 1 and numbers["turns"] == turn + 1
            per_turn.append(numbers)
    assert len(chat) == 2 * TURNS
    settled = per_turn[SETTLED - 1]
    assert all(n["cache_mb"] == settled["cache_mb"] for n in per_turn[SETTLED:])
    last = per_turn[-1]
    assert last["tokens_held"] == last["sink"] + WINDOW < last["conversation_tokens"]
    growth = last["process_rss_mb"] / settled["process_rss_mb"] - 1
    print(f"\n{TURNS} turns: cache {last['cache_mb']:.3f} MB, dense {last['dense_cache_mb']:.1f} MB, "
          f"RSS {settled['process_rss_mb']:.0f} -> {last['process_rss_mb']:.0f} MB ({growth:+.2%})")
    assert growth < 0.05
