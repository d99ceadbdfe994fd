"""Tiny random LCKV models with a byte-level BPE trained on the spot: they build offline in about a second.

`LCKV_MODEL=tiny-random` runs the app on `tiny_random_model()`, so the app's tests exercise the real
UI and engine on CPU without the default model (its replies are random text; the cache and metrics
are real). The library's tests build their models here too, with `tiny_model(layer_types, ...)`.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lckv_stream import LCKVLlamaConfig, LCKVLlamaForCausalLM, cla_map

NAME = "tiny-random"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming language models keep attention sinks and a window of recent tokens.",
    "Layer-condensed caches store keys and values for only a few layers.",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "user assistant system You are a helpful assistant.",
] * 20


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens, trained on a few sentences (deterministic)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def tiny_config(
    layer_types: str | None = None, num_layers: int = 4, vocab_size: int = 300, **overrides
) -> LCKVLlamaConfig:
    """A 64-wide Llama shape with `layer_types` as the KV map (None: every layer stores its own KV)."""
    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        layer_types=layer_types, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LCKVLlamaConfig(**values)


def tiny_model(layer_types: str | None = None, seed: int = 0, **overrides) -> LCKVLlamaForCausalLM:
    """Random weights drawn from `seed`, in eval mode; `overrides` go to `tiny_config`."""
    torch.manual_seed(seed)
    return LCKVLlamaForCausalLM(tiny_config(layer_types, **overrides)).eval()


def tiny_random_model(device: str = "cpu", seed: int = 0) -> tuple[LCKVLlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer) the app serves as 'tiny-random': 4 layers, 2 storing KV (the default model's CLA shape)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(cla_map(4), seed=seed, vocab_size=len(tokenizer))
    return model.to(device), tokenizer
