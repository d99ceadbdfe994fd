"""Distil the dense base model (teacher) into an LCKV student with the parallel iterative forward.

The student starts as an exact copy of the teacher with a new layer map. Trained: every attention
weight and norm, plus low-rank (LoRA) adapters on the MLPs; embeddings and MLP weights stay frozen,
so the result ships as a small delta on top of the base. Loss: KL(teacher || student) over the full
vocabulary at every position, plus (--hidden-weight) the squared distance between the two models'
final hidden states. A shared KV starts as its producer's projections, or (--kv-init average) as the
mean of those of every layer that reads it. --long-share of the steps read --long-len-token text
windows (the same tokens a step: fewer rows). Runs for at most --minutes, then checkpoints; run it
again to resume.

    python scripts/train_distill.py --warmup 1,1 --data /tmp/lckv-data --out /tmp/lckv-run/w2 \
        --export $OUT --minutes 9 --total-steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lckv_stream import LayerMap, lckv_map
from lckv_stream.base_model import GGUF_NAME, GGUF_SHA256, load_base
from lckv_stream.convert import average_shared_kv, convert_llama
from lckv_stream.delta import read_delta, save_delta

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Held-out windows (first, count) for choosing between maps, apart from the evaluation's (0-63).
SELECTION_WINDOWS = (100, 32)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B @ A * alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def trains_fully(name: str) -> bool:
    return ".self_attn." in name or "layernorm" in name or name == "model.norm.weight"


def build_student(base, layer_types: str, rank: int, alpha: float, passes: int, grad_passes: int,
                  kv_init: str = "own"):
    student = convert_llama(base, layer_types, forward_passes=passes, backward_passes=grad_passes)
    if kv_init == "average":
        average_shared_kv(student, base)
    student.requires_grad_(False)
    for name, param in student.named_parameters():
        param.requires_grad_(trains_fully(name))
    for layer in student.model.layers:
        for proj in MLP_PROJECTIONS:
            setattr(layer.mlp, proj, LoRALinear(getattr(layer.mlp, proj), rank, alpha))
    return student


def delta_tensors(student) -> dict[str, torch.Tensor]:
    """Trained tensors under the names the delta format uses (LoRA as <weight>.lora_A/B)."""
    tensors = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith((".lora_A", ".lora_B")):
            module, which = name.rsplit(".", 1)
            tensors[f"{module}.weight.{which}"] = param.detach().to(torch.bfloat16)
        else:
            tensors[name] = param.detach().to(torch.bfloat16)
    return tensors


def remapped_layers(old_types: str, new_types: str) -> set[int]:
    """Layers whose KV source differs between two maps."""
    old, new = LayerMap.parse(old_types).sources, LayerMap.parse(new_types).sources
    return {layer for layer, (a, b) in enumerate(zip(old, new)) if a != b}


def belongs_to_layers(name: str, layers: set[int]) -> bool:
    """The attention weights and input norm of one of `layers` (what a new KV source invalidates)."""
    return any(name.startswith((f"model.layers.{i}.self_attn.", f"model.layers.{i}.input_layernorm."))
               for i in layers)


@torch.no_grad()
def load_delta_into_student(student, folder: Path, keep_teacher: set[int] = frozenset()) -> None:
    """Trained weights from a delta folder; the layers in `keep_teacher` keep the teacher's attention."""
    params = dict(student.named_parameters())
    _, tensors = read_delta(folder, GGUF_SHA256)
    for name, tensor in tensors.items():
        if belongs_to_layers(name, keep_teacher):
            continue
        if name.endswith((".lora_A", ".lora_B")):
            weight, which = name.rsplit(".", 1)
            name = f"{weight[: -len('.weight')]}.{which}"
        params[name].copy_(tensor.to(params[name].dtype))


