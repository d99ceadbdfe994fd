"""The distillation script's pieces that run without the base model: batches and the hidden-state term."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from train_distill import Batches, hidden_distance  # noqa: E402


def test_long_windows_take_the_tokens_of_a_step_in_fewer_rows(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(10_000, dtype=np.int32))
    shapes = set()
    batches = Batches(tmp_path, seq_len=16, batch=4, chat_share=0.0, seed=0, long_len=64, long_share=0.5)
    for _ in range(40):
        ids = batches.next("cpu")
        shapes.add(tuple(ids.shape))
        assert bool((ids[:, 1:] - ids[:, :-1] == 1).all())  # each row one window of the stream
    assert shapes == {(4, 16), (1, 64)}
    only_short = Batches(tmp_path, seq_len=16, batch=4, chat_share=0.0, seed=0)
    assert {tuple(only_short.next("cpu").shape) for _ in range(20)} == {(4, 16)}


def test_the_hidden_state_term_is_zero_at_the_teacher_and_scale_free():
    teacher = torch.randn(2, 5, 8)
    assert hidden_distance(teacher, teacher).item() == 0.0
    assert abs(hidden_distance(torch.zeros_like(teacher), teacher).item() - 1.0) < 1e-6
    near, far = teacher + 0.1 * torch.randn_like(teacher), teacher + torch.randn_like(teacher)
    assert 0 < hidden_distance(near, teacher) < hidden_distance(far, teacher)
    assert abs(hidden_distance(10 * near, 10 * teacher).item() - hidden_distance(near, teacher).item()) < 1e-5
