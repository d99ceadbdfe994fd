"""Chat template handling: render a conversation, encode only what is new, find the pinned prefix."""

from __future__ import annotations

import re

# ChatML, for tokenizers that bring no template of their own (e.g. base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# C0/C1 control characters other than tab and newline; they carry no meaning in a chat message.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Half of a UTF-16 surrogate pair, alone (JSON can carry one as "\\ud800"): not text, and not encodable.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_MARKER = "\u2063lckv-marker\u2063"
# Messages rendered for a new turn in a long conversation (plus the system message).
RECENT_MESSAGES = 2


def without_surrogates(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, so it can be encoded and shown."""
    return _SURROGATE.sub("\ufffd", text)


class ChatError(ValueError):
    """A user-facing problem with a message or a setting; the text says what to change."""


def clean_message(text: object) -> str:
    """The message with control characters removed; ChatError when it is not text, holds a lone
    surrogate, or is empty."""
    if not isinstance(text, str):
        raise ChatError(f"a message must be text, got {type(text).__name__}")
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise ChatError(f"the message holds an invalid character at position {surrogate.start()} "
                        f"(a lone UTF-16 surrogate, {ascii(surrogate.group())}): remove it and send again")
    cleaned = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if not cleaned.strip():
        raise ChatError("the message is empty: type something to send")
    return cleaned


class ChatFormat:
    """The tokenizer plus its chat template."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> frozenset[int]:
        ids = set()
        eos = self.tokenizer.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            # One lookup each (not get_vocab(), which builds the whole vocabulary's dict per session);
            # an unknown name comes back as None or the unknown token's id.
            token = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(token, int) and self.tokenizer.convert_ids_to_tokens(token) == name:
                ids.add(token)
        return frozenset(ids)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_visible(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def new_turn_text(self, messages: list[dict], user_text: str, encoded_texts: list[str]) -> str:
        """Text to encode for a new user turn, given the text each earlier message added.

        messages: the conversation so far (a leading system message included); encoded_texts: what
        each non-system message added to the encoded text, in order. Normally the render with the new
        turn extends what was encoded; otherwise (a template that rewrites history) only the new turn
        is encoded, so what the model already saw stays. Long conversations render only their last
        messages, so a turn costs the same at turn 5 and at turn 5,000.
        """
        if len(encoded_texts) > RECENT_MESSAGES:
            text = self._new_turn_from_recent(messages, user_text, encoded_texts[-1])
            if text is not None:
                return text
        return self._new_turn_from_all(messages, user_text, "".join(encoded_texts))

    def _new_turn_from_all(self, messages: list[dict], user_text: str, encoded_text: str) -> str:
        """The new turn's text from a render of the whole conversation."""
        full = self.render(messages + [{"role": "user", "content": user_text}], add_generation_prompt=True)
        if full.startswith(encoded_text):
            return full[len(encoded_text):]
        previous = self.render(messages, add_generation_prompt=False) if messages else ""
        return full[len(previous):] if full.startswith(previous) else full

    def _new_turn_from_recent(self, messages: list[dict], user_text: str, last_encoded: str) -> str | None:
        """The new turn's text from a render of the system message and the last messages only.

        The last reply was encoded right after the generation prompt of the messages before it; when
        the render with the new turn starts with exactly that, the rest is the new turn. None when
        it does not (the caller renders everything then).
        """
        if not messages or messages[-1]["role"] != "assistant" or not last_encoded:
            return None
        system = messages[:1] if messages[0]["role"] == "system" else []
        recent = system + messages[-RECENT_MESSAGES:]
        try:
            prompt = self.render(recent[:-1], add_generation_prompt=True)
            full = self.render(recent + [{"role": "user", "content": user_text}], add_generation_prompt=True)
        except Exception:  # a template may refuse a conversation that starts mid-way
            return None
        encoded = prompt + last_encoded
        return full[len(encoded):] if full.startswith(encoded) else None

    def pinned_prefix_length(self, system_prompt: str | None) -> int:
        """Tokens before the first user message's content: the system prompt and template header."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        text = self.render(messages + [{"role": "user", "content": _MARKER}], add_generation_prompt=False)
        prefix = text[: text.index(_MARKER)]
        return len(self.encode(prefix))
