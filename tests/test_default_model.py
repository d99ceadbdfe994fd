"""The real base model and the shipped delta (needs the base cached: `python -m lckv_stream fetch-base`)."""

import socket

import pytest
import torch

from lckv_stream import identity_map
from lckv_stream.base_model import cache_dir, cached_gguf, load_base
from lckv_stream.convert import convert_llama
from lckv_stream.engine import ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings

pytestmark = pytest.mark.skipif(
    cached_gguf() is None, reason=f"base model not cached in {cache_dir()}: run `python -m lckv_stream fetch-base`"
)


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails, the Hub included."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_identity_conversion_keeps_the_base_model(offline):
    base, _ = load_base("cpu", progress=lambda _: None)
    converted = convert_llama(base, identity_map(base.config.num_hidden_layers))
    ids = torch.randint(0, base.config.vocab_size, (1, 48))
    with torch.no_grad():
        assert (converted(ids).logits - base(ids).logits).abs().max() < 1e-4


def test_default_model_loads_offline_and_answers(offline):
    from lckv_stream.loading import load_model

    model, tokenizer = load_model("default", "cpu", progress=lambda _: None)
    assert model.config.layer_map.producers == tuple(range(0, 30, 2))
    chat = ChatSession(model, tokenizer, sampling=SamplingSettings(temperature=0, max_new_tokens=12))
    reply = next(e for e in chat.send("What is the capital of France?") if isinstance(e, TurnEnd)).reply
    assert "Paris" in reply
