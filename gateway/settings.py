"""One typed Settings object: the TOML file, then environment variables on top (environment wins)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import difflib
import fnmatch
import functools
import os
import re
import tomllib
import uuid
import zoneinfo
from dataclasses import dataclass
import types
import typing
from typing import Any, Literal, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from . import numbers

# Fields of [routes.call] that the gateway decides itself, per carrier and per call.
GATEWAY_OWNED_CALL_FIELDS = {"medium", "firstSpeaker", "firstSpeakerSettings"}


class ConfigError(Exception):
    """The configuration cannot be used; `problems` are sentences a person can act on."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def http_base_url(value: str) -> str:
    """An absolute http(s) URL of a remote API, without a trailing slash (paths are appended)."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"must be an absolute http(s) URL like https://api.example.com, got {value!r}")
    return value.rstrip("/")


# What the store opens (gateway.store.database): SQLite, or PostgreSQL through asyncpg.
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+asyncpg")


class UltravoxSettings(_Section):
    api_key: str | None = None
    base_url: str = "https://api.ultravox.ai"
    # Total time an inbound webhook may spend getting a join URL, retries included.
    # Twilio gives up after 15 s, so the default leaves room for the network both ways.
    inbound_deadline_seconds: float = Field(default=11.0, gt=0, le=60)
    # A call being created is held by its process for inbound_deadline_seconds and this more: past
    # that, its process is taken for dead, and another settles the call by what Ultravox has for it.
    creating_lease_margin_seconds: float = Field(default=5.0, gt=0, le=600)
    request_timeout_seconds: float = Field(default=8.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=20)
    pool_size: int = Field(default=100, ge=1)
    webhook_secret: str | None = None
    # Ultravox's own advice: refuse webhooks whose timestamp is older than a minute.
    webhook_tolerance_seconds: float = Field(default=60.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return http_base_url(value)


class CarrierSettings(_Section):
    """A carrier's [section]; each carrier module declares its own (gateway.carriers)."""

    api_base_url: str
    # How long one request to the carrier's API may take before it is given up (or retried, where a
    # retry cannot act twice).
    request_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str) -> str:
        return http_base_url(value)


class FallbackSettings(_Section):
    # Spoken when Ultravox cannot be reached in time; the caller never hears silence.
    message: str = "We're sorry, our assistant is unavailable right now. Please try again later."
    # Optional number (E.164) dialled after the apology, e.g. a human front desk.
    dial_number: str | None = None
    # Spoken when the called number has no route and there is no default route.
    no_route_message: str = "We're sorry, this number is not in service. Goodbye."

    @field_validator("dial_number")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        return None if value is None else numbers.e164(value)


