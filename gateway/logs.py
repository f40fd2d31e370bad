"""Log lines: text or one JSON object a line, each carrying the ids of the call it is about, never a secret.

The ids live in a context variable: a request (or media socket) binds what it learns as it goes
(`bind(carrier=…, call_id=…)`), and every line logged while handling it, by any module, carries
them. Tasks started from a request copy its context, so background work of a transfer keeps them.

The whole configuration is one `logging.config.dictConfig` dict (`log_config`), handed to uvicorn
as its `log_config`: uvicorn applies it in its own process and again in each worker process it
starts (`--workers`), so every process logs the same way, uvicorn's own loggers included.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
import time
import traceback
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Hashable, Iterable, Literal, Mapping, Protocol
from urllib.parse import quote, unquote_plus

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

# The ids a log line may carry, in the order text lines show them.
CONTEXT_FIELDS = ("request_id", "carrier", "route", "call_id", "carrier_call_id", "ultravox_call_id", "transfer_id")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_ids: ContextVar[Mapping[str, str]] = ContextVar("gateway_log_ids", default=_EMPTY)


class Binding:
    """Ids bound to the current context. As a statement, they stay for the rest of the request (its
    task); `with bind(...):` unbinds them at the end of the block."""

    def __init__(self, token):
        self._token = token

    def __enter__(self) -> "Binding":
        return self

    def __exit__(self, *exc_info) -> None:
        _ids.reset(self._token)


def bind(**ids: str | None) -> Binding:
    """Add ids (names from CONTEXT_FIELDS; None and empty values are skipped) to every line logged
    from here on in this context."""
    current = _ids.get()
    added = {name: str(value) for name, value in ids.items() if value}
    return Binding(_ids.set(MappingProxyType({**current, **added}) if added else current))


class CallLike(Protocol):
    # Read-only (properties): a frozen dataclass such as CallRecord matches.
    @property
    def id(self) -> str: ...
    @property
    def carrier(self) -> str: ...
    @property
    def route(self) -> str | None: ...
    @property
    def carrier_call_id(self) -> str | None: ...
    @property
    def ultravox_call_id(self) -> str | None: ...


def bind_call(record: CallLike) -> Binding:
    """The ids of a stored call (gateway.store.CallRecord)."""
    return bind(call_id=record.id, carrier=record.carrier, route=record.route,
                carrier_call_id=record.carrier_call_id, ultravox_call_id=record.ultravox_call_id)


def current_ids() -> Mapping[str, str]:
    return _ids.get()


# --- request ids --------------------------------------------------------------------------------------

REQUEST_ID_HEADER = b"x-request-id"
# An incoming id is kept if it is a short token (a proxy's or the client's), else replaced.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class RequestIds:
    """Pure ASGI: every HTTP request gets a request id, bound for its log lines and returned as
    X-Request-Id (a media socket gets one for its log lines). Outermost, so that error answers
    carry it too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        request_id = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), None)
        if request_id is None or not _SANE_REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(8).encode()
        token = _ids.set(MappingProxyType({"request_id": request_id.decode()}))
        header = (REQUEST_ID_HEADER, request_id)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        # A media socket's frames go straight through: its id is for its log lines only.
        await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        # Not in a `finally`: when the app raises, the server's own error line (logged in this task,
        # after this returns) should still carry the request's ids. A request's task ends with it.
        _ids.reset(token)


# --- filters --------------------------------------------------------------------------------------------


