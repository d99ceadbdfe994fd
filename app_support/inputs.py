"""Every value an event of the page receives, checked before a handler uses it.

The app's events run with Gradio's preprocessing off: a handler gets the JSON value that the page
or an API client sent, whatever it is ("abc" for a slider, None, a lone surrogate), and these checks
are the only ones. Gradio's own would answer a non-number with an opaque "the upstream app has
raised an exception" and a traceback in the log. A bad value raises InputError (a ChatError): its
text names the setting, its range and the value, and the handler shows it as a notice. Ranges come
from `lckv_stream.limits`, as the CLI's do.
"""

from __future__ import annotations

from lckv_stream.chat import CacheSettings
from lckv_stream.chat_format import ChatError, without_surrogates
from lckv_stream.limits import check, parse
from lckv_stream.sampling import SamplingSettings


class InputError(ChatError):
    """A value an event received is not one the setting takes; the text says which and why."""


def number(name: str, value: object, limits: tuple[float, float] | None = None, whole: bool | None = None):
    """`value` as setting `name` takes it (see `limits.check`)."""
    try:
        return check(name, value, limits, whole)
    except ValueError as error:
        raise InputError(str(error)) from None


def seed(value: object) -> int | None:
    """The seed box: empty (None or blank text) for a random seed per conversation, else a whole
    number (typed in the box as text, or a number from an API client)."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        try:
            return parse("seed", value)
        except ValueError as error:
            raise InputError(str(error)) from None
    if value is None:
        return None
    return number("seed", value)


def text(name: str, value: object) -> str:
    """A free-text box (the system prompt); None reads as empty. Its content is checked where it is used."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"the {name} must be text, got {type(value).__name__}")
    return value


def sampling(max_new_tokens: object, temperature: object, top_p: object) -> SamplingSettings:
    """The sampling sliders as settings."""
    return SamplingSettings(
        temperature=number("temperature", temperature), top_p=number("top_p", top_p),
        max_new_tokens=number("max_new_tokens", max_new_tokens),
    )


def cache(sink: object, window: object) -> CacheSettings:
    """The cache sliders as settings."""
    return CacheSettings(number("sink", sink), number("window", window))


def box_text(value: object) -> str:
    """What to put back in the message box after refusing `value`: the same text, encodable."""
    return without_surrogates(value) if isinstance(value, str) else ""
