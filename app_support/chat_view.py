"""The chat as the page shows it: the latest messages, earlier ones on demand, never the whole conversation.

Gradio sends an output's whole value at the start of every event and walks it at every update, so a
chat sent whole makes each turn slower as the conversation grows (over 300 turns: 13 -> 73 KB an
update, 0.2 -> 0.85 s a turn outside the model). The page gets at most MAX_SHOWN messages: the
latest LATEST by default, PAGE more each time it asks for earlier ones; any new reply brings it back
to the latest.
"""

from __future__ import annotations

from dataclasses import dataclass

LATEST = 40  # messages shown while following the conversation (20 exchanges)
PAGE = 40  # messages added by each "earlier messages"
MAX_SHOWN = 200  # past this, the view is a page of the past and "latest messages" comes back


@dataclass
class ChatWindow:
    """Which messages of one conversation the page shows."""

    start: int | None = None  # first message shown; None: the latest LATEST
    shown_from: int = 0  # first message of the view last sent: the page's message i is message shown_from + i

    def bounds(self, count: int) -> tuple[int, int]:
        """(first, end) of the messages shown, out of `count`."""
        if self.start is None:
            return max(0, count - LATEST), count
        start = min(self.start, count)
        return start, min(count, start + MAX_SHOWN)

    def earlier(self, count: int) -> None:
        """Show PAGE more messages before the first one shown."""
        first, _ = self.bounds(count)
        self.start = max(0, first - PAGE)

    def follow(self) -> None:
        """Back to the latest messages (a new reply does this)."""
        self.start = None

    def absolute(self, shown_index: int) -> int:
        """The conversation's index of the page's message `shown_index` in the view last sent."""
        return self.shown_from + shown_index


def earlier_label(first: int) -> str:
    return f"⬆ Earlier messages ({first:,} more)"


LATEST_LABEL = "⬇ Latest messages"