class Batches:
    """Random windows of the text stream, or whole sampled chats, as [batch, length] token ids."""

    def __init__(self, data: Path, seq_len: int, batch: int, chat_share: float, seed: int,
                 long_len: int = 0, long_share: float = 0.0) -> None:
        self.text = np.load(data / "train.npy", mmap_mode="r")
        chats = data / "chats.npy"
        self.chats = np.load(chats, mmap_mode="r") if chats.exists() and chat_share > 0 else None
        self.seq_len, self.batch, self.chat_share = seq_len, batch, chat_share
        self.long_len, self.long_share = long_len, long_share if long_len > seq_len else 0.0
        self.rng = np.random.default_rng(seed)

    def next(self, device: str) -> torch.Tensor:
        draw = self.rng.random()
        if self.chats is not None and draw < self.chat_share:
            rows = self.rng.integers(0, len(self.chats), self.batch)
            block = np.asarray(self.chats[np.sort(rows)], dtype=np.int64)
        elif draw >= 1 - self.long_share:  # long windows: as many tokens, fewer rows
            block = self._windows(self.long_len, max(1, self.batch * self.seq_len // self.long_len))
        else:
            block = self._windows(self.seq_len, self.batch)
        return torch.from_numpy(block).to(device, non_blocking=True)

    def _windows(self, length: int, rows: int) -> np.ndarray:
        starts = self.rng.integers(0, len(self.text) - length, rows)
        return np.stack([np.asarray(self.text[s : s + length], dtype=np.int64) for s in starts])


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: int = 2) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), computed a few rows at a time to save memory."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, student_logits.shape[0], rows):
        target = torch.log_softmax(teacher_logits[start : start + rows].float(), dim=-1)
        log_q = torch.log_softmax(student_logits[start : start + rows].float(), dim=-1)
        total = total + (target.exp() * (target - log_q)).sum(dim=-1).sum()
    return total / (student_logits.shape[0] * student_logits.shape[1])


