"""Which OpenAI request fields a server serves: every other field is refused by name, never ignored.

The edge daemon and the cloud's `/v1/completions` both speak a subset of OpenAI's request schemas. A client
that sends `tools`, `response_format` or a penalty expects them to change the output; answering as if they were
not there would return something the client did not ask for, so both refuse them with 400 and the field's name.
A few fields are accepted at the one value that means "off" (a zero penalty, an empty `logit_bias`).
"""

from __future__ import annotations

from typing import Any

from offramp.shared.errors import OfframpError

# Fields that identify the caller (for a provider's abuse tracking and prompt caching) and never change the output:
# applications send them as a matter of course, so they are served as what they are, labels.
IDENTIFYING_FIELDS = frozenset({"user", "safety_identifier", "prompt_cache_key"})
# Fields whose "off" value changes nothing, so a client that sends it explicitly is served.
NEUTRAL_VALUES: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "store": False}


class UnservedFieldError(OfframpError, ValueError):
    """A request field this server does not serve (or serves only at its neutral value); `field` names it."""

    def __init__(self, field: str, message: str, code: str) -> None:
        super().__init__(message)
        self.field = field
        self.code = code  # unsupported_field | unsupported_value


def _is_neutral(name: str, value: Any) -> bool:
    neutral = NEUTRAL_VALUES[name]
    if isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):  # 0 or 0.0, never false
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
    return value == neutral


def check_served_fields(body: dict[str, Any], served: frozenset[str]) -> None:
    """Raise UnservedFieldError for the first field outside `served` (null counts as absent, as OpenAI treats it)."""
    for name, value in body.items():
        if name in served or value is None or (name in IDENTIFYING_FIELDS and isinstance(value, str)):
            continue
        if name in NEUTRAL_VALUES:
            if _is_neutral(name, value):
                continue
            raise UnservedFieldError(
                name, f"'{name}' is not supported here (only {NEUTRAL_VALUES[name]!r}, the default), got {_short(value)}",
                "unsupported_value",
            )
        raise UnservedFieldError(
            name, f"'{name}' is not supported here; this endpoint takes {', '.join(sorted(served))}", "unsupported_field"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
