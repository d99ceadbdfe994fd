"""A conversation as it is kept on disk: settings, system prompt, and messages with their tokens.

The value types shared by the SQLite store (`store.py`) and the JSON file format
(`conversation_file.py`). Each message carries the segment of the token transcript it added (a user
message: its chat-template text; a reply: the sampled tokens), so the transcript, and from it the
cache, can be rebuilt exactly without running the template or the tokenizer again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .chat import CacheSettings
from .sampling import SamplingSettings

ROLES = ("user", "assistant", "system")
COMPLETE, STOPPED, CUT, STREAMING = "complete", "stopped", "cut", "streaming"
# A reply being streamed is STREAMING; every other status is final. CUT: the process ended mid-reply.
STATUSES = (COMPLETE, STOPPED, CUT, STREAMING)
FINAL_STATUSES = (COMPLETE, STOPPED, CUT)
MAX_TITLE = 120
_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def status_for_reason(reason: str) -> str:
    """The status of a reply from `TurnEnd.reason`: a reply the user stopped is STOPPED."""
    return STOPPED if reason.startswith("stopped") else COMPLETE


def clean_title(title: object) -> str:
    """One line of at most MAX_TITLE characters; ValueError when it is not text or is blank."""
    if not isinstance(title, str):
        raise ValueError(f"a title must be text, got {type(title).__name__}")
    text = _SPACE.sub(" ", _CONTROL.sub(" ", title)).strip()
    if not text:
        raise ValueError("the title is empty")
    return text if len(text) <= MAX_TITLE else text[: MAX_TITLE - 1].rstrip() + "\u2026"


def title_from_message(content: str, length: int = 60) -> str:
    """A default title: the start of the first user message."""
    text = _SPACE.sub(" ", _CONTROL.sub(" ", content)).strip() or "New conversation"
    return text if len(text) <= length else text[: length - 1].rstrip() + "\u2026"


@dataclass(frozen=True)
class ConversationSettings:
    """The cache size and the sampling of a conversation, validated by their own classes."""

    cache: CacheSettings = CacheSettings()
    sampling: SamplingSettings = SamplingSettings()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "cache": {spec.name: getattr(self.cache, spec.name) for spec in fields(CacheSettings)},
            "sampling": {spec.name: getattr(self.sampling, spec.name) for spec in fields(SamplingSettings)},
        }

    @classmethod
    def from_dict(cls, data: object) -> ConversationSettings:
        """Settings from `to_dict`'s shape; missing fields take their defaults. ValueError names the
        field at fault ("settings.cache.window must be ...")."""
        if not isinstance(data, Mapping):
            raise ValueError(f"settings must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"cache", "sampling"})
        if unknown:
            raise ValueError(f"settings has unknown fields: {', '.join(map(str, unknown))}")
        cache = _build(CacheSettings, data.get("cache", {}), "settings.cache")
        sampling = _build(SamplingSettings, data.get("sampling", {}), "settings.sampling")
        return cls(cache, sampling)


def _build(kind: type, data: object, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    names = {spec.name for spec in fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields: {', '.join(map(str, unknown))}")
    if kind is CacheSettings and not isinstance(data.get("pin_system_prompt", True), bool):
        raise ValueError(f"{where}.pin_system_prompt must be true or false, got {data['pin_system_prompt']!r}")
    try:
        return kind(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


@dataclass(frozen=True)
class Message:
    """One message and the tokens it added to the transcript.

    segment_text: the text those tokens encode (what `ChatFormat.new_turn_text` compares against);
    None means `tokenizer.decode(tokens)`.
    """

    role: str
    content: str
    tokens: tuple[int, ...]
    status: str = COMPLETE
    segment_text: str | None = None
    created: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be user, assistant or system, got {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be text, got {type(self.content).__name__}")
        if self.segment_text is not None and not isinstance(self.segment_text, str):
            raise ValueError(f"segment_text must be text or null, got {type(self.segment_text).__name__}")
        if not isinstance(self.tokens, tuple):
            object.__setattr__(self, "tokens", tuple(self.tokens))


@dataclass(frozen=True)
class Conversation:
    """A whole conversation: what `ConversationStore.load` returns and a conversation file holds."""

    id: str
    title: str
    created: float
    updated: float
    system_prompt: str | None
    settings: ConversationSettings
    messages: tuple[Message, ...]

    @property
    def transcript(self) -> list[int]:
        """Every token the conversation encoded, in order: the messages' segments joined."""
        return [token for message in self.messages for token in message.tokens]

    @property
    def segments(self) -> list[list[int]]:
        return [list(message.tokens) for message in self.messages]

    @property
    def turns(self) -> int:
        return sum(1 for message in self.messages if message.role == "user")