class Throttled:
    """Lines of one kind logged at most once per `every` seconds each: a flood of refused requests
    must not cost a log line each (the first says everything; later ones say how many were left
    out). Metrics still count every one. Kinds must be few (not built from what a client sends)."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, clock: Any = time.monotonic) -> None:
        self.logger = logger
        self.every = every
        self.clock = clock
        self._quiet_until: dict[Hashable, float] = {}
        self._left_out: dict[Hashable, int] = {}

    def warning(self, kind: Hashable, message: str, *args: Any) -> None:
        now = self.clock()
        if now < self._quiet_until.get(kind, float("-inf")):
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._quiet_until[kind] = now + self.every
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            message += " (and %d more like it in the %g s before, not logged)"
            args = (*args, left_out, self.every)
        self.logger.warning(message, *args)


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (JSON lines show them as fields); explicit `extra` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _ids.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


REDACTED = "[redacted]"


# Query parameters whose values the server's request lines may show: ids and filters, none of
# them a credential. Every other value (media and callback tokens, whatever a client sends) is
# redacted whatever its shape or spelling (`%74oken=` is `token=` once decoded).
LOGGED_QUERY_VALUES = frozenset({
    "call", "transfer", "leg", "part", "limit", "status", "carrier", "direction", "type", "endpoint",
    "call_id", "created_after", "created_before",
})


def redact_query(target: str) -> str:
    """A request target (path?query) with the values of its query redacted but LOGGED_QUERY_VALUES'."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    fields = []
    for field in re.split(r"([&;])", query):
        if field in ("&", ";") or not field:
            fields.append(field)
            continue
        name, equals, _ = field.partition("=")
        kept = unquote_plus(name) in LOGGED_QUERY_VALUES and not _CREDENTIAL_SHAPE.search(field)
        fields.append(field if kept or not equals else f"{name}={REDACTED}")
    return f"{path}?{''.join(fields)}"


