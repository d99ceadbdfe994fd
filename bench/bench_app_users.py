"""Many users at once through the real app: aggregate tokens/s with N users against one alone.

Starts `python app.py` (the model of --model) and drives it with gradio_client, as browsers do:
each user has its own client (its own conversation), connected before the clock starts (a page
already open), and sends --turns messages, each answered with
--max-new-tokens tokens at temperature 0.7. Runs with 1 user and with each of --users, interleaved
--repeats times (this machine is shared: the ratio is taken between runs made in the same minutes),
and checks that no user's conversation holds another user's words.

    python bench/bench_app_users.py --model default --users 8 --out bench/results/app_users
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gradio_client import Client  # noqa: E402

from bench.users_workload import SINK, WINDOW, add_workload_arguments, message  # noqa: E402
from served_app import local_client, serve_subprocess  # noqa: E402

STATUS, NUMBERS = 1, 4  # the status line and the raw metrics among the reply events' outputs


def text_of(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def user(client: Client, name: str, turns: int, max_new_tokens: int, out: dict,
         start: threading.Barrier | None = None) -> None:
    """One user's conversation: `turns` messages, each naming the user (to check for cross-talk)."""
    if start is not None:
        start.wait()
    tokens, timeline = 0, []
    for turn in range(turns):
        began = time.perf_counter()
        sent = client.predict(message(name, turn), "", SINK, WINDOW, None,
                              api_name="/send")
        assert not sent[STATUS].startswith("⚠️"), sent[STATUS]
        accepted = time.perf_counter()
        job = client.submit(max_new_tokens, 0.7, 0.9, api_name="/respond")
        job.result(timeout=600)
        final = job.outputs()[-1]
        last = final[NUMBERS]["last_turn"]
        tokens += last["new_tokens"]
        chat = final[0]
        # Where a turn's time went: the Send call, then the reply call (the server's own
        # prefill, first token and decode times beside them).
        timeline.append({"send_ms": (accepted - began) * 1e3, "reply_ms": (time.perf_counter() - accepted) * 1e3,
                         **{key: last[key] for key in ("prompt_tokens", "prefill_ms", "ttft_ms", "decode_ms_per_token")}})
    out.update(tokens=tokens, chat=chat, ended=time.perf_counter(), numbers=final[NUMBERS], timeline=timeline)


def run(url: str, users: int, turns: int, max_new_tokens: int, tag: str) -> dict:
    """`users` users with the page open (their clients connected first, as browsers that loaded it)
    send their first message at once; timed from then to the last reply's end."""
    results = [dict() for _ in range(users)]
    names = [f"user-{tag}-{i}" for i in range(users)]
    clients = [local_client(url) for _ in range(users)]
    start = threading.Barrier(users + 1)
    threads = [threading.Thread(target=user, args=(clients[i], names[i], turns, max_new_tokens, results[i], start))
               for i in range(users)]
    [t.start() for t in threads]
    start.wait()
    began = time.perf_counter()
    [t.join() for t in threads]
    wall = max(r["ended"] for r in results) - began
    for client in clients:
        client.close()
    for name, result in zip(names, results):
        said = " ".join(text_of(message) for message in result["chat"] if message.get("role") == "user")
        others = [other for other in names if other != name and other in said]
        assert name in said and not others, f"{name}'s conversation holds {others}"
    tokens = sum(r["tokens"] for r in results)
    turns_seen = [turn for r in results for turn in r["timeline"]]
    phases = {key: statistics.median(turn[key] or 0.0 for turn in turns_seen) for key in turns_seen[0]}
    server = max((r["numbers"] for r in results), key=lambda numbers: numbers["sessions_open"])
    return {"users": users, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "server": {key: server[key] for key in ("sessions_open", "engine", "process_rss_mb")},
            "steps": sorted({r["numbers"]["decoder"] for r in results}), "turn_medians": phases,
            "timelines": [r["timeline"] for r in results]}


def warm_up(url: str, timeout_s: float) -> float:
    """Short turns until the app's engine has no step compiling on the side (a compile competes with
    the decoding for the same cores); returns the seconds waited."""
    began = time.perf_counter()
    while True:
        out: dict = {}
        client = local_client(url)
        user(client, "warm", 1, 8, out)
        client.close()
        compiling = out["numbers"]["engine"]["compiling"]
        if not compiling or time.perf_counter() - began > timeout_s:
            return time.perf_counter() - began
        time.sleep(5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--compile-timeout", type=float, default=900,
                        help="seconds to wait for the engine's steps to compile before measuring")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "app.log"
    rows = []
    with serve_subprocess({"LCKV_MODEL": args.model, "LCKV_MAX_GENERATIONS": str(max(args.users))}, log, 600) as url:
        waited = warm_up(url, args.compile_timeout)  # caches, buckets, compiled steps
        print(f"warm after {waited:.0f} s", flush=True)
        for repeat in range(args.repeats):
            for users in [1, *args.users]:
                rows.append(run(url, users, args.turns, args.max_new_tokens, f"{repeat}"))
                phases = ", ".join(f"{key} {value:.0f}" for key, value in rows[-1]["turn_medians"].items())
                server = rows[-1]["server"]
                print(f"  {users} user(s): {rows[-1]['tokens_per_s']:.1f} tokens/s ({'; '.join(rows[-1]['steps'])}); "
                      f"a turn's medians: {phases}; server: {server['sessions_open']} sessions open, "
                      f"rows on the device {server['engine']['rows_on_device']}, on the host "
                      f"{server['engine']['rows_on_host']}, {server['process_rss_mb']:.0f} MB", flush=True)
    alone = statistics.median(r["tokens_per_s"] for r in rows if r["users"] == 1)
    print(f"\nModel {args.model}; {args.turns} turns of {args.max_new_tokens} new tokens per user; "
          f"medians of {args.repeats} interleaved runs")
    print("| users at once | aggregate tokens/s | per user tokens/s | vs one user |")
    print("|---|---|---|---|")
    summary = []
    for users in [1, *args.users]:
        speed = statistics.median(r["tokens_per_s"] for r in rows if r["users"] == users)
        summary.append({"users": users, "tokens_per_s": speed, "ratio": speed / alone})
        print(f"| {users} | {speed:.1f} | {speed / users:.1f} | {speed / alone:.2f}x |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "app_users.json").write_text(json.dumps({"model": args.model, "runs": rows, "summary": summary},
                                                            indent=1))


if __name__ == "__main__":
    main()