class DialPolicySettings(_Section):
    """Toll-fraud guard for outbound calls: where the gateway may dial at all."""

    # E.164 prefixes a destination must start with (country codes like "+1", "+44", or narrower).
    allowed_prefixes: list[str] = Field(default_factory=lambda: ["+1"])
    # Prefixes never dialled, even inside an allowed country: US premium-rate (900, 976) and the
    # Caribbean NANP codes most used for toll fraud.
    denied_prefixes: list[str] = Field(default_factory=lambda: [
        "+1900", "+1976", "+1242", "+1246", "+1264", "+1268", "+1284", "+1345", "+1441", "+1473", "+1649",
        "+1658", "+1664", "+1721", "+1758", "+1767", "+1784", "+1809", "+1829", "+1849", "+1868", "+1869",
        "+1876",
    ])
    # Dial requests accepted per API key per minute.
    calls_per_minute_per_key: int = Field(default=30, ge=1)
    # Premium-rate and shared-cost numbers (by phonenumbers' metadata, in any country) are never
    # dialled, by the API, campaigns or operator transfers, unless allowed here.
    allow_premium_rate: bool = False
    allow_shared_cost: bool = False

    def costly_refusal(self, number: str) -> str | None:
        """Why this policy refuses `number` for its type, or None."""
        return numbers.costly_refusal(number, allow_premium_rate=self.allow_premium_rate,
                                      allow_shared_cost=self.allow_shared_cost)

    @field_validator("allowed_prefixes", "denied_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        return [numbers.prefix(prefix) for prefix in value]


# What a call the gateway placed does when answering-machine detection finds a machine: hang up;
# leave `voicemail_message` after the greeting, spoken by the carrier; or have the agent leave one.
VoicemailPolicy = Literal["hangup", "message", "agent"]


def carrier_names() -> list[str]:
    from .carriers import CARRIERS  # carriers import settings; the registry is read when needed

    return list(CARRIERS)


def _known_carrier(name: str) -> str:
    if name not in carrier_names():
        raise ValueError(f"unknown carrier {name!r}; this gateway speaks {', '.join(carrier_names())}")
    return name


class OutboundSettings(_Section):
    # The carrier of dial requests that name none; default: the first with numbers below.
    default_carrier: str | None = None
    # "carrier": the gateway dials through the carrier's REST API and creates the Ultravox call
    # when the callee answers. "ultravox": Ultravox dials with the carrier credentials imported
    # into the Ultravox account.
    default_via: Literal["carrier", "ultravox"] = "carrier"
    ring_timeout_seconds: int = Field(default=30, ge=5, le=120)
    # When answering-machine detection finds a machine (routes and dial requests may say otherwise).
    voicemail: VoicemailPolicy = "hangup"
    # What voicemail = "message" leaves after the greeting (routes may have their own).
    voicemail_message: str = Field(
        default="Hello, we tried to reach you and will try again later. Goodbye.", min_length=1)
    # Numbers this deployment owns, per carrier; a dial request's `from` must be one of them.
    numbers: dict[str, list[str]] = Field(default_factory=dict)
    policy: DialPolicySettings = Field(default_factory=DialPolicySettings)

    @field_validator("default_carrier")
    @classmethod
    def _default_carrier(cls, value: str | None) -> str | None:
        return None if value is None else _known_carrier(value)

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for carrier, owned in value.items():
            _known_carrier(carrier)
            for number in owned:
                try:
                    numbers.e164(number)
                except numbers.InvalidNumber:
                    raise ValueError(f"{carrier} number {number!r} is not E.164 (like +15551234567)") from None
        return value

    @property
    def carrier(self) -> str:
        """The carrier of a dial request that names none."""
        return self.default_carrier or next(iter(self.numbers), None) or carrier_names()[0]


WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
OPERATOR_NAME = re.compile(r"^[a-z0-9_-]{1,40}$")
_HOURS = re.compile(r"^(?P<days>[a-z,-]+)\s+(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d)$")


@dataclass(frozen=True)
class OpeningSpan:
    weekdays: frozenset[int]  # Monday is 0
    start: dt.time
    end: dt.time


def parse_hours(text: str) -> OpeningSpan:
    """"mon-fri 09:00-17:00", "sat,sun 10:00-14:00", "mon 00:00-24:00"."""
    match = _HOURS.match(text.strip().lower())
    if not match:
        raise ValueError(f"hours look like \"mon-fri 09:00-17:00\", got {text!r}")
    weekdays: set[int] = set()
    for part in match["days"].split(","):
        first, _, last = part.partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise ValueError(f"unknown day in {text!r}; days are {', '.join(WEEKDAYS)}")
        a, b = WEEKDAYS.index(first), WEEKDAYS.index(last or first)
        weekdays.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    start = dt.time.fromisoformat(match["start"])
    end = dt.time.max if match["end"] == "24:00" else dt.time.fromisoformat(match["end"])
    if end <= start:
        raise ValueError(f"in {text!r} the end of the day's hours comes before the start")
    return OpeningSpan(frozenset(weekdays), start, end)


def known_zone(value: str) -> str:
    """`value` if it names an IANA time zone, else ValueError."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use names like Europe/Paris)") from None
    return value


class OperatorSettings(_Section):
    """A person (or team) the agent may hand the caller to. The model names it, never its number."""

    number: str | None = None
    sip: str | None = None
    description: str
    caller_id: str | None = None  # the number the operator sees; default: the called number
    ring_timeout_seconds: int = Field(default=20, ge=5, le=120)
    hours: list[str] = Field(default_factory=list)  # empty: always open
    timezone: str = "UTC"
    fallback: str | None = None  # another operator to try when this one does not answer

    @field_validator("number", "caller_id")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        return None if value is None else numbers.e164(value)

    @field_validator("sip")
    @classmethod
    def _sip(cls, value: str | None) -> str | None:
        return None if value is None else numbers.sip_uri(value)

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_hours(text)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return known_zone(value)

    @model_validator(mode="after")
    def _one_target(self) -> "OperatorSettings":
        if (self.number is None) == (self.sip is None):
            raise ValueError("set exactly one of number or sip")
        return self

    @property
    def target(self) -> str:
        return self.number or self.sip or ""

    def is_open(self, now: dt.datetime) -> bool:
        if not self.hours:
            return True
        local = now.astimezone(zoneinfo.ZoneInfo(self.timezone))
        return any(
            local.weekday() in span.weekdays and span.start <= local.time() <= span.end
            for span in map(parse_hours, self.hours)
        )


class TransferSettings(_Section):
    # Said to the caller while the operator's phone rings (cold) or before the hold music (warm).
    connecting_message: str = "Please hold while I connect you."
    # Music for a caller waiting in a warm transfer; empty: the carrier's default.
    hold_music_url: str | None = None
    # Seconds an operator has for each key press: to hear the briefing, then to take the call.
    accept_timeout_seconds: int = Field(default=10, ge=3, le=60)
    # How long a caller on hold waits for an operator's leg that never reports (lost callbacks, a
    # carrier outage) before it counts as a no. Default: the operator's ring timeout + 30 s for the
    # briefing + 2 × accept_timeout_seconds (its two key presses) + 15 s.
    leg_timeout_seconds: float | None = Field(default=None, gt=0, le=600)


# What events there are (gateway.flows.events); an endpoint's `events` filter names these, or
# a family with a wildcard ("call.*").
EVENT_TYPES = ("call.started", "call.status_changed", "call.ended", "transfer.started", "transfer.ended",
               "campaign.started", "campaign.ended", "campaign.row_finished")
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A Standard Webhooks secret: "whsec_" and base64 of 24 to 64 random bytes (the spec's range).
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64


class WebhookSettings(_Section):
    """One of the user's endpoints that receive the gateway's events ([[webhooks]])."""

    # Names the endpoint in the store (its deliveries, whether a 410 disabled it) and the API.
    name: str = "default"
    url: str
    # Signs every delivery (Standard Webhooks); "whsec_" + base64, as the receiver's SDK expects.
    secret: str
    # Event types to send (default: all); "call.*" matches a family.
    events: list[str] = Field(default_factory=lambda: ["*"])
    # Only events of calls on these routes (names of [[routes]]); default: every call.
    routes: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ENDPOINT_NAME.match(value):
            raise ValueError(f"webhook name {value!r} must be 1 to 64 letters, digits, - or _")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an absolute http(s) URL like https://crm.example.com/hooks, got {value!r}")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        raw = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not value.startswith("whsec_") or not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
            raise ValueError(
                f"must be whsec_ followed by base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes; make one "
                "with: python3 -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
            )
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not fnmatch.filter(EVENT_TYPES, pattern):
                raise ValueError(f"{pattern!r} matches no event type; the types are {', '.join(EVENT_TYPES)}")
        return value

    def wants(self, event_type: str, route: str | None) -> bool:
        if self.routes and route not in self.routes:
            return False
        return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in self.events)


class EventSettings(_Section):
    # Seconds between a failed delivery and the next attempt, one entry per retry, each with ±20 %
    # jitter; after the last, the delivery has failed. The default reaches about 24 hours.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0, 36000.0],
        min_length=1, max_length=30)
    # How long one delivery attempt may take (the receiver should answer at once and work later).
    timeout_seconds: float = Field(default=15.0, gt=0, le=60)
    # call.ended waits this long after the call ended for Ultravox's summary and transcript; then it
    # goes without what is still missing.
    artifacts_wait_seconds: float = Field(default=120.0, ge=0, le=3600)
    # A final status may still be corrected by the carrier's own a moment later (CallUpdate's
    # `provisional`): call.ended reports the status this long after the call ended.
    ended_settle_seconds: float = Field(default=2.0, ge=0, le=60)
    # While an endpoint is failing, its soonest retry is sent early this often (a probe): the moment
    # it answers again, everything waiting goes, not at the next retry the schedule puts minutes away.
    probe_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    # A claimed delivery is held for timeout_seconds and this much more: a process killed while
    # sending loses its claims that long after, and another process sends them again.
    lease_margin_seconds: float = Field(default=10.0, gt=0, le=600)
    # Events (and their delivery records) are deleted this many days after they happened, once
    # no delivery is pending.
    retention_days: int = Field(default=30, ge=1)
    # The deliveries are sent from a process of their own beside each server process
    # (gateway/delivery_process.py), off the server's event loop and store thread; false: the
    # server process sends them itself.
    delivery_process: bool = True

    @field_validator("retry_schedule_seconds")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every delay must be more than 0 seconds")
        return value


class CampaignSettings(_Section):
    """[campaigns]: call lists dialled by the gateway (gateway.flows.campaigns)."""

    # A campaign's rows come in one request: its body may be this large (the rest of /v1 keeps
    # [gateway] max_body_bytes).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_rows: int = Field(default=100_000, ge=1)
    # The concurrency the Ultravox account allows (0: Ultravox's allowedConcurrentCalls, read when
    # `inbound_headroom` is set): campaigns dial only while live calls leave `inbound_headroom` free.
    account_concurrency: int = Field(default=0, ge=0)
    inbound_headroom: int = Field(default=0, ge=0)
    # While a campaign cannot dial more (at its max_concurrency, or waiting on its last calls), it
    # looks at its live calls this often.
    settle_seconds: float = Field(default=1.0, gt=0, le=60)
    # A row being dialled whose call is still not recorded this long after a dial's deadline (10 s)
    # from its claim was left by a process that died: it is placed again, under the same attempt.
    redial_margin_seconds: float = Field(default=10.0, gt=0, le=600)


class RouteSettings(_Section):
    number: str
    name: str | None = None
    agent_id: str | None = None
    call: dict[str, Any] | None = None
    template_context: dict[str, str] = Field(default_factory=dict)
    greeting: str | None = None
    max_duration_seconds: float | None = Field(default=None, gt=0)
    recording: bool | None = None
    voice: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Operators this route's agent may transfer to (names of [operators.NAME]).
    operators: list[str] = Field(default_factory=list)
    # Calls placed on this route that answering-machine detection finds a machine on: what to do,
    # and the message to leave (default: [outbound] voicemail and voicemail_message).
    voicemail: VoicemailPolicy | None = None
    voicemail_message: str | None = Field(default=None, min_length=1)
    # "direct": the carrier streams to Ultravox itself. "bridge": the carrier streams to the gateway,
    # which relays the audio to Ultravox (recording, keypad handling, audio counters).
    mode: Literal["direct", "bridge"] = "direct"
    # Bridge mode: write a stereo WAV of each call (caller left, agent right) into this directory.
    recording_dir: str | None = None
    # Delete this route's recordings this many days after they were last written (default: keep).
    retention_days: int | None = Field(default=None, ge=1)

    @field_validator("number")
    @classmethod
    def _number(cls, value: str) -> str:
        if value != "*":
            try:
                numbers.e164(value)
            except numbers.InvalidNumber:
                raise ValueError(f"must be an E.164 number like +15551234567 or \"*\", got {value!r}") from None
        return value

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                uuid.UUID(value)
            except ValueError:
                raise ValueError(f"must be the agent's UUID from the Ultravox console, got {value!r}") from None
        return value

    @field_validator("template_context")
    @classmethod
    def _template_paths(cls, value: dict[str, str]) -> dict[str, str]:
        for variable in value:
            if any(other.startswith(variable + ".") for other in value):
                raise ValueError(f"{variable!r} is both a value and a group of values")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_as_strings(cls, value: Any) -> Any:
        # Ultravox accepts only string metadata values; a TOML number is turned into its text.
        if isinstance(value, Mapping):
            return {k: v if isinstance(v, str) else _toml_scalar_text(v) for k, v in value.items()}
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith("ultravox.") or key.startswith("gateway."):
                raise ValueError(f"key {key!r} uses a reserved prefix (ultravox. and gateway. are reserved)")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "RouteSettings":
        if (self.agent_id is None) == (self.call is None):
            raise ValueError("set exactly one of agent_id (an Ultravox agent) or [routes.call] (an inline call)")
        if self.call is not None:
            owned = sorted(GATEWAY_OWNED_CALL_FIELDS & set(self.call))
            if owned:
                raise ValueError(
                    f"[routes.call] must not set {', '.join(owned)}: the gateway sets the medium and first speaker per carrier"
                )
            if self.template_context:
                raise ValueError("template_context only works with agent_id routes (Ultravox agent calls)")
        if self.recording_dir is not None and self.mode != "bridge":
            raise ValueError("recording_dir needs mode = \"bridge\" (only then does the audio pass the gateway)")
        if self.retention_days is not None and self.recording_dir is None:
            raise ValueError("retention_days needs recording_dir (it says how long that directory's recordings are kept)")
        if self.name is None:
            self.name = self.number
        return self


# What an API key may do on /v1 (gateway.access names the operations each one opens).
Permission = Literal["read", "recordings", "dial", "control", "campaigns", "events", "suppressions"]
PERMISSIONS: tuple[Permission, ...] = typing.get_args(Permission)
KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_API_KEY_LENGTH = 16


class ApiKeySettings(_Section):
    """One key of the /v1 API ([[api_keys]]): a plain string in `api_keys` is one with every
    permission and no scope."""

    # The secret, or `key_env`: the environment variable holding it (load_settings reads it), so
    # the file (a ConfigMap) can name a key whose value lives in a Secret.
    key: str = Field(repr=False)
    key_env: str | None = None
    # Names the key in `gateway check` and refusals; default: its id (a hash, never the key).
    name: str | None = None
    permissions: list[Permission] = Field(default_factory=lambda: list(PERMISSIONS), min_length=1)
    # Scope: only calls (and campaigns, events) of these routes / carriers; empty: every one.
    routes: list[str] = Field(default_factory=list)
    carriers: list[str] = Field(default_factory=list)
    # Only the calls this key placed (POST /v1/calls) or its campaigns dialled.
    own_calls_only: bool = False

    @field_validator("key")
    @classmethod
    def _long_key(cls, value: str) -> str:
        if len(value) < MIN_API_KEY_LENGTH:
            raise ValueError(f"API keys must be at least {MIN_API_KEY_LENGTH} characters (they guard who may place calls)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not KEY_NAME.match(value):
            raise ValueError(f"key name {value!r} must be 1 to 64 letters, digits, ., - or _")
        return value

    @field_validator("carriers")
    @classmethod
    def _carriers(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in carrier_names()]
        if unknown:
            raise ValueError(f"names carriers this gateway does not speak: {_unknown_names(unknown, carrier_names())} "
                             f"(it speaks {', '.join(carrier_names())})")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> "ApiKeySettings":
        if self.name is None:
            from .security import api_key_id

            self.name = api_key_id(self.key)
        return self

    @property
    def scoped(self) -> bool:
        return bool(self.routes or self.carriers or self.own_calls_only)

    def describe(self) -> str:
        """What the key may do, in a line (its name, never the key)."""
        granted = "every permission" if set(self.permissions) == set(PERMISSIONS) else ", ".join(self.permissions)
        scope = [f"routes {', '.join(self.routes)}" if self.routes else "",
                 f"carriers {', '.join(self.carriers)}" if self.carriers else "",
                 "its own calls only" if self.own_calls_only else ""]
        return f"API key {self.name}: {granted}; " + ("; ".join(part for part in scope if part) or "every call")


class Settings(_Section):
    public_url: str | None = None
    database_url: str = "sqlite:///./gateway.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # A client gets this long to send a request's line and headers, then its body (plus a second
    # for each 500 bytes of it), before it is answered 408 and closed: slow senders would otherwise
    # hold their connections for ever (gateway/read_timeouts.py).
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    body_timeout_seconds: float = Field(default=20.0, gt=0, le=3600)
    # For local development only: accept webhooks without checking carrier signatures.
    insecure_skip_signature_verification: bool = False
    # On SIGTERM: how long live bridged calls may go on before they are handed over to another
    # replica (env GATEWAY_DRAIN_SECONDS). Kubernetes' terminationGracePeriodSeconds must exceed it.
    drain_seconds: float = Field(default=120.0, ge=0, le=24 * 3600)
    # Durable work (gateway/work.py): a claimed job is leased this long, renewed a third of the way
    # through; a job held by a process that died is run by another once its lease runs out.
    work_lease_seconds: float = Field(default=15.0, ge=1, le=600)
    # How soon a process sees a job another process wrote or left behind (its own it runs at once).
    work_poll_seconds: float = Field(default=1.0, ge=0.05, le=60)
    # What `gateway serve` writes to stderr: "text" lines, or "json" (one object a line) for a log
    # collector (env GATEWAY_LOG_FORMAT; `--log-format` wins).
    log_format: Literal["text", "json"] = "text"
    # How long a signed webhook's nonce is remembered where its carrier's signature has no time in
    # it (Plivo V3): a replay within it is refused. Carriers with a timestamp window (Telnyx) are
    # remembered for that window instead.
    replay_memory_hours: float = Field(default=24.0, gt=0, le=24 * 90)
    ultravox: UltravoxSettings = Field(default_factory=UltravoxSettings)
    # Each carrier's section ([twilio], …) is added from the registry: see settings_class().
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    # Keys accepted as `Authorization: Bearer KEY` on /v1/*: plain strings (every permission, every
    # call) or [[api_keys]] tables with permissions and a scope. Env GATEWAY_API_KEYS (comma-separated
    # plain keys) takes the place of the file's plain keys; its tables stay.
    api_keys: list[ApiKeySettings] = Field(default_factory=list)
    # What Ultravox presents when it invokes the gateway's transfer tools (env GATEWAY_TOOL_SECRET).
    tool_secret: str | None = None
    # When set, GET /metrics answers only `Authorization: Bearer TOKEN` (env GATEWAY_METRICS_TOKEN):
    # the series name operators, routes and carriers. Unset, /metrics is open (for a scraper on a
    # private network).
    metrics_token: str | None = None
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    operators: dict[str, OperatorSettings] = Field(default_factory=dict)
    routes: list[RouteSettings] = Field(default_factory=list)
    # The user's endpoints for events ([[webhooks]]; env GATEWAY_WEBHOOK_URL and _SECRET add one).
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    events: EventSettings = Field(default_factory=EventSettings)
    campaigns: CampaignSettings = Field(default_factory=CampaignSettings)

    @field_validator("operators")
    @classmethod
    def _operator_names(cls, value: dict[str, OperatorSettings]) -> dict[str, OperatorSettings]:
        for name, operator in value.items():
            if not OPERATOR_NAME.match(name):
                raise ValueError(f"operator name {name!r} must be lower-case letters, digits, - or _ (the model says it)")
            seen = {name}
            while operator.fallback is not None:
                if operator.fallback not in value:
                    raise ValueError(f"operator {name!r} falls back to {operator.fallback!r}, which is not configured")
                if operator.fallback in seen:
                    raise ValueError(f"operator fallbacks loop: {' -> '.join([*seen, operator.fallback])}")
                seen.add(operator.fallback)
                operator = value[operator.fallback]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _plain_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [key.strip() for key in value.split(",") if key.strip()]
        if isinstance(value, list):  # a plain string is a key with every permission
            return [{"key": entry} if isinstance(entry, str) else entry for entry in value]
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        scheme, separator, _ = value.partition("://")
        if not separator or scheme.lower() not in DATABASE_SCHEMES:
            # Only the scheme is repeated: the rest of a database URL may hold a password.
            got = f"a {scheme}:// URL" if separator else "no URL"
            raise ValueError(f"must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DATABASE (the gateway stores "
                             f"calls in SQLite or PostgreSQL), got {got}")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an absolute http(s) URL like https://gateway.example.com, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> "Settings":
        # load_settings checks them on the file's data, with every other problem, in one pass.
        if not (info.context or {}).get("references_checked"):
            problems = reference_problems(self.model_dump(include={"routes", "operators", "webhooks", "api_keys"}))
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _operators_within_the_dial_policy(self) -> "Settings":
        # Transfers dial operators: the dial policy's number types hold for them as for the API.
        problems = [f"operator {name}: {refusal}" for name, operator in self.operators.items()
                    if operator.number and (refusal := self.outbound.policy.costly_refusal(operator.number))]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def webhook_named(self, name: str) -> WebhookSettings | None:
        return next((webhook for webhook in self.webhooks if webhook.name == name), None)

    def route_named(self, name: str) -> RouteSettings | None:
        return next((route for route in self.routes if route.name == name), None)

    def route_for(self, called_number: str) -> RouteSettings | None:
        default = None
        for route in self.routes:
            if route.number == called_number:
                return route
            if route.number == "*":
                default = route
        return default

    def secrets(self) -> list[str]:
        """Every configured value that must never be written to a log: the gateway's own keys and
        secrets, then each carrier's credentials (its `secret_keys`)."""
        values = [self.ultravox.api_key, self.ultravox.webhook_secret, self.tool_secret, self.metrics_token,
                  *(entry.key for entry in self.api_keys),
                  *(webhook.secret for webhook in self.webhooks)]
        from .carriers import CARRIERS

        for carrier in CARRIERS.values():
            values += carrier(self).secrets()
        return [value for value in values if value]

    def warnings(self) -> list[str]:
        """Things that do not stop the gateway but that a person should fix."""
        notes = []
        if not self.ultravox.api_key:
            notes.append("ULTRAVOX_API_KEY is not set: every call will get the spoken apology")
        if not self.routes:
            notes.append("no [[routes]] are configured: every call will hear the no-route message")
        if not self.public_url:
            notes.append(
                "GATEWAY_PUBLIC_URL is not set: carrier signatures are checked against the URL the request "
                "arrived on, which is wrong behind a proxy"
            )
        if any(route.operators for route in self.routes) and not self.tool_secret:
            notes.append("GATEWAY_TOOL_SECRET is not set: routes name operators, but no transfer tool is attached")
        if not self.api_keys:
            notes.append("GATEWAY_API_KEYS is not set (nor [[api_keys]]): the /v1 dialer API refuses every request")
        if not self.ultravox.webhook_secret:
            notes.append(
                "ULTRAVOX_WEBHOOK_SECRET is not set: calls are not told when they end (POST /ultravox/events refuses)"
            )
        if self.insecure_skip_signature_verification:
            notes.append("insecure_skip_signature_verification is on: anyone can send forged carrier webhooks")
        for webhook in self.webhooks:
            if webhook.url.startswith("http://") and not re.match(r"^http://(localhost|127\.|\[::1\])", webhook.url):
                notes.append(f"webhook {webhook.name} is sent over plain http to {webhook.url}: use https")
        from .carriers import CARRIERS

        for carrier in CARRIERS.values():
            notes += carrier(self).warnings()
        return notes


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """ "; did you mean X?" when `name` is close to one of `known`, else ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_names(unknown: list[str], known: typing.Iterable[str]) -> str:
    """ "a (did you mean 'b'?), c" """
    known = list(known)
    return ", ".join(name + (f" ({hint[2:]})" if (hint := did_you_mean(name, known)) else "") for name in unknown)


def reference_problems(data: Mapping[str, Any]) -> list[str]:
    """Names that point at nothing (a route's operators, a webhook's routes) and numbers routed twice.
    Read from the settings as written, whatever else is wrong with them, so that `gateway check`
    reports these along with every other problem in one pass."""

    def tables(value: Any) -> list[Mapping[str, Any]]:
        return [entry for entry in value if isinstance(entry, Mapping)] if isinstance(value, list) else []

    def names(value: Any) -> list[str]:
        return [name for name in value if isinstance(name, str)] if isinstance(value, list) else []

    operators: Mapping[str, Any] = data["operators"] if isinstance(data.get("operators"), Mapping) else {}
    routes = tables(data.get("routes"))
    problems, seen = [], set()
    for route in routes:
        number = route.get("number")
        if isinstance(number, str) and number in seen:
            problems.append(f"two routes are configured for {number}")
        seen.add(number)
        unknown = [name for name in names(route.get("operators")) if name not in operators]
        if unknown:
            problems.append(f"route {route.get('name') or number} names operators that are not configured: "
                            f"{_unknown_names(unknown, operators)}")
    route_names = {route.get("name") or route.get("number") for route in routes}
    webhooks = tables(data.get("webhooks"))
    endpoint_names = [webhook.get("name", "default") for webhook in webhooks]
    if len(set(endpoint_names)) != len(endpoint_names):
        problems.append("two [[webhooks]] have the same name; give each its own `name`")
    for webhook in webhooks:
        unknown = [name for name in names(webhook.get("routes")) if name not in route_names]
        if unknown:
            problems.append(f"webhook {webhook.get('name', 'default')} names routes that are not configured: "
                            f"{_unknown_names(unknown, [name for name in route_names if isinstance(name, str)])}")
    keys: list[Any] = data["api_keys"] if isinstance(data.get("api_keys"), list) else []
    secrets_seen: list[Any] = []
    labels: list[str] = []
    for index, key in enumerate(keys):
        entry = key if isinstance(key, Mapping) else {"key": key}
        label = api_key_label(entry, index)
        if entry.get("key") not in (None, UNSET_KEY_PLACEHOLDER) and entry["key"] in secrets_seen:  # named, never shown
            problems.append(f"API key {label} is the same key as one before it: each key is configured once")
        secrets_seen.append(entry.get("key"))
        if isinstance(entry.get("name"), str):
            if entry["name"] in labels:
                problems.append(f"two API keys are named {entry['name']}; give each its own name")
            labels.append(entry["name"])
        unknown = [name for name in names(entry.get("routes")) if name not in route_names]
        if unknown:
            problems.append(f"API key {label} is scoped to routes that are not configured: "
                            f"{_unknown_names(unknown, [name for name in route_names if isinstance(name, str)])}")
    return problems


def api_key_label(entry: Mapping[str, Any], index: int) -> str:
    """How a problem names an API key: its name, its key_env, or its place; never the key."""
    if isinstance(entry.get("name"), str):
        return entry["name"]
    if isinstance(entry.get("key_env"), str):
        return f"api_keys[{index}] (key_env {entry['key_env']})"
    return f"api_keys[{index}]"


# Environment variable -> (section or None for top level, key). Environment wins over the file.
ENVIRONMENT: dict[str, tuple[str | None, str]] = {
    "GATEWAY_PUBLIC_URL": (None, "public_url"),
    "GATEWAY_DATABASE_URL": (None, "database_url"),
    "GATEWAY_API_KEYS": (None, "api_keys"),
    "GATEWAY_TOOL_SECRET": (None, "tool_secret"),
    "GATEWAY_METRICS_TOKEN": (None, "metrics_token"),
    "GATEWAY_DRAIN_SECONDS": (None, "drain_seconds"),
    "GATEWAY_LOG_FORMAT": (None, "log_format"),
    "GATEWAY_DELIVERY_PROCESS": ("events", "delivery_process"),
    "ULTRAVOX_API_KEY": ("ultravox", "api_key"),
    "ULTRAVOX_BASE_URL": ("ultravox", "base_url"),
    "ULTRAVOX_WEBHOOK_SECRET": ("ultravox", "webhook_secret"),
}


# One [[webhooks]] endpoint from the environment (see _webhook_from_environment).
WEBHOOK_ENVIRONMENT: dict[str, tuple[str | None, str]] = {
    "GATEWAY_WEBHOOK_URL": ("webhooks", "url"),
    "GATEWAY_WEBHOOK_SECRET": ("webhooks", "secret"),
}


def environment() -> dict[str, tuple[str | None, str]]:
    """Every environment variable the gateway reads: its own, then each carrier's."""
    return {**_settings_environment(), **WEBHOOK_ENVIRONMENT}


def _settings_environment() -> dict[str, tuple[str | None, str]]:
    """The variables that set one setting each (the gateway's own, then each carrier's)."""
    from .carriers import CARRIERS

    variables = dict(ENVIRONMENT)
    for name, carrier in CARRIERS.items():
        variables.update({variable: (name, key) for variable, key in carrier.environment.items()})
    return variables


@functools.cache
def settings_class() -> type[Settings]:
    """Settings with one section per registered carrier, typed by the carrier's own model."""
    from .carriers import CARRIERS

    sections = {
        name: (carrier.settings_model, Field(default_factory=carrier.settings_model))
        for name, carrier in CARRIERS.items()
    }
    # pydantic's overloads of create_model cannot type field definitions passed as **kwargs.
    return create_model("Settings", __base__=Settings, **sections)  # type: ignore[call-overload]


def load_settings(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any) and apply the environment. Raises ConfigError with readable problems."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("GATEWAY_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError([f"config file {path} does not exist"]) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"config file {path} is not valid TOML: {error}"]) from None
    data = _flatten_gateway_table(data)
    data = _webhook_from_environment(data, environ)
    data, problems = _api_keys_from_environment(data, environ)
    applied: dict[tuple[str | None, str], str] = {}  # (section, key) -> the variable that set it
    for variable, (section, key) in _settings_environment().items():
        value = environ.get(variable)
        if value and variable not in API_KEY_VARIABLES:
            target = data if section is None else data.setdefault(section, {})
            if not isinstance(target, dict):
                problems.append(f"[{section}] in the config file must be a table (it is set by {variable} too)")
                continue
            target[key] = value
            applied[(section, key)] = variable
    problems += reference_problems(data)
    try:
        settings = settings_class().model_validate(data, context={"references_checked": True})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, data, applied) + problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


