"""One conversation of many turns through the app's API (gradio_client), as the page drives it: what a
turn costs outside the engine, and how many bytes an update carries, as the conversation grows.

    python bench/app_turns.py                        # 2,000 turns, tiny random model, served in-process
    python bench/app_turns.py --model default --turns 500

Each turn is Send, then the streamed reply (--max-new-tokens, 1 by default: the model's own time is
not what is measured). Per turn:
- wall: both round trips, as the client sees them;
- engine: the turn's time to first token plus its later tokens' latencies, as the app reports them
  (encoding the message, the checkpoints and decoding: the model's part);
- overhead: wall - engine, i.e. Gradio, the handlers, the views and the client;
- bytes: every server-sent message the client receives for the turn (the largest is "per update").
Each line is the median over the 10 turns up to the turn named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

WINDOW = 64
NUMBERS = 4  # the raw metrics in what /respond returns


@dataclass
class TurnCost:
    turn: int  # 1-based
    wall_ms: float
    engine_ms: float
    largest_message: int  # bytes of the largest server-sent message of the turn
    total_bytes: int  # bytes of all of them

    @property
    def overhead_ms(self) -> float:
        return self.wall_ms - self.engine_ms


@contextmanager
def counted_messages() -> Iterator[list[int]]:
    """Sizes of the server-sent messages gradio_client parses while in the block (it reads each
    one with `json.loads`), in bytes."""
    import gradio_client.client as client_module

    sizes: list[int] = []
    real = client_module.json

    class Counting:
        dumps = staticmethod(real.dumps)

        @staticmethod
        def loads(text, *args, **kwargs):
            sizes.append(len(text.encode() if isinstance(text, str) else text))
            return real.loads(text, *args, **kwargs)

    client_module.json = Counting
    try:
        yield sizes
    finally:
        client_module.json = real


def api_turn(client, turn: int, sizes: list[int], max_new_tokens: int) -> TurnCost:
    """Send + reply through the API; `sizes` is the counter of counted_messages()."""
    sizes.clear()
    started = time.perf_counter()
    client.predict(f"Hi {turn}", "", 4, WINDOW, None, api_name="/send")
    outputs = client.submit(max_new_tokens, 0.7, 0.9, api_name="/respond").result(timeout=300)
    wall = (time.perf_counter() - started) * 1e3
    last = outputs[NUMBERS]["last_turn"]
    engine = last["ttft_ms"] + last["decode_ms_per_token"] * max(0, last["new_tokens"] - 1)
    return TurnCost(turn + 1, wall, engine, max(sizes), sum(sizes))


def run_turns(client, turns: int, max_new_tokens: int = 1, through_api: Callable[[int], bool] = lambda t: True,
              fill: Callable[[int], None] | None = None, progress: Callable[[TurnCost], None] | None = None,
              ) -> list[TurnCost]:
    """`turns` turns of one conversation; those `through_api` rejects are made by `fill(turn)`
    instead (e.g. straight through the session, to reach a long conversation sooner). Returns
    the API turns' costs."""
    costs = []
    with counted_messages() as sizes:
        for turn in range(turns):
            if through_api(turn) or fill is None:
                costs.append(api_turn(client, turn, sizes, max_new_tokens))
                if progress:
                    progress(costs[-1])
            else:
                fill(turn)
    return costs


def median_at(costs: list[TurnCost], turn: int, span: int = 10) -> dict[str, float]:
    """Medians over the API turns in (turn - span, turn]."""
    window = [c for c in costs if turn - span < c.turn <= turn]
    return {name: statistics.median(getattr(c, name) for c in window)
            for name in ("wall_ms", "engine_ms", "overhead_ms", "largest_message", "total_bytes")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--at", default="10,500,1000,2000", help="turns to report (medians of the 10 before)")
    parser.add_argument("--json", type=Path, help="write every turn's numbers here")
    args = parser.parse_args()


    from served_app import local_client, serve_in_process

    marks = [int(at) for at in args.at.split(",") if int(at) <= args.turns]
    with serve_in_process(model=args.model, window=WINDOW, idle_minutes=600) as served:
        client = local_client(served.url)
        started = time.monotonic()

        def progress(cost: TurnCost) -> None:
            if cost.turn % 100 == 0:
                print(f"  turn {cost.turn}: {cost.wall_ms:.0f} ms ({time.monotonic() - started:.0f} s so far)",
                      file=sys.stderr, flush=True)

        costs = run_turns(client, args.turns, args.max_new_tokens, progress=progress)
    print(f"{args.turns} turns of one conversation through gradio_client, model {args.model}, "
          f"{args.max_new_tokens}-token replies, window {WINDOW}; medians of the 10 turns up to each:")
    print(f"{'turn':>6} {'wall ms':>9} {'engine ms':>10} {'overhead ms':>12} {'largest msg B':>14} {'bytes/turn':>11}")
    first = None
    for mark in marks:
        row = median_at(costs, mark)
        first = first or row
        print(f"{mark:>6} {row['wall_ms']:>9.0f} {row['engine_ms']:>10.0f} {row['overhead_ms']:>12.0f} "
              f"{row['largest_message']:>14,.0f} {row['total_bytes']:>11,.0f}")
    last = median_at(costs, marks[-1])
    print(f"overhead at turn {marks[-1]}: {last['overhead_ms'] / first['overhead_ms'] - 1:+.0%} of turn {marks[0]}'s; "
          f"largest message {last['largest_message'] / first['largest_message']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps([vars(c) for c in costs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
