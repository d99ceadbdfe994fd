"""A tiny random LCKV model with a byte-level BPE trained on the spot: the app runs it offline in seconds.

`LCKV_MODEL=tiny-random` selects it, so the app's own tests exercise the real UI and engine on CPU
without the default model. Its replies are random text; everything else (cache, metrics) is real.
Copied from tests/tiny.py so the app does not import from the test folder.
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


def tiny_random_model(device: str = "cpu", seed: int = 0) -> tuple[LCKVLlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer): 4 layers, 2 of them storing KV (the same CLA map shape as the default model)."""
    tokenizer = tiny_tokenizer()
    config = LCKVLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        layer_types=cla_map(4), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LCKVLlamaForCausalLM(config).to(device).eval(), tokenizer
