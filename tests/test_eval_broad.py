"""The broad evaluation's windows and summaries, against hand-computed values and a tiny model."""

import math
import sys
from pathlib import Path

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from eval_broad import genre_windows, summarize, window_nll  # noqa: E402


def test_windows_follow_the_token_stream_with_a_separator_after_each_document(tokenizer):
    docs = ["The quick brown fox jumps over the lazy dog."] * 6
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [separator]
    windows = genre_windows(tokenizer, docs, 8, 3)
    assert windows.shape == (3, 8)
    assert windows.flatten().tolist() == stream[:24]
    with pytest.raises(ValueError, match="windows"):
        genre_windows(tokenizer, docs, 8, len(stream) // 8 + 1)


def test_window_nll_is_the_summed_cross_entropy(tokenizer):
    model = tiny_model(cla_map(4), vocab_size=len(tokenizer))
    window = torch.randint(0, len(tokenizer), (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(window[None]).logits[0]
    expected = -sum(torch.log_softmax(logits[i], -1)[window[i + 1]].item() for i in range(11))
    assert window_nll(model, window) == pytest.approx(expected, rel=1e-5)


def test_summary_counts_the_windows_the_student_loses():
    teacher, student = [10.0, 20.0, 30.0], [11.0, 19.0, 33.0]  # summed NLL over 10 predictions each
    r = summarize(teacher, student, 10)
    assert r["teacher_ppl"] == pytest.approx(math.exp(60 / 30))
    assert r["student_ppl"] == pytest.approx(math.exp(63 / 30))
    assert r["ratio"] == pytest.approx(math.exp(3 / 30))
    assert r["windows"] == 3 and r["windows_student_worse"] == 2
    assert r["window_ratio_min"] == pytest.approx(math.exp(-0.1))
    assert r["window_ratio_median"] == pytest.approx(math.exp(0.1))
    assert r["window_ratio_max"] == pytest.approx(math.exp(0.3))
