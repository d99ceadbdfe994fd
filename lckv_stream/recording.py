"""`StoreRecorder`: a ChatSession's messages written into a `ConversationStore` as they happen.

The session calls it at each change of its transcript: a user message once its tokens are known, a
reply token by token (flushed every few tokens, so a crash keeps what was streamed, marked cut on
the next open), the reply's end, a truncation (undo, regenerate, clear, a message stopped while
being read) and a settings change. Every call commits before it returns.
"""

from __future__ import annotations

from typing import Sequence

from .conversation import ConversationSettings, status_for_reason
from .store import ConversationStore, ReplyWriter


class StoreRecorder:
    """One conversation of one owner in a store."""

    def __init__(self, store: ConversationStore, conversation_id: str, owner: str) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.owner = owner
        self._reply: ReplyWriter | None = None

    def user_message(self, text: str, tokens: Sequence[int], segment_text: str) -> None:
        self.store.append_message(self.conversation_id, self.owner, "user", text, tokens, segment_text=segment_text)

    def begin_reply(self) -> None:
        self._reply = self.store.begin_reply(self.conversation_id, self.owner)

    def reply_token(self, token_id: int, piece: str) -> None:
        self._reply.add(token_id, piece)

    def end_reply(self, reason: str, reply: str, tokens: Sequence[int]) -> None:
        writer, self._reply = self._reply, None
        for token in tokens[len(writer.tokens):]:  # fed to the cache after the reader left
            writer.add(token)
        writer.finish(status_for_reason(reason), reply)

    def truncate(self, keep_messages: int) -> None:
        self._reply = None
        self.store.truncate(self.conversation_id, self.owner, keep_messages)

    def configure(self, settings: ConversationSettings, system_prompt: str | None,
                  first_segment: tuple[Sequence[int], str] | None) -> None:
        self.store.configure(self.conversation_id, self.owner, settings=settings, system_prompt=system_prompt,
                             first_segment=first_segment)
