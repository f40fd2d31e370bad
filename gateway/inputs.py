"""Untrusted scalars at the edge, parsed one way: numbers of ASCII digits within bounds, times always
aware (UTC) and in range, opaque cursors, JSON of bounded depth, text without control characters.

Every reader of a query parameter, header, token, webhook field or JSON body goes through here. What
does not parse raises InvalidInput (a ValueError whose message a client can act on) or, for the
lenient readers of fields a carrier or Ultravox may leave out or spell oddly, gives None.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from typing import Any

UTC = dt.timezone.utc
# The times the gateway stores and compares, with a day's margin at each end: arithmetic on them
# (an age, a duration, a day later) never leaves the range datetime can hold.
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=UTC)
LATEST = dt.datetime(9999, 12, 30, tzinfo=UTC)
# JSON from Ultravox, carriers and API clients is a few levels deep; deeper is refused before
# anything recurses over it (json.dumps, pydantic, the store), which otherwise dies in RecursionError.
MAX_JSON_DEPTH = 32
# A time in ISO 8601 is at most "2026-11-20T10:00:00.123456+05:30" long; a longer text is no time.
_MAX_TIME_LENGTH = 40
_DIGITS = re.compile(r"[0-9]+")
# NUL and the other C0 controls but tab, CR and LF, and DEL: no field anyone sends the gateway holds
# one, and PostgreSQL refuses a NUL in text.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class InvalidInput(ValueError):
    pass


# --- whole numbers ----------------------------------------------------------------------------------
def whole_number(text: str, *, name: str, minimum: int = 0, maximum: int) -> int:
    """`text` as a whole number of ASCII digits (an optional leading "-" where `minimum` is negative)
    in [minimum, maximum]. No sign, space, underscore or other script's digits, as int() would take,
    and never a conversion of thousands of digits."""
    if not isinstance(text, str):
        raise InvalidInput(f"{name} must be a whole number from {minimum} to {maximum}")
    negative = minimum < 0 and text.startswith("-")
    digits = text[1:] if negative else text
    widest = len(str(max(abs(minimum), abs(maximum))))
    if not _DIGITS.fullmatch(digits) or len(digits.lstrip("0")) > widest:
        raise InvalidInput(f"{name} must be a whole number from {minimum} to {maximum}")
    value = -int(digits) if negative else int(digits)
    if not minimum <= value <= maximum:
        raise InvalidInput(f"{name} must be a whole number from {minimum} to {maximum}")
    return value


def whole_number_or_none(value: Any, *, maximum: int) -> int | None:
    """A field that should hold a count (a call's duration): the number, or None when it holds none."""
    if not isinstance(value, str):
        return None
    try:
        return whole_number(value, name="value", maximum=maximum)
    except InvalidInput:
        return None


# --- times ------------------------------------------------------------------------------------------
def timestamp(text: str, *, name: str) -> dt.datetime:
    """An ISO-8601 time as an aware UTC datetime (a time without an offset is read as UTC), within
    EARLIEST..LATEST."""
    message = f"{name} must be an ISO-8601 time like 2026-11-20T10:00:00Z, from 1970 to 9999"
    if not isinstance(text, str) or not text.isascii() or len(text) > _MAX_TIME_LENGTH:
        raise InvalidInput(message)
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)  # OverflowError: 9999-12-31T23:59-23:59 is in year 10000
    except (ValueError, OverflowError):
        raise InvalidInput(message) from None
    if not EARLIEST <= parsed <= LATEST:
        raise InvalidInput(message)
    return parsed


def timestamp_or_none(value: Any) -> dt.datetime | None:
    """A time field of someone else's document: aware UTC, or None when missing or not a time."""
    if not value:
        return None
    try:
        return timestamp(value, name="time")
    except InvalidInput:
        return None


def unix_seconds(text: str, *, name: str) -> int:
    """A Unix time in whole seconds (a signature header's timestamp)."""
    return whole_number(text, name=name, maximum=int(LATEST.timestamp()))


# --- text -------------------------------------------------------------------------------------------
def has_control_characters(text: str) -> bool:
    return CONTROL_CHARACTERS.search(text) is not None


def plain_text(text: str, *, name: str, max_length: int) -> str:
    """A value stored or compared as text: bounded, without NUL or other control characters."""
    if not isinstance(text, str) or len(text) > max_length or has_control_characters(text):
        raise InvalidInput(f"{name} must be text of at most {max_length} characters, without control characters")
    return text


def controls_anywhere(value: Any) -> bool:
    """Whether a JSON value holds a control character in any key or string, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_control_characters(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# A control character in a JSON string is written escaped (raw, it is not JSON at all): "\u0000",
# after an even number of backslashes (an odd one makes it the text "\u0000"). Tab, CR and LF pass.
_ESCAPED_CONTROL = re.compile(rb"(?<!\\)(?:\\\\)*\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F]|7[fF])")


def escapes_control_characters(raw: bytes) -> bool:
    """Whether a JSON text holds a control character in a string, found without parsing it."""
    return _ESCAPED_CONTROL.search(raw) is not None


# --- JSON -------------------------------------------------------------------------------------------
def json_document(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document nested at most `max_depth` levels. InvalidInput otherwise."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeper than the parser goes at all
        raise InvalidInput("not valid JSON") from None
    if json_depth(value) > max_depth:
        raise InvalidInput(f"JSON nested deeper than {max_depth} levels")
    return value


def json_depth(value: Any) -> int:
    """How deeply `value` nests arrays and objects (a scalar: 0), counted without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


# --- cursors ----------------------------------------------------------------------------------------
_MAX_CURSOR_LENGTH = 256


def encode_cursor(*values: str) -> str:
    """An opaque page cursor holding `values`."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def decode_cursor(text: str, count: int) -> list[str]:
    """The `count` texts an encode_cursor() cursor holds; InvalidInput for anything else."""
    refused = InvalidInput("cursor is not one this API handed out")
    if not isinstance(text, str) or len(text) > _MAX_CURSOR_LENGTH or not text.isascii():
        raise refused
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json_document(raw, max_depth=1)
    except (binascii.Error, ValueError):
        raise refused from None
    if (not isinstance(values, list) or len(values) != count
            or not all(isinstance(value, str) and not has_control_characters(value) for value in values)):
        raise refused
    return values
