"""The real base model and the shipped delta (needs the base cached: `python -m lckv_stream fetch-base`)."""

import socket

import pytest
import torch

from lckv_stream import LCKVLlamaConfig, identity_map
from lckv_stream.base_model import cache_dir, cached_gguf, load_base
from lckv_stream.convert import convert_llama
from lckv_stream.default_model import DEFAULT_DELTA
from lckv_stream.chat import ChatSession, TurnEnd
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
    shipped = LCKVLlamaConfig.from_pretrained(DEFAULT_DELTA).layer_types
    assert model.config.layer_types == shipped
    assert len(model.config.layer_map.producers) < 30  # a condensed cache: fewer KV layers than the base
    chat = ChatSession(model, tokenizer, sampling=SamplingSettings(temperature=0, max_new_tokens=12))
    reply = next(e for e in chat.send("What is the capital of France?") if isinstance(e, TurnEnd)).reply
    assert "Paris" in reply


def test_a_delta_folder_loads_like_the_default(offline):
    from lckv_stream.loading import load_model

    by_name, _ = load_model("default", "cpu", progress=lambda _: None)
    by_folder, _ = load_model(str(DEFAULT_DELTA), "cpu", progress=lambda _: None)
    assert by_folder.config.layer_types == by_name.config.layer_types
    for (name, a), (_, b) in zip(by_name.state_dict().items(), by_folder.state_dict().items()):
        assert torch.equal(a, b), name