# Read by _api_keys_from_environment, not set over the file's value like the others.
API_KEY_VARIABLES = ("GATEWAY_API_KEYS",)
UNSET_KEY_PLACEHOLDER = "key_env-is-not-set"


def _api_keys_from_environment(data: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """GATEWAY_API_KEYS takes the place of the file's plain keys (every permission), and each
    [[api_keys]] table's `key_env` is read into its `key`. Problems name keys, never show them."""
    entries = data.get("api_keys", [])
    if isinstance(entries, str):  # api_keys = "KEY,KEY" reads as the variable does
        entries = [key.strip() for key in entries.split(",") if key.strip()]
    if not isinstance(entries, list):
        return data, []  # the settings model says what is wrong with it
    problems: list[str] = []
    tables = [entry for entry in entries if not isinstance(entry, str)]
    plain = [entry for entry in entries if isinstance(entry, str)]
    if environ.get("GATEWAY_API_KEYS"):
        plain = [key.strip() for key in environ["GATEWAY_API_KEYS"].split(",") if key.strip()]
    resolved = []
    for index, entry in enumerate(tables, start=len(plain)):
        if isinstance(entry, Mapping) and "key_env" in entry:
            variable, name = entry["key_env"], api_key_label(entry, index)
            if "key" in entry:
                problems.append(f"API key {name}: set key or key_env, not both")
            elif not isinstance(variable, str) or not environ.get(variable):
                problems.append(f"API key {name}: key_env names {variable!r}, which is not set in the environment")
                # Kept in its place (the settings are refused anyway) so later problems name the right index.
                entry = {**entry, "key": UNSET_KEY_PLACEHOLDER}
            else:
                entry = {**entry, "key": environ[variable]}
        resolved.append(entry)
    return dict(data, api_keys=[*plain, *resolved]), problems


def _webhook_from_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """GATEWAY_WEBHOOK_URL (and _SECRET): the endpoint named "default", over one of that name in the file."""
    url, secret = environ.get("GATEWAY_WEBHOOK_URL"), environ.get("GATEWAY_WEBHOOK_SECRET")
    if not url and not secret:
        return data
    if not url or not secret:
        raise ConfigError(["GATEWAY_WEBHOOK_URL and GATEWAY_WEBHOOK_SECRET go together: set both, or neither"])
    webhooks = data.get("webhooks", [])
    if not isinstance(webhooks, list):
        raise ConfigError(["webhooks in the config file must be an array of tables: [[webhooks]]"])
    others = [entry for entry in webhooks if not (isinstance(entry, dict) and entry.get("name", "default") == "default")]
    return dict(data, webhooks=[*others, {"name": "default", "url": url, "secret": secret}])


def _flatten_gateway_table(data: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys live under [gateway] in the file, so the file reads as sections."""
    data = dict(data)
    gateway = data.pop("gateway", {})
    if not isinstance(gateway, dict):
        raise ConfigError(["[gateway] in the config file must be a table"])
    for key, value in gateway.items():
        if key == "api_keys" and isinstance(value, list) and isinstance(data.get(key), list):
            data[key] = [*value, *data[key]]  # [gateway] api_keys = [...] and [[api_keys]] tables: both count
        else:
            data.setdefault(key, value)
    return data


def describe_validation_error(error: ValidationError, data: Mapping[str, Any],
                               environment_sources: Mapping[tuple[str | None, str], str] | None = None) -> list[str]:
    """Each of pydantic's errors as a sentence: where (as the file spells it), what is wrong in plain
    words, and which environment variable set the value, if one did."""
    sources = environment_sources or {}
    problems = []
    for item in error.errors():
        loc = item["loc"]
        where = _location(loc, data)
        message = _plain(item, loc)
        key = (None, str(loc[0])) if len(loc) == 1 else (str(loc[0]), str(loc[1])) if len(loc) == 2 else None
        if key is not None and key in sources:
            message += f" (set by {sources[key]})"
        problems.append(f"{where}: {message}" if where else message)
    return problems


def _plain(item: Any, loc: tuple) -> str:
    """A pydantic error's message without validator jargon ("Input should be…")."""
    kind, context, value = item["type"], item.get("ctx") or {}, item.get("input")
    if kind == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))
        return f"is not a known setting{hint} (config/gateway.example.toml lists every key)"
    if kind == "missing":
        return "is required"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false, got {value!r}"
    if kind == "string_type":
        return f"must be text (in quotes), got {value!r}"
    if kind == "literal_error":
        return f"must be one of {context.get('expected')}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "more than", "greater_than_equal": "at least", "less_than": "less than",
                 "less_than_equal": "at most"}[kind]
        bound = next(iter(context.values()), "")
        return f"must be {words} {bound}, got {value!r}"
    if kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        if kind.startswith("string"):
            size = context.get("min_length") if kind.endswith("short") else context.get("max_length")
            return "must not be empty" if size == 1 and kind.endswith("short") else (
                f"must be {'at least' if kind.endswith('short') else 'at most'} {size} characters long")
        size = context.get("min_length") if kind == "too_short" else context.get("max_length")
        return f"must have {'at least' if kind == 'too_short' else 'at most'} {size} entries"
    if kind == "list_type":
        return f"must be a list, like [\"…\", \"…\"], got {value!r}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a table (a [section] or {{ key = value }}), got {value!r}"
    return str(item["msg"]).removeprefix("Value error, ")


