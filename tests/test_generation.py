"""`generate`, pipelines and streamers over the model, against independent references: a token-by-token
loop over `forward(sequential=True)` without any cache, the serving engine, transformers' own Llama,
and the slow StreamingLLM reference."""

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, TextIteratorStreamer, TextStreamer, pipeline

from app_support.tiny import tiny_model
from lckv_stream import StreamingCache, cla_map, lckv_map, yoco_map
from lckv_stream.chat_format import CHATML_TEMPLATE
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.sampling import SamplingSettings
from reference import streaming_logits

EOS = 2
MAPS = [None, lckv_map(4), cla_map(4, 2), yoco_map(4), "0_2s_2s_3"]


def is_sequential_greedy(model, sequence: list[int], prompt_length: int) -> bool:
    """Whether every generated token is the argmax of the exact token-by-token encoding (no cache
    kept) of the text before it: one sequential pass over the whole text checks every step."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence]), sequential=True).logits[0]
    return logits[prompt_length - 1 : -1].argmax(-1).tolist() == sequence[prompt_length:]


def engine_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    engine = Engine(model, EngineSettings(max_batch=1, prefill_tokens=64))
    try:
        row = engine.open_row(4, 64, seed=0)
        list(engine.prefill(row, prompt, 64, threading.Event()))
        settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=new_tokens)
        stream, fed = engine.generate(row, settings, frozenset({EOS}), threading.Event())
        list(stream)
        return list(fed)
    finally:
        engine.close()


@pytest.mark.parametrize("layer_types", MAPS)
def test_generate_greedy_equals_the_engine_and_a_sequential_loop(layer_types):
    model = tiny_model(layer_types, sliding_window=6)
    prompt = torch.randint(3, 300, (8,)).tolist()  # at most m + b tokens: token by token on cyclic maps too
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS)
    generated = out[0, len(prompt):].tolist()
    assert len(generated) > 5
    assert generated == engine_greedy(model, prompt, 16)
    assert is_sequential_greedy(model, out[0].tolist(), len(prompt))


def _llama_twin(model) -> LlamaForCausalLM:
    fields = model.config.to_dict()
    for key in ("layer_types", "forward_passes", "backward_passes", "use_sequential", "force_nodiag", "model_type",
                "sliding_window", "auto_map"):
        fields.pop(key, None)
    twin = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_identity_map_generates_what_transformers_llama_generates():
    model = tiny_model(num_key_value_heads=2)
    llama = _llama_twin(model)
    prompt = torch.randint(3, 300, (2, 10))
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ours = model.generate(prompt, **kwargs)
    theirs = llama.generate(prompt, **kwargs)
    assert ours.shape == (2, 74) and torch.equal(ours, theirs)
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(prompt, **beams), llama.generate(prompt, **beams))  # rows reordered
    torch.manual_seed(5)
    sampled = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(5)
    assert torch.equal(sampled, llama.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9))


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_pipeline_with_chat_input_and_the_streamers_give_the_same_text(chat_tokenizer, capsys):
    tokenizer = chat_tokenizer
    model = tiny_model(cla_map(4), vocab_size=len(tokenizer))
    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    settings = dict(max_new_tokens=20, do_sample=False)
    reply = pipeline("text-generation", model=model, tokenizer=tokenizer)(messages, **settings)
    piped = reply[0]["generated_text"][-1]["content"]

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **settings))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    model.generate(**inputs, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **settings)
    printed = capsys.readouterr().out
    assert piped.strip() and piped == streamed.strip() == printed.strip()


class _Watch(StoppingCriteria):
    """Records the cache's buffers at every step (a stopping criterion that never stops)."""

    def __init__(self, cache: StreamingCache) -> None:
        self.cache, self.seen = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        inner = self.cache.cache
        self.seen.append((inner.allocated_bytes, tuple(t.data_ptr() for t in (*inner.keys, *inner.values))))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_generate_with_the_sink_cache_runs_past_the_trained_context_at_fixed_memory():
    model = tiny_model(cla_map(4), max_position_embeddings=16)
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, 300, (1, 4))
    cache = StreamingCache(sink=2, window=6)
    watch = _Watch(cache)
    out = model.generate(prompt, cache=cache, max_new_tokens=36, do_sample=False, stopping_criteria=[watch],
                         return_dict_in_generate=True, output_logits=True)
    sequence = out.sequences[0].tolist()
    assert len(sequence) == 40 > 2 * model.config.max_position_embeddings
    assert len(watch.seen) == 36 and len(set(watch.seen)) == 1  # same bytes, same buffers, every step
    assert cache.cache.tokens_held() == 8 and cache.cache.tokens_seen() == 39 == cache.get_seq_length()
    expected, held = streaming_logits(model, sequence[:-1], sink=2, window=6)
    logits = torch.stack(out.logits)[:, 0]
    assert (logits - expected[3:]).abs().max() < 1e-4
    assert held == cache.cache.held_indices()


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("layer_types, lengths, sizes", [
    (None, (14, 11), None),
    (lckv_map(4), (14, 11), (2, 6)),  # longer than m + b (iterated), in a cache that the prompts overflow
    (lckv_map(4), (6, 3), None),  # at most m + b: token by token, padding skipped in turn
    ("0_2s_2s_3", (12, 10), (2, 6)),
])
def test_a_left_padded_batch_gives_each_row_what_it_gives_alone(layer_types, lengths, sizes):
    model = tiny_model(layer_types, sliding_window=5)
    model.generation_config.eos_token_id = None
    rows = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    ids, mask = _padded(rows)
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = (lambda: StreamingCache(*sizes)) if sizes else (lambda: None)
    batch = model.generate(ids, attention_mask=mask, cache=cache(), **settings)
    with torch.no_grad():
        encoded = model(ids, attention_mask=mask).logits  # no cache: padding masked in parallel or in turn
    for r, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), cache=cache(), **settings)
        assert batch.sequences[r, -4:].tolist() == alone.sequences[0, -4:].tolist()
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            assert (step_batch[r] - step_alone[0]).abs().max() < 1e-5
        with torch.no_grad():
            unpadded = model(torch.tensor([row])).logits[0]
        assert (encoded[r, ids.shape[1] - len(row):] - unpadded).abs().max() < 1e-5


def test_a_padded_step_leaves_that_row_untouched():
    model = tiny_model(lckv_map(4))
    cache = model.new_cache(sink=2, window=8, batch_size=2)
    with torch.no_grad():
        model(torch.randint(3, 300, (2, 5)), cache)
        before = cache.snapshot()
        model(torch.tensor([[7], [9]]), cache, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]))
    assert cache.seen.tolist() == [6, 5]
    after = cache.rows(1, 2).snapshot()
    assert all(torch.equal(after[name], before[name][1:2]) for name in after)
