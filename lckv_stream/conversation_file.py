"""Conversation files: one conversation as JSON, to keep it or to move it to another browser or machine.

Schema, version 1 (fields marked ? may be left out):

    {
      "format": "lckv-stream-conversation",
      "version": 1,
      "title"?: str,
      "created"?: float, "updated"?: float,            # Unix seconds
      "system_prompt"?: str | null,
      "settings"?: {
        "cache"?: {"sink": int, "window": int, "pin_system_prompt": bool},
        "sampling"?: {"temperature": float, "top_p": float, "top_k": int,
                      "repetition_penalty": float, "max_new_tokens": int}
      },
      "messages": [
        {"role": "user" | "assistant" | "system", "content": str,
         "tokens": [int, ...],                         # the transcript segment this message added
         "status"?: "complete" | "stopped" | "cut",    # cut: the reply ended with the process
         "segment_text"?: str | null,                  # the text those tokens encode; null: decode them
         "created"?: float}
      ]
    }

Missing settings take their defaults. Reading a file is validation only: JSON values become strings,
numbers and lists; nothing is unpickled or executed. Every problem is a ConversationFileError that
says where it is and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from .conversation import (
    CUT,
    FINAL_STATUSES,
    ROLES,
    STREAMING,
    Conversation,
    ConversationSettings,
    Message,
    clean_title,
)

FORMAT = "lckv-stream-conversation"
VERSION = 1
MAX_BYTES = 20 * 2**20
_TOP = {"format", "version", "title", "created", "updated", "system_prompt", "settings", "messages"}
_MESSAGE = {"role", "content", "tokens", "status", "segment_text", "created"}


class ConversationFileError(ValueError):
    """A conversation file that cannot be imported; the text says why."""


def dumps(conversation: Conversation) -> str:
    """The conversation as a version-1 file (a reply still streaming is written as cut)."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "title": conversation.title,
        "created": conversation.created,
        "updated": conversation.updated,
        "system_prompt": conversation.system_prompt,
        "settings": conversation.settings.to_dict(),
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "tokens": list(m.tokens),
                "status": CUT if m.status == STREAMING else m.status,
                "segment_text": m.segment_text,
                "created": m.created,
            }
            for m in conversation.messages
        ],
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def load_path(path: str | os.PathLike, vocab_size: int, max_bytes: int = MAX_BYTES) -> Conversation:
    """`loads` of a file; one larger than `max_bytes` is refused before it is read."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise ConversationFileError(_too_large(size, max_bytes))
            data = file.read(max_bytes + 1)  # a pipe or a growing file has no reliable size
    except OSError as error:
        raise ConversationFileError(f"cannot read the file: {error.strerror or error}") from None
    return loads(data, vocab_size, max_bytes)


def loads(text: str | bytes, vocab_size: int, max_bytes: int = MAX_BYTES) -> Conversation:
    """The conversation in a file's text, checked against the schema and a vocabulary of
    `vocab_size` token ids; ConversationFileError when anything is wrong."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a whole number >= 1, got {vocab_size!r}")
    if isinstance(text, str):
        if len(text) > max_bytes:  # a character is at least one byte: too large before encoding it
            raise ConversationFileError(_too_large(len(text), max_bytes))
        size = len(text.encode("utf-8", errors="surrogatepass"))
    else:
        size = len(text)
    if size > max_bytes:
        raise ConversationFileError(_too_large(size, max_bytes))
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as error:
        raise ConversationFileError(f"the file is not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ConversationFileError(
            f"the file is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None
    except RecursionError:
        raise ConversationFileError("the file is not a conversation: its JSON is nested too deeply") from None
    return _conversation(document, vocab_size)


def _conversation(document: Any, vocab_size: int) -> Conversation:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConversationFileError(f'the file is not a conversation: it has no "format": "{FORMAT}"')
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConversationFileError(f'"version" must be a whole number, got {version!r}')
    if version != VERSION:
        raise ConversationFileError(f"the file is version {version}; this app reads version {VERSION}")
    unknown = sorted(set(document) - _TOP)
    if unknown:
        raise ConversationFileError(f"unknown fields: {', '.join(unknown)}")
    try:
        settings = ConversationSettings.from_dict(document.get("settings", {}))
    except ValueError as error:
        raise ConversationFileError(str(error)) from None
    prompt = document.get("system_prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ConversationFileError(f'"system_prompt" must be text or null, got {_kind(prompt)}')
    title = document.get("title", "Imported conversation")
    try:
        title = clean_title(title)
    except ValueError as error:
        raise ConversationFileError(f'"title": {error}') from None
    messages = document.get("messages")
    if not isinstance(messages, list):
        raise ConversationFileError(f'"messages" must be a list, got {_kind(messages)}')
    return Conversation(
        id="",
        title=title,
        created=_time(document, "created"),
        updated=_time(document, "updated"),
        system_prompt=prompt,
        settings=settings,
        messages=tuple(_message(m, i, len(messages), vocab_size) for i, m in enumerate(messages)),
    )


def _message(data: Any, index: int, count: int, vocab_size: int) -> Message:
    where = f"message {index + 1} of {count}"
    if not isinstance(data, dict):
        raise ConversationFileError(f"{where} must be an object, got {_kind(data)}")
    unknown = sorted(set(data) - _MESSAGE)
    if unknown:
        raise ConversationFileError(f"{where} has unknown fields: {', '.join(unknown)}")
    missing = [name for name in ("role", "content", "tokens") if name not in data]
    if missing:
        raise ConversationFileError(f"{where} has no {', '.join(missing)}")
    role, content, tokens = data["role"], data["content"], data["tokens"]
    if role not in ROLES:
        raise ConversationFileError(f"{where}: role must be user, assistant or system, got {role!r}")
    if not isinstance(content, str):
        raise ConversationFileError(f"{where}: content must be text, got {_kind(content)}")
    status = data.get("status", "complete")
    if status not in FINAL_STATUSES:
        raise ConversationFileError(f"{where}: status must be complete, stopped or cut, got {status!r}")
    segment_text = data.get("segment_text")
    if segment_text is not None and not isinstance(segment_text, str):
        raise ConversationFileError(f"{where}: segment_text must be text or null, got {_kind(segment_text)}")
    if not isinstance(tokens, list):
        raise ConversationFileError(f"{where}: tokens must be a list of token ids, got {_kind(tokens)}")
    for position, token in enumerate(tokens):
        if type(token) is not int or not 0 <= token < vocab_size:  # type(): true/false are not ids
            raise ConversationFileError(
                f"{where}: token {position + 1} is {token!r}, not a token id of this model (0 to {vocab_size - 1})"
            )
    return Message(role, content, tuple(tokens), status, segment_text, _time(data, "created", where))


def _time(data: Mapping, name: str, where: str = "") -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConversationFileError(f"{where + ': ' if where else ''}{name} must be a time in seconds, got {value!r}")
    return float(value)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ConversationFileError(f"the file is not a conversation: the field {twice!r} appears twice")
    return document


def _no_constant(name: str) -> None:
    raise ConversationFileError(f"the file is not valid JSON: {name} is not a number")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "a number"
    )


def _too_large(size: int, limit: int) -> str:
    return f"the file is too large: {size / 2**20:.1f} MB, the limit is {limit / 2**20:.0f} MB"