def hidden_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the final hidden states, over the teacher's mean square (scale
    free: 1.0 is a student as far from the teacher as the teacher is from zero)."""
    teacher = teacher_hidden.float()
    return (student_hidden.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def heldout_perplexity(
    model, tokens: np.ndarray, length: int, windows: int, device: str, first: int = 0, **kwargs
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows first, first + 1, ... of the held-out stream."""
    model.eval()
    nll, count = 0.0, 0
    for w in range(first, min(first + windows, len(tokens) // length)):
        ids = torch.from_numpy(np.asarray(tokens[w * length : (w + 1) * length], dtype=np.int64)).to(device)[None]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(ids, **kwargs).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(nll / count)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer-types", help="explicit layer map; default: from --warmup")
    parser.add_argument("--warmup", default="1,1", help="bottom,top warmup layers of the LCKV map")
    parser.add_argument("--data", type=Path, default=Path("/tmp/lckv-data"))
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder (full state, resumable)")
    parser.add_argument("--export", type=Path, help="also write the delta here (bf16 shards)")
    parser.add_argument("--resume-delta", type=Path,
                        help="start from a delta folder (no optimizer state); with another layer map, the "
                             "re-mapped layers start from the teacher's attention and the schedule restarts")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--total-steps", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--forward-passes", type=int, default=7)
    parser.add_argument("--backward-passes", type=int, default=2)
    parser.add_argument("--chat-share", type=float, default=0.4)
    parser.add_argument("--long-len", type=int, default=0, help="tokens of a long text window (e.g. 8192)")
    parser.add_argument("--long-share", type=float, default=0.0, help="share of the steps on long windows")
    parser.add_argument("--kv-init", choices=("own", "average"), default="own",
                        help="a shared KV's projections at the start: its producer's, or the mean of its readers'")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="weight of the final hidden states' distance beside the KL")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--select-windows", type=int, default=SELECTION_WINDOWS[1],
                        help="held-out windows from 100 on for choosing between maps (fewer for a CPU smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = args.device

    base, _ = load_base("cpu")
    layers = base.config.num_hidden_layers
    bottom, top = (int(x) for x in args.warmup.split(","))
    layer_types = args.layer_types or lckv_map(layers, bottom, top)
    teacher = base.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval().requires_grad_(False)
    student = build_student(load_base("cpu")[0], layer_types, args.rank, 2.0 * args.rank,
                            args.forward_passes, args.backward_passes, args.kv_init).to(device)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95),
                                  fused=device == "cuda")
    state_path = args.out / "state.pt"
    step, tokens_seen, log, parent = 0, 0, [], None
    if state_path.exists():
        state = torch.load(state_path, map_location=device)
        student.load_state_dict(state["student"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, log, parent = state["step"], state["tokens"], state["log"], state.get("parent")
        print(f"resumed at step {step}", flush=True)
    elif args.resume_delta:
        previous = json.loads((args.resume_delta / "train_state.json").read_text())
        remapped = remapped_layers(previous["layer_types"], layer_types)
        load_delta_into_student(student, args.resume_delta, keep_teacher=remapped)
        if remapped:  # a new stage on top of the delta: its own schedule, the delta's record kept
            parent = previous
            print(f"started from {args.resume_delta}; layers {sorted(remapped)} re-mapped (teacher's attention)",
                  flush=True)
        else:
            step = previous["step"]
            print(f"resumed weights from {args.resume_delta} at step {step} (fresh optimizer)", flush=True)

    batches = Batches(args.data, args.seq_len, args.batch, args.chat_share, args.seed + step,
                      args.long_len, args.long_share)
    print(f"layer map {layer_types}: {len(set(map(int, layer_types.split('_'))))} KV layers; "
          f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable", flush=True)
    budget = args.minutes * 60
    step_times: list[float] = []
    student.train()
    while step < args.total_steps:
        tick = time.time()
        if tick - started + 2 * (max(step_times[-5:]) if step_times else 0) + 45 > budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.total_steps, args.lr, args.warmup_steps)
        ids = batches.next(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            teacher_hidden = teacher.model(ids).last_hidden_state
            teacher_logits = teacher.lm_head(teacher_hidden)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            student_hidden = student.model(ids, None)
            student_logits = student.lm_head(student_hidden)
        kl = kl_to_teacher(student_logits, teacher_logits)
        hidden = hidden_distance(student_hidden, teacher_hidden)  # logged whatever its weight
        loss = kl + args.hidden_weight * hidden
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += ids.numel()
        if device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.time() - tick)
        if step % 20 == 0 or step == 1:
            rate = ids.numel() / step_times[-1]
            print(f"step {step} kl {kl.item():.4f} hidden {hidden.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{rate:,.0f} tok/s ({ids.shape[0]} x {ids.shape[1]})", flush=True)
            log.append({"step": step, "kl": round(kl.item(), 5), "hidden": round(hidden.item(), 5),
                        "tokens": tokens_seen})

    heldout = np.load(args.data / "heldout.npy", mmap_mode="r")
    selection_first, selection_count = SELECTION_WINDOWS[0], args.select_windows
    result = {
        "layer_types": layer_types,
        "options": {"kv_init": args.kv_init, "hidden_weight": args.hidden_weight, "seq_len": args.seq_len,
                    "long_len": args.long_len, "long_share": args.long_share},
        "kv_layers": len(set(layer_types.split("_"))),
        "step": step,
        "tokens": tokens_seen,
        "teacher_ppl": heldout_perplexity(teacher, heldout, 1024, args.eval_windows, device),
        "student_ppl": heldout_perplexity(student, heldout, 1024, args.eval_windows, device),
        "select_ratio": heldout_perplexity(student, heldout, 1024, selection_count, device, first=selection_first)
        / heldout_perplexity(teacher, heldout, 1024, selection_count, device, first=selection_first),
        "minutes": (time.time() - started) / 60,
    }
    result["ratio"] = result["student_ppl"] / result["teacher_ppl"]
    if parent:
        result["parent"] = parent
        result["total_tokens"] = parent.get("total_tokens", parent["tokens"]) + tokens_seen
    print(json.dumps({k: v for k, v in result.items() if k != "parent"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"student": {k: v for k, v in student.state_dict().items() if "lora" in k or trains_fully(k)},
                "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens_seen, "log": log,
                "parent": parent}, state_path)
    if args.export:
        base_info = {"name": GGUF_NAME, "sha256": GGUF_SHA256}
        save_delta(args.export, student.config, delta_tensors(student), base_info,
                   lora={"rank": args.rank, "alpha": 2.0 * args.rank, "targets": list(MLP_PROJECTIONS)})
        (args.export / "train_state.json").write_text(json.dumps({**result, "log": log}, indent=1))


if __name__ == "__main__":
    main()