def _known_keys(path: tuple) -> list[str]:
    """The keys the settings take at `path` (a pydantic error location), for "did you mean"."""
    annotation: Any = settings_class()
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(part, str):
            field = annotation.model_fields.get(part)
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) is list and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) is dict and isinstance(part, str):
            annotation = typing.get_args(annotation)[1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X` for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return others[0] if len(others) == 1 else annotation
    return annotation


def _location(loc: tuple, data: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if loc[:i] == ("routes",):
                routes = data.get("routes") or []
                number = routes[part].get("number") if part < len(routes) and isinstance(routes[part], dict) else None
                parts[-1] = f"routes[{part}]" + (f" (number {number})" if number else "")
            elif loc[:i] == ("api_keys",):
                keys = data.get("api_keys") or []
                entry = keys[part] if part < len(keys) and isinstance(keys[part], Mapping) else {}
                named = next((f" ({field} {entry[field]})" for field in ("name", "key_env") if entry.get(field)), "")
                parts[-1] = f"api_keys[{part}]{named}"
            else:
                parts[-1] = f"{parts[-1]}[{part}]"
        else:
            parts.append(str(part))
    # Top-level settings are written under [gateway]; sections keep their own name.
    if parts and not parts[0].startswith("routes[") and not isinstance(data.get(parts[0].split("[")[0]), (dict, list)):
        parts[0] = f"gateway.{parts[0]}"
    return ".".join(parts)


def _toml_scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


__all__ = [
    "CarrierSettings",
    "ConfigError",
    "FallbackSettings",
    "RouteSettings",
    "Settings",
    "describe_validation_error",
    "load_settings",
]
