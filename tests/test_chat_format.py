"""New-turn text: rendering the last messages only gives what rendering the whole conversation gives."""

import pytest

from app_support.tiny import tiny_model, tiny_tokenizer
from lckv_stream import cla_map
from lckv_stream.chat_format import CHATML_TEMPLATE, ChatFormat
from lckv_stream.chat import ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings

# SmolLM2-Instruct's template: a default system message when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Replies as the engine encodes them: sampled text, ended by <|im_end|> or cut short.
REPLIES = ["Paris.<|im_end|>", "It is\n", "\n", "<|im_end|>", "Why?<|im_end|>", "Tell me more", "ok<|im_end|>"]
USERS = ["What is the capital of France?", "Why?", "Tell me more", "\n", "ok", "It is", "Paris."]


def _chat_format(template: str) -> ChatFormat:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return ChatFormat(tokenizer)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE], ids=["chatml", "smollm2"])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_recent_render_matches_the_whole_render_turn_after_turn(template, system):
    chat = _chat_format(template)
    messages = [{"role": "system", "content": system}] if system else []
    encoded: list[str] = []
    recent_used = 0
    for turn, (user, reply) in enumerate(zip(USERS * 2, REPLIES * 2)):
        whole = chat._new_turn_from_all(messages, user, "".join(encoded))
        fast = chat.new_turn_text(messages, user, encoded)
        assert fast == whole, f"turn {turn}"
        recent_used += chat._new_turn_from_recent(messages, user, encoded[-1] if encoded else "") is not None
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.replace("<|im_end|>", "")}]
        encoded += [whole, reply]
    assert recent_used == len(USERS) * 2 - 1  # every turn after the first took the short path


def test_a_template_that_rewrites_history_falls_back_to_the_whole_render():
    numbered = (
        "{% for message in messages %}{{ loop.index|string + ':' + message['role'] + ':' + message['content'] + '|' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    chat = _chat_format(numbered)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    encoded = ["1:user:a|A:", "b", "|3:user:c|A:", "d"]
    assert chat._new_turn_from_recent(messages, "e", encoded[-1]) is None  # numbering differs in a short render
    assert chat.new_turn_text(messages, "e", encoded) == chat._new_turn_from_all(messages, "e", "".join(encoded))


def test_a_long_conversation_renders_a_bounded_number_of_messages(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(cla_map(4), vocab_size=len(tokenizer))
    session = ChatSession(model, tokenizer, system_prompt="Be brief.",
                          sampling=SamplingSettings(temperature=0, max_new_tokens=2))
    rendered: list[int] = []
    render = session.format.render
    monkeypatch.setattr(session.format, "render",
                        lambda messages, add_generation_prompt: rendered.append(len(messages)) or render(messages, add_generation_prompt))
    for turn in range(40):
        end = [e for e in session.send(f"message {turn}") if isinstance(e, TurnEnd)][0]
        assert end.reason in ("eos", "max_new_tokens")
    assert len(session.messages) == 80
    assert max(rendered[10:]) <= 4  # system + last two messages + the new one, whatever the length
