"""Held-out perplexity of the dense teacher and the default student on English of several genres.

Reads the evaluation set of `scripts/prepare_genre_data.py` (data/broad_eval/: fiction, nonfiction,
conversation, technical, and the model card's debian-handbook split). Each genre's documents are
encoded as the training data is (the text, then <|endoftext|>) and cut into non-overlapping windows;
teacher and student score the same windows, each window from scratch. Reports per genre the
perplexity of both, their ratio, the per-window ratios, and on how many windows the student is worse.
On the CPU, teacher and student run side by side in two processes (bench/model_pair.py). Writes JSON
and prints a table.

    python bench/eval_broad.py --out bench/results/broad     # CPU, float32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from genre_sources import read_xz_docs  # noqa: E402
from model_pair import for_both  # noqa: E402
from tokenize_corpora import encode_documents  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GENRES = ["fiction", "nonfiction", "conversation", "technical", "debian-handbook"]


def genre_windows(tokenizer, docs: list[str], length: int, count: int) -> torch.Tensor:
    """The first `count` non-overlapping windows [count, length] of the documents' token stream, encoded
    as tokenize_corpora.py encodes held-out text (each document, then <|endoftext|>)."""
    ids = encode_documents(tokenizer, docs, chat_share=0.0, seed=0)
    available = len(ids) // length
    if available < count:
        raise ValueError(f"{len(ids)} tokens make {available} windows of {length}, {count} asked")
    return torch.from_numpy(ids[: count * length].astype("int64")).view(count, length)


@torch.inference_mode()
def window_nll(model, window: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one window (length - 1 predictions)."""
    logits = model(window.unsqueeze(0).to(model.device)).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, window[1:].to(model.device), reduction="sum").item()


def score_genres(model, tokenizer, data: Path, plan: dict[str, int], length: int) -> dict[str, dict]:
    """Per genre: the summed NLL of each of its first plan[genre] windows, and the seconds it took."""
    kv_layers = len(set(model.config.layer_types.split("_")))
    out = {}
    for genre, count in plan.items():
        start, cpu = time.time(), time.process_time()
        windows = genre_windows(tokenizer, read_xz_docs(data / f"{genre}.txt.xz"), length, count)
        out[genre] = {"nll": [window_nll(model, w) for w in windows], "seconds": round(time.time() - start, 1),
                      "cpu_seconds": round(time.process_time() - cpu, 1)}
        print(f"  model with {kv_layers} KV layers: {genre} done in {out[genre]['seconds']:.0f}s", flush=True)
    return out


def summarize(teacher: list[float], student: list[float], predictions: int) -> dict:
    """Perplexities over all windows, their ratio, and the per-window picture."""
    ratios = [math.exp((s - t) / predictions) for t, s in zip(teacher, student)]
    teacher_ppl = math.exp(sum(teacher) / (predictions * len(teacher)))
    student_ppl = math.exp(sum(student) / (predictions * len(student)))
    return {
        "teacher_ppl": teacher_ppl,
        "student_ppl": student_ppl,
        "ratio": student_ppl / teacher_ppl,
        "windows": len(teacher),
        "windows_student_worse": sum(s > t for t, s in zip(teacher, student)),
        "window_ratio_min": min(ratios),
        "window_ratio_median": statistics.median(ratios),
        "window_ratio_max": max(ratios),
        "per_window": [{"teacher_ppl": math.exp(t / predictions), "student_ppl": math.exp(s / predictions)}
                       for t, s in zip(teacher, student)],
    }


def table(results: dict) -> str:
    lines = ["| genre | windows x tokens | teacher ppl | student ppl | ratio | student worse | window ratio min / median / max |",
             "|---|---|---|---|---|---|---|"]
    for genre, r in results["genres"].items():
        lines.append(f"| {genre} | {r['windows']} x {results['window']} | {r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} | "
                     f"{r['ratio']:.3f} | {r['windows_student_worse']} of {r['windows']} | "
                     f"{r['window_ratio_min']:.3f} / {r['window_ratio_median']:.3f} / {r['window_ratio_max']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data/broad_eval")
    parser.add_argument("--genres", nargs="+", default=GENRES)
    parser.add_argument("--windows", type=int, default=40, help="windows per genre (40 x 1,024 = 40,960 tokens)")
    parser.add_argument("--handbook-windows", type=int, default=64, help="debian-handbook windows (the card's 0-63)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--student", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", choices=["yes", "no"],
                        help="teacher and student in two 1-thread processes (default on the CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    began = time.time()
    plan = {g: args.handbook_windows if g == "debian-handbook" else args.windows for g in args.genres}
    scores = for_both(score_genres, args.data, plan, args.window, student=args.student, device=args.device,
                      parallel=None if args.parallel is None else args.parallel == "yes")
    results = {"student": args.student, "teacher": "SmolLM2-135M-Instruct, dense (identity layer map)",
               "device": args.device, "dtype": "float32" if args.device == "cpu" else "bfloat16",
               "window": args.window, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "genres": {}}
    for genre in args.genres:
        teacher, student = scores["teacher"][genre], scores["student"][genre]
        results["genres"][genre] = {**summarize(teacher["nll"], student["nll"], args.window - 1),
                                    "seconds": {"teacher": teacher["seconds"], "student": student["seconds"]},
                                    "cpu_seconds": {"teacher": teacher["cpu_seconds"], "student": student["cpu_seconds"]}}
    results["seconds"] = round(time.time() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "eval_broad.json"
    try:
        results["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    saved.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"total {results['seconds'] / 60:.1f} min; {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