class RequestLineFilter(logging.Filter):
    """uvicorn's request lines (its access log, and the WebSocket lines of uvicorn.error) name the
    request target with its query, where the gateway's media and callback URLs carry their tokens:
    their query values go, structurally, before the pattern-based RedactingFilter sees the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
            record.args = tuple(redact_query(arg) if isinstance(arg, str) and arg.startswith("/") else arg
                                for arg in record.args)
        return True
# What secrets look like even when they are not configured values: credentials in URL queries
# (media tokens `token=`, callback tokens `t=`, also HTML-escaped), the media token itself
# ("{expiry}.{32 hex}", as in stream parameters), Authorization values, URL user-info passwords,
# and header or parameter names that say they carry a secret. Each runs only on text holding its
# cue (a plain substring search): most text holds none, and a full pass costs several microseconds.
_PATTERNS = [(re.compile(cue, re.IGNORECASE), re.compile(pattern, flags), replacement) for cue, pattern, flags, replacement in [
    (r"t=", r"([?&;](?:token|t)=)[^&\s\"'<>]+", 0, rf"\1{REDACTED}"),
    (r"\.", r"\b\d{9,11}\.[0-9a-f]{32}\b", 0, REDACTED),
    # (A credential has a digit or a base64 sign: "Basic credentials" in a sentence stays.)
    (r"bearer|basic", r"\b(Bearer|Basic)\s+(?=[A-Za-z._~-]*[0-9+/=])[A-Za-z0-9._~+/=-]+", re.IGNORECASE,
     rf"\1 {REDACTED}"),
    (r"@", r"(://[^/\s:@]+:)[^/\s@]+@", 0, rf"\1{REDACTED}@"),
    (r"authorization|signature|secret|password|token",
     r"((?:authorization|signature|secret|password|token)[\w-]*[\"']?\s*[:=]\s*[\"']?)"
     r"(?!(?:Bearer|Basic)\b|\[redacted\])[^\s\"',;}&]+", re.IGNORECASE, rf"\1{REDACTED}"),
]]
_CREDENTIAL_SHAPE = re.compile(r"\d{9,11}(?:\.|%2e)[0-9a-f]{32}", re.IGNORECASE)
# Ids and other plain words: only a configured secret or a media token can hide in them.
_PLAIN = re.compile(r"[\w.:-]*")
_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# Configured secrets shorter than this are matched as whole tokens only.
WHOLE_TOKEN_BELOW = 8


class RedactingFilter(logging.Filter):
    """The safety net: removes configured secret values and anything shaped like a credential from a
    record's message, arguments, extra fields and traceback before any handler writes it."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        values = {value for secret in secrets if secret for value in (secret, quote(secret, safe=""))}
        # Longest first, so that a secret containing another is removed whole. A short one (a test
        # key such as "x") only where it stands alone: inside words it would blank every log line.
        alternatives = "|".join(
            re.escape(value) if len(value) >= WHOLE_TOKEN_BELOW else rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])"
            for value in sorted(values, key=len, reverse=True))
        self._secrets = re.compile(alternatives) if alternatives else None

    def redact(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        patterns = _PATTERNS[1:2] if _PLAIN.fullmatch(text) else _PATTERNS
        for cue, pattern, replacement in patterns:
            if cue.search(text):
                text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact_record(record)
        except Exception:  # never let a line through unredacted, nor break the code that logged it
            record.msg, record.args = "(log line dropped: it could not be redacted)", None
            record.exc_info, record.exc_text = None, None
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: keep what there is
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.redact(message), None
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD_ATTRIBUTES:
                setattr(record, name, self._redact_value(value))
        if record.exc_info:
            # Formatted once here, redacted, and handed to formatters as text (they use exc_text).
            record.exc_text = self.redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {key: self._redact_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact_value(item) for item in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.redact(str(value))


# --- formatters -----------------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """`time level logger: message [ids]`: the ids compactly, so a grep for a call id finds its lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        if not ids:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{ids}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, the process id (one of
    several with --workers), the bound ids, any `extra` fields, and a traceback field for exceptions."""
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        ["levelname", "name", "message", "process"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid", "exc_info": "traceback",
                       "stack_info": "stack"},
        timestamp="time",
        # uvicorn adds a copy of its message with terminal colours.
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


# --- the configuration ------------------------------------------------------------------------------------

# The least severe level each library logs at, whatever --log-level says: SQLAlchemy would write
# every statement with its parameters (call data, media tokens) from INFO on, so it keeps the WARNING
# it sets itself; the others write every frame or connection step at DEBUG.
LIBRARY_LEVELS = {"sqlalchemy": "WARNING", **dict.fromkeys(
    ("aiosqlite", "asyncio", "httpcore", "hpack", "websockets", "multipart", "aiohttp"), "INFO")}


def stderr_handler() -> logging.Handler:
    """The one handler. Built by dictConfig in every process uvicorn starts, so it is also where the
    rest of stderr's writers are routed through logging: Python warnings, and uncaught exceptions in
    threads and at the top level."""
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    import threading

    threading.excepthook = lambda hook: _log_uncaught(hook.exc_type, hook.exc_value, hook.exc_traceback)
    return logging.StreamHandler(sys.stderr)


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        return sys.__excepthook__(exc_type, exc_value, exc_traceback)
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(exc_type, exc_value, exc_traceback))


def log_config(log_format: LogFormat = "text", level: str = "info", secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The logging configuration as a dictConfig dict (uvicorn's `log_config`). It is all plain data
    (it is pickled to worker processes), `secrets` included: the values RedactingFilter removes."""
    level = level.upper()
    formatter = {"()": "gateway.logs.json_formatter"} if log_format == "json" else {
        "()": "gateway.logs.TextFormatter", "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "gateway.logs.ContextFilter"},
            "request_lines": {"()": "gateway.logs.RequestLineFilter"},
            # The context first: ids are redacted like everything else (a carrier could send anything).
            "redact": {"()": "gateway.logs.RedactingFilter", "secrets": sorted(set(secrets))},
        },
        "formatters": {"gateway": formatter},
        "handlers": {"stderr": {"()": "gateway.logs.stderr_handler", "formatter": "gateway",
                                "filters": ["context", "request_lines", "redact"]}},
        "loggers": {
            # uvicorn's loggers come with handlers of their own in its default config: here they
            # go to the one handler like every other logger.
            **{name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            **{name: {"level": max(level, floor, key=logging.getLevelName)} for name, floor in LIBRARY_LEVELS.items()},
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }


def current_format() -> LogFormat:
    """The format this process logs in, as configured (for a process it starts to log in the same)."""
    from pythonjsonlogger.json import JsonFormatter

    json_handlers = (h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    return "json" if next(json_handlers, None) is not None else "text"


def apply(config: dict[str, Any]) -> None:
    """Configure this process's logging with a log_config dict (what uvicorn does with it)."""
    import logging.config

    logging.config.dictConfig(config)


def configure(log_format: LogFormat = "text", level: str = "info", secrets: Iterable[str] = ()) -> None:
    apply(log_config(log_format, level, secrets))


def format_from_environment(default: LogFormat = "text") -> LogFormat:
    value = os.environ.get("GATEWAY_LOG_FORMAT", default)
    return value if value in LOG_FORMATS else default
