"""The metrics panel: numbers read from the session and the engine's metrics, then formatted.

Nothing here is measured or derived: `read_metrics` copies what the engine reports (unit changes
only), and the other functions format that copy.
"""

from __future__ import annotations

import pandas as pd
import torch

from lckv_stream.chat import ChatSession
from lckv_stream.engine import EngineStats
from lckv_stream.metrics import device_name, gpu_memory_mb, process_rss_mb

MB = 2**20
PLOT_COLUMNS = ("token", "latency_ms")
PLOT_POINTS = 200  # the latency plot's points at most: past that many tokens, each is a run's mean


def read_metrics(session: ChatSession, device: torch.device, sessions_open: int, engine: EngineStats) -> dict:
    """A JSON-ready copy of the session's and the engine's numbers; `last_turn` is the latest finished turn."""
    stats = session.stats()
    latest = session.metrics.token_ms[-1][1] if session.metrics.token_ms else None
    turn = session.metrics.last_turn
    return {
        "device": device_name(device),
        "decoder": stats.decoder,
        "turns": stats.turns,
        "messages": session.message_count,
        "tokens_held": stats.cache.tokens_held,
        "conversation_tokens": stats.conversation_tokens,
        "sink": stats.cache.sink,
        "sink_setting": stats.sink_setting,
        "pinned_tokens": stats.pinned_tokens,
        "window": stats.cache.window,
        "seed": stats.seed,
        "cache_mb": stats.cache.allocated_mb,
        "cache_used_mb": stats.cache.used_mb,
        "dense_cache_mb": stats.dense_bytes / MB,
        "kv_layers": stats.cache.kv_layers,
        "total_layers": stats.cache.total_layers,
        "latest_token_ms": latest,
        "tokens_generated": session.metrics.tokens_generated,
        "last_turn": None if turn is None else {
            "prompt_tokens": turn.prompt_tokens,
            "prefill_ms": turn.prefill_ms,
            "ttft_ms": turn.ttft_ms,
            "new_tokens": turn.new_tokens,
            "decode_ms_per_token": turn.decode_ms_per_token,
            "tokens_per_s": turn.tokens_per_s,
            "stop_reason": turn.stop_reason,
        },
        "gpu_memory_mb": gpu_memory_mb(device),
        "process_rss_mb": process_rss_mb(),
        "sessions_open": sessions_open,
        "cache_residence": stats.residence,
        "engine": {
            "generating": engine.generating,
            "reading": engine.reading,
            "waiting": engine.waiting,
            "rows_on_device": engine.rows_on_device,
            "rows_on_host": engine.rows_on_host,
            "rows_dropped": engine.rows_lost,
            "buckets": engine.buckets,
            "compiling": engine.compiling,
        },
    }


def metrics_markdown(metrics: dict) -> str:
    """The panel as a Markdown table: this conversation's numbers, then the server's (all users)."""
    turn = metrics["last_turn"]
    gpu = metrics["gpu_memory_mb"]
    rows = [
        ("**This conversation**", ""),
        ("Device", f"{metrics['device']} · {metrics['decoder']} decoder"),
        ("Time to first token (last turn)", "–" if turn is None else f"{turn['ttft_ms']:,.0f} ms"),
        ("Speed (last turn)", "–" if turn is None else
            f"{turn['tokens_per_s']:.1f} tokens/s ({turn['decode_ms_per_token']:.1f} ms/token)"),
        ("Latest token", "–" if metrics["latest_token_ms"] is None else f"{metrics['latest_token_ms']:.1f} ms"),
        ("Tokens in cache / in conversation",
            f"{metrics['tokens_held']:,} / {metrics['conversation_tokens']:,} ({_cache_size(metrics)})"),
        ("KV cache memory",
            f"**{metrics['cache_mb']:.2f} MB**, allocated once and fixed; {metrics['cache_used_mb']:.2f} MB of it"
            f" in use ({metrics['kv_layers']} of {metrics['total_layers']} layers store KV)"),
        ("Dense Llama cache, same conversation", f"{metrics['dense_cache_mb']:.2f} MB, grows with it"),
        ("Turns · random seed", f"{metrics['turns']:,} · "
            + ("its own, drawn at random" if metrics["seed"] is None else f"fixed at {metrics['seed']}")),
        ("**Server (all users)**", ""),
        ("GPU memory allocated", "CPU (no GPU)" if gpu is None else
            f"{gpu['allocated']:,.0f} MB (reserved {gpu['reserved']:,.0f}, peak {gpu['peak']:,.0f})"),
        ("Process memory (RSS)", f"{metrics['process_rss_mb']:,.0f} MB for {metrics['sessions_open']} open "
            f"session{'s' if metrics['sessions_open'] != 1 else ''} and the model"),
        ("Engine", _engine_line(metrics["engine"])),
    ]
    lines = ["| Metric | Value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _cache_size(metrics: dict) -> str:
    size = f"sink {metrics['sink']} + window {metrics['window']}"
    if metrics["sink"] > metrics["sink_setting"]:
        size += (f"; sink set to {metrics['sink_setting']}, raised to the {metrics['pinned_tokens']} tokens"
                 " of the pinned start: system prompt and chat template header")
    return size


def _engine_line(engine: dict) -> str:
    rows = sum(bucket["rows"] for bucket in engine["buckets"])
    line = (f"{engine['generating']} replies decoded together, {engine['reading']} reading; "
            f"{engine['rows_on_device']} of {rows} cache rows on the device, {engine['rows_on_host']} in host memory")
    if engine["compiling"]:
        line += f"; compiling {engine['compiling']} step(s) on the side"
    return line


def latency_frame(session: ChatSession) -> pd.DataFrame:
    """Per-token latency over the whole conversation: (global token number, ms), PLOT_POINTS at most.

    Typed even when empty: the page picks the axes' scales from the first frame it gets.
    """
    frame = pd.DataFrame(session.metrics.latency_series(PLOT_POINTS), columns=list(PLOT_COLUMNS))
    return frame.astype({PLOT_COLUMNS[0]: "int64", PLOT_COLUMNS[1]: "float64"})
