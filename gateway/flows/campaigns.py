"""Campaigns: a list of people to phone with one agent, inside calling hours, at a bounded pace.

Each campaign is one keyed durable job (`DispatchCampaign`), so one process at a time dispatches
it, whichever replica claims it; a replica that dies loses the job's lease and another carries on.
Exactly once does not rest on that lease, though: a row is claimed in the store (pending ->
dialing, its attempt counted and keyed) before its call is placed, and the call is placed with
that attempt's Idempotency-Key. A run that finds a dialing row looks its call up by the key:

* found and final: the row takes the call's status, or waits for a retry per the campaign's
  `retry` rules;
* found and live: it is one of the campaign's live calls (counted against `max_concurrency`);
* found failed because a process died placing it: the outbound sweep asked the carrier (where the
  carrier can be asked). The carrier had the call: it was adopted, and the row follows it. It had
  none (NEVER_PLACED): the row is pending again, the attempt not counted, and is claimed under a
  new key. The carrier could not say (ABANDONED_UNPLACED): failed, never retried (it may have rung);
* not found long after the claim: the process died before recording the call, so no carrier
  was asked; the dial is made again under the same key (a slow first attempt would be found).

Windows are days and hours (as operators' `hours`: "mon-fri 09:00-17:00") in each recipient's
local time: the row's `timezone`, else the zones phonenumbers gives for the number (the window
must be open in all of them), else the campaign's `timezone`.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import math
import time
import zoneinfo
from dataclasses import dataclass
from typing import Any, Literal, cast

import phonenumbers
import phonenumbers.timezone
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import numbers, statuses
from ..carriers import CarrierName
from ..settings import OpeningSpan, Settings, VoicemailPolicy, known_zone, parse_hours
from ..store import CallRecord, CallStore
from ..store.calls import utcnow
from ..store.campaigns import (
    CAMPAIGN_KEY_ID, CANCELED, COMPLETED, PAUSED, PENDING, REJECTED, RUNNING, Attempt, CampaignRecord, CampaignStore,
    NewRow, RowChange, RowRecord, campaign_of_attempt,
)
from ..ultravox import AccountCapacity, UltravoxError
from ..work import Work
from .outbound import (
    ABANDONED_UNPLACED, INLINE_CALL_FIELDS, NEVER_PLACED, PLACE_DEADLINE_SECONDS, ULTRAVOX_OVER_CAPACITY, DialRejected,
    DialRequest, OutboundFlow,
)

log = logging.getLogger("gateway.campaigns")

TICK_SECONDS = 1.0  # a dispatch run starts at most calls_per_second × this many dials
MAX_SLEEP_SECONDS = 60.0  # a campaign waiting for its window still looks at itself this often
# Ultravox over capacity (429/503): the campaign waits out Retry-After (this long without one, at
# most the cap), and its pace drops by the factor (not below the floor), then rises again by the
# step with each dispatch run (about a second) that dialled: additive increase, multiplicative decrease.
# How often a dispatcher reads Ultravox's account (its allowedConcurrentCalls and activeCalls).
ACCOUNT_READ_SECONDS = 5.0
DEFAULT_HOLD_SECONDS = 5.0
MAX_HOLD_SECONDS = 600.0
BACK_OFF_FACTOR = 0.5
PACE_FLOOR = 0.05
PACE_STEP = 0.05
RETRYABLE = Literal["busy", "no-answer", "failed", "machine-detected"]
MAX_CAMPAIGN_LIST = 200


# --- what a campaign is asked to be ---------------------------------------------------------------
class CampaignRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(description="Number to call, E.164", json_schema_extra=numbers.E164_SCHEMA)
    template_context: dict[str, Any] = Field(default_factory=dict, description="Agent template variables")
    metadata: dict[str, str] = Field(default_factory=dict)
    timezone: str | None = Field(default=None, description="The recipient's IANA zone; default: the number's")

    @field_validator("to")
    @classmethod
    def _e164(cls, value: str) -> str:
        return numbers.e164(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else known_zone(value)


class RetryRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(ge=1, le=20, description="Dials in all while the row's calls end this way")
    delay_seconds: float = Field(ge=0, le=7 * 86400, description="Between such a call's end and the next dial")


class CampaignSpec(BaseModel):
    """A campaign as asked for, its rows aside (stored with it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=200)
    route: str | None = Field(default=None, description="A configured route whose agent takes the calls")
    agent_id: str | None = None
    call: dict[str, Any] | None = Field(default=None, description="Inline Ultravox StartCallRequest fields")
    carrier: CarrierName | None = None
    from_: str | list[str] | None = Field(default=None, alias="from", json_schema_extra=numbers.E164_SCHEMA,
                                          description="One of the deployment's numbers, or a pool used in turn")
    max_concurrency: int = Field(default=5, ge=1, le=10_000, description="Live calls of the campaign at most")
    calls_per_second: float = Field(default=1.0, gt=0, le=100)
    window: list[str] = Field(default_factory=list, description='Calling hours in the recipient\'s local time, '
                              'e.g. ["mon-fri 09:00-17:00"]; empty: any time')
    timezone: str = Field(default="UTC", description="For numbers whose zone is not known")
    starts_at: dt.datetime | None = None
    ends_at: dt.datetime | None = Field(default=None, description="Rows not dialled by then are expired")
    retry: dict[RETRYABLE, RetryRule] = Field(default_factory=dict)
    answering_machine_detection: bool = False
    voicemail: VoicemailPolicy | None = None
    max_duration: float | None = Field(default=None, gt=0)
    greeting: str | None = None
    opt_out_tool: bool = Field(default=True, description="The agent may record an opt-out (the optOutOfCalls "
                               "tool): the number joins the suppression list, and no later row dials it")

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("a pool of from numbers needs at least one")
            return [numbers.e164(number) for number in value]
        return None if value is None else numbers.e164(value)

    @field_validator("window")
    @classmethod
    def _window(cls, value: list[str]) -> list[str]:
        return [text for text in value if parse_hours(text)]  # each parsed: refused when it does not

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_zone(value)

    @field_validator("starts_at", "ends_at")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)

    @field_validator("call")
    @classmethod
    def _safe_inline_call(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        refused = sorted(set(value or {}) - INLINE_CALL_FIELDS)
        if refused:
            raise ValueError(f"call may not set {', '.join(refused)}; allowed: {', '.join(sorted(INLINE_CALL_FIELDS))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CampaignSpec":
        if sum(x is not None for x in (self.route, self.agent_id, self.call)) != 1:
            raise ValueError("give exactly one of route, agent_id or call")
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must come after starts_at")
        return self

    @property
    def pool(self) -> list[str | None]:
        numbers: list[str | None] = [*self.from_] if isinstance(self.from_, list) else [self.from_]
        return numbers

    @property
    def opening(self) -> "Window":
        return Window(tuple(parse_hours(text) for text in self.window))

    def dial_request(self, row: RowRecord | CampaignRow, attempt: int, position: int) -> DialRequest:
        """The dial of `row`'s `attempt` (from numbers of a pool in turn, row by row and attempt by attempt)."""
        to = row.to_number if isinstance(row, RowRecord) else row.to
        pool = self.pool
        return DialRequest.model_validate({
            "to": to, "from": pool[(position + attempt - 1) % len(pool)], "carrier": self.carrier,
            "route": self.route, "agent_id": self.agent_id, "call": self.call,
            "template_context": row.template_context, "metadata": row.metadata,
            "answering_machine_detection": self.answering_machine_detection, "voicemail": self.voicemail,
            "max_duration": self.max_duration, "greeting": self.greeting, "opt_out_tool": self.opt_out_tool,
        })


class CampaignRequest(CampaignSpec):
    """Body of POST /v1/campaigns: the campaign and its rows, as `rows` or as `csv` text (a header
    line; column `to`, optional `timezone`, `metadata.KEY` columns for metadata, any other column
    a template variable)."""

    rows: list[CampaignRow] = Field(default_factory=list)
    csv: str | None = None

    @model_validator(mode="after")
    def _rows_from_csv(self) -> "CampaignRequest":
        if self.csv is not None:
            if self.rows:
                raise ValueError("give rows or csv, not both")
            self.rows = rows_from_csv(self.csv)
            self.csv = None
        if not self.rows:
            raise ValueError("a campaign needs at least one row")
        return self

    def spec(self) -> CampaignSpec:
        return CampaignSpec.model_validate(self.model_dump(by_alias=True, exclude={"rows", "csv"}))


def rows_from_csv(text: str) -> list[CampaignRow]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    if not reader.fieldnames or "to" not in [name.strip() for name in reader.fieldnames]:
        raise ValueError("the CSV needs a header line with a `to` column")
    rows = []
    for line, record in enumerate(reader, start=2):
        values = {(key or "").strip(): (value or "").strip() for key, value in record.items()}
        metadata = {key.removeprefix("metadata."): value for key, value in values.items()
                    if key.startswith("metadata.") and value}
        context = {key: value for key, value in values.items()
                   if key not in ("to", "timezone") and not key.startswith("metadata.") and key and value}
        try:
            rows.append(CampaignRow(to=values["to"], timezone=values.get("timezone") or None,
                                    metadata=metadata, template_context=context))
        except ValueError as error:
            raise ValueError(f"CSV line {line}: {error}") from None
    return rows


def zones_of(number: str, row_zone: str | None, default: str) -> tuple[str, ...]:
    """Where the recipient may be: the row's zone, else phonenumbers' zones of the number, else `default`."""
    if row_zone:
        return (row_zone,)
    zones = phonenumbers.timezone.time_zones_for_number(phonenumbers.parse(number))
    known = tuple(zone for zone in zones if zone != phonenumbers.timezone.UNKNOWN_TIMEZONE)
    return known or (default,)


@dataclass(frozen=True)
class Window:
    """Calling hours; empty: always open. `opens_at` is when they are open in every one of `zones`."""

    spans: tuple[OpeningSpan, ...]

    def is_open(self, now: dt.datetime, zone: str) -> bool:
        if not self.spans:
            return True
        local = now.astimezone(zoneinfo.ZoneInfo(zone))
        return any(local.weekday() in span.weekdays and span.start <= local.time() < span.end for span in self.spans)

    def opens_at(self, now: dt.datetime, zones: tuple[str, ...]) -> dt.datetime | None:
        """None: open now; else the first time from `now` that it is open in all `zones`."""
        candidate = now
        for _ in range(32):  # each step moves to a later opening in some zone
            later = max(self._next_open(candidate, zone) for zone in zones)
            if later == candidate:
                return None if candidate == now else candidate
            candidate = later
        return candidate

    def _next_open(self, now: dt.datetime, zone: str) -> dt.datetime:
        if self.is_open(now, zone):
            return now
        tz = zoneinfo.ZoneInfo(zone)
        local = now.astimezone(tz)
        openings = [
            dt.datetime.combine(local.date() + dt.timedelta(days=day), span.start, tzinfo=tz)
            for day in range(8) for span in self.spans
            if (local.weekday() + day) % 7 in span.weekdays
        ]
        later = [opening for opening in openings if opening > local]
        return min(later).astimezone(dt.timezone.utc) if later else now + dt.timedelta(days=7)


# --- durable work -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptOut:
    call: CallRecord  # the call on which the callee asked
    added: bool  # False: the number was listed already


@dataclass(frozen=True)
class DispatchCampaign:
    campaign_id: str


def dispatch_key(campaign_id: str) -> str:
    return f"campaign:{campaign_id}"


class CampaignConflict(Exception):
    """The campaign is not in a state that allows the change."""


class CampaignFlow:
    def __init__(self, settings: Settings, store: CampaignStore, calls: CallStore, outbound: OutboundFlow, *,
                 work: Work, on_row_outcome=lambda campaign_id, status: None,
                 on_capacity_refusal=lambda campaign_id: None, clock=time.monotonic):
        self.settings = settings
        self.store = store
        self.calls = calls
        self.outbound = outbound
        self.work = work
        self._on_row_outcome = on_row_outcome
        self._on_capacity_refusal = on_capacity_refusal
        self._clock = clock
        # This process's own note of a refusal, so a run stops dialling at once (the row has it too).
        self._held: dict[str, float] = {}
        self._capacity: tuple[float, AccountCapacity | None] = (-ACCOUNT_READ_SECONDS, None)
        # Never given up on: a campaign stalls only while its store does not answer.
        work.register(DispatchCampaign, self.dispatch, max_attempts=1_000_000)

    def _job(self, campaign_id: str):
        return self.work.job(DispatchCampaign(campaign_id), key=dispatch_key(campaign_id), coalesce=True)

    # --- the API's side ---------------------------------------------------------------------------
    async def create(self, request: CampaignRequest, *, api_key_id: str) -> CampaignRecord:
        """Record the campaign and its rows (each through the dial policy and the suppression list)
        and start dispatching it. Raises DialRejected for what refuses the whole campaign."""
        spec = request.spec()
        carrier = spec.carrier or self.settings.outbound.carrier
        owned = self.settings.outbound.numbers.get(carrier, [])
        for number in spec.pool:
            if number is not None and number not in owned:
                raise DialRejected(403, f"from must be one of this deployment's {carrier} numbers ({number} is not)")
        if len(request.rows) > self.settings.campaigns.max_rows:
            raise DialRejected(413, f"a campaign has at most {self.settings.campaigns.max_rows} rows ([campaigns] max_rows)")
        suppressed = await self.store.suppressed([row.to for row in request.rows])
        rows = []
        for position, row in enumerate(request.rows):
            zones = zones_of(row.to, row.timezone, spec.timezone)
            status, reason = PENDING, None
            try:
                self.outbound.check(spec.dial_request(row, 1, position))
            except DialRejected as rejection:
                if rejection.status != 403:  # the campaign as a whole cannot be dialled
                    raise
                status, reason = REJECTED, rejection.reason
            except ValueError as error:
                raise DialRejected(422, f"row {position}: {error}") from None
            if status == PENDING and row.to in suppressed:
                status, reason = "suppressed", "the number is on the suppression list"
            rows.append(NewRow(row.to, zones, row.template_context, row.metadata, status, reason))
        campaign = await self.store.create(
            name=spec.name, api_key_id=api_key_id, spec=spec.model_dump(mode="json", by_alias=True),
            starts_at=spec.starts_at, ends_at=spec.ends_at, rows=rows, job=self._job)
        self.work.wake()
        log.info("campaign %s (%s): %d rows", campaign.id, campaign.name, len(rows))
        return campaign

    async def pause(self, campaign_id: str) -> CampaignRecord:
        return await self._change(campaign_id, (RUNNING,), PAUSED)

    async def resume(self, campaign_id: str) -> CampaignRecord:
        return await self._change(campaign_id, (PAUSED,), RUNNING, job=True)

    async def cancel(self, campaign_id: str) -> CampaignRecord:
        # Live calls go on to their end; nothing more is dialled.
        return await self._change(campaign_id, (RUNNING, PAUSED), CANCELED)

    async def _change(self, campaign_id: str, allowed: tuple[str, ...], to: str, *, job: bool = False) -> CampaignRecord:
        campaign, changed = await self.store.change_status(campaign_id, allowed_from=allowed, to=to,
                                                           job=self._job(campaign_id) if job else None)
        if campaign is None:
            raise LookupError(campaign_id)
        if not changed and campaign.status != to:
            raise CampaignConflict(f"the campaign is {campaign.status}")
        if job:
            self.work.wake()
        return campaign

    # --- dispatch (durable work) ------------------------------------------------------------------
    async def dispatch(self, job: DispatchCampaign) -> float | None:
        """One run: settle the attempts, then dial what the window, concurrency and rate allow.
        Returns when to run again (None: the campaign is over, or paused with no call live)."""
        campaign = await self.store.get(job.campaign_id)
        if campaign is None:
            return None
        spec = CampaignSpec.model_validate(campaign.spec)
        live = await self._settle(campaign, spec)
        if campaign.status != RUNNING:
            return self.settings.campaigns.settle_seconds if live else None
        now = utcnow()
        if campaign.ends_at is not None and now >= campaign.ends_at:
            await self.store.expire(campaign.id)
            if not live and await self.store.complete_if_done(campaign.id):
                return None
            return self.settings.campaigns.settle_seconds
        if campaign.starts_at is not None and now < campaign.starts_at:
            return min((campaign.starts_at - now).total_seconds(), MAX_SLEEP_SECONDS)
        if self._held.get(campaign.id, float("inf")) <= self._clock():
            del self._held[campaign.id]
        if campaign.held_until is not None and now < campaign.held_until:  # Ultravox's Retry-After
            settle = self.settings.campaigns.settle_seconds
            return min((campaign.held_until - now).total_seconds(), settle if live else MAX_SLEEP_SECONDS)
        room = min(spec.max_concurrency - live, await self._account_room())
        if room <= 0:
            return self.settings.campaigns.settle_seconds
        rate = spec.calls_per_second * campaign.pace
        burst = max(1, math.floor(rate * TICK_SECONDS))
        window = spec.opening
        limit = min(room, burst)
        rows = await self.store.claim(campaign.id, limit=limit, scan=max(50, 4 * limit),
                                      not_before=lambda row: window.opens_at(now, row.timezones) if window.spans else None)
        if not rows:
            if not live and await self.store.complete_if_done(campaign.id):
                log.info("campaign %s: completed", campaign.id)
                return None
            due = await self.store.next_due(campaign.id)
            wait = MAX_SLEEP_SECONDS if due is None else (due - utcnow()).total_seconds()
            return max(0.05, min(wait, self.settings.campaigns.settle_seconds if live else MAX_SLEEP_SECONDS))
        started = self._clock()
        placing = []
        for index, row in enumerate(rows):
            pause = started + index / rate - self._clock()
            if pause > 0:
                await asyncio.sleep(pause)
            if self._held.get(campaign.id, 0.0) > self._clock():  # refused meanwhile: the rest wait too
                await self._settled(campaign.id, [(later, RowChange(PENDING, "held off: Ultravox was over capacity",
                                                                    due_at=utcnow(), give_back=True))
                                                  for later in rows[index:]])
                break
            placing.append(asyncio.create_task(self._place(spec, row)))
        await asyncio.gather(*placing)
        if campaign.pace < 1.0:  # recovering from a refusal (not raised while a new hold is on)
            await self.store.speed_up(campaign.id, step=PACE_STEP)
        return max(0.0, started + len(rows) / rate - self._clock())

    async def opt_out(self, ultravox_call_id: str, reason: str) -> OptOut | None:
        """The callee of the call the gateway placed under `ultravox_call_id` asked not to be
        called again: its number joins the suppression list (None: no such outbound call)."""
        call = await self.calls.find_by_ultravox_call_id(ultravox_call_id) if ultravox_call_id else None
        if call is None or call.direction != "outbound":
            return None
        added = await self.store.suppress([call.to_number], reason=reason or "asked on the call", source="opt-out")
        log.info("outbound %s: the callee opted out (%s)", call.id, "added" if added else "already listed")
        return OptOut(call, bool(added))

    async def over_capacity(self, call: CallRecord, retry_after: float | None) -> None:
        """Ultravox refused the agent of `call` with 429/503: if it is a campaign's, the campaign
        holds off for Retry-After and slows down (in its row, so every replica does)."""
        if call.api_key_id != CAMPAIGN_KEY_ID or not call.idempotency_key:
            return
        campaign_id = campaign_of_attempt(call.idempotency_key)
        hold = min(MAX_HOLD_SECONDS, DEFAULT_HOLD_SECONDS if retry_after is None else retry_after)
        self._held[campaign_id] = self._clock() + hold
        self._on_capacity_refusal(campaign_id)
        await self.store.back_off(campaign_id, until=utcnow() + dt.timedelta(seconds=hold), factor=BACK_OFF_FACTOR,
                                  floor=PACE_FLOOR)
        log.warning("campaign %s: Ultravox is over capacity; holding off %.1fs and slowing down", campaign_id, hold)

    async def _account_room(self) -> int:
        """Calls the account can still take with `inbound_headroom` kept free (no limit: unbounded).
        The limit is `account_concurrency`, else (with a headroom to keep) the allowedConcurrentCalls
        Ultravox states for the account; live are the calls in the store, or Ultravox's activeCalls
        if more (the account's calls made elsewhere count too)."""
        limits = self.settings.campaigns
        allowed, active = limits.account_concurrency or None, 0
        if allowed is None and limits.inbound_headroom:
            capacity = await self._account_capacity()
            if capacity is not None:
                allowed, active = capacity.allowed, capacity.active
        if allowed is None:
            return 1_000_000
        live = sum(count for _, _, count in await self.calls.live_calls(utcnow() - dt.timedelta(hours=12)))
        return allowed - limits.inbound_headroom - max(live, active)

    async def _account_capacity(self) -> AccountCapacity | None:
        """Ultravox's word on the account, read at most every ACCOUNT_READ_SECONDS (None: not known)."""
        read_at, capacity = self._capacity
        if self._clock() - read_at < ACCOUNT_READ_SECONDS:
            return capacity
        try:
            capacity = await self.outbound.ultravox.account_capacity(deadline=self._clock() + PLACE_DEADLINE_SECONDS)
        except UltravoxError as error:
            log.warning("campaigns: Ultravox's account limit not read (%s); inbound_headroom not applied", error.reason)
            capacity = None
        self._capacity = (self._clock(), capacity)
        return capacity

    async def _place(self, spec: CampaignSpec, row: RowRecord) -> None:
        request = spec.dial_request(row, row.attempts, row.position)
        try:
            record, _ = await self.outbound.dial(request, api_key_id=CAMPAIGN_KEY_ID, idempotency_key=row.attempt_key,
                                                 paced=True)
        except DialRejected as rejection:
            await self._settled(row.campaign_id, [(row, RowChange(REJECTED, rejection.reason))])
            return
        except Exception:
            # Left dialing: the next run finds the attempt's call by its key, or dials it again under it.
            log.exception("campaign %s row %d: dialling failed unexpectedly", row.campaign_id, row.position)
            return
        await self.store.attach_call(row, record.id)

    async def _settle(self, campaign: CampaignRecord, spec: CampaignSpec) -> int:
        """What the attempts under way came to; returns how many are still live."""
        changes: list[tuple[RowRecord, RowChange]] = []
        redial: list[RowRecord] = []
        live = 0
        now = utcnow()
        for attempt in await self.store.attempts(campaign.id):
            if attempt.call is not None and attempt.row.call_id is None:  # its dialler died before noting it
                await self.store.attach_call(attempt.row, attempt.call.id)
            change = self._outcome(campaign, spec, attempt, now)
            if change is not None:
                changes.append((attempt.row, change))
                continue
            live += 1
            claimed_at = attempt.row.claimed_at
            # A dialing row whose call is not recorded this long after its claim was left by a dead process.
            redial_after = PLACE_DEADLINE_SECONDS + self.settings.campaigns.redial_margin_seconds
            if attempt.call is None and claimed_at and now - claimed_at > dt.timedelta(seconds=redial_after):
                redial.append(attempt.row)
        if changes:
            await self._settled(campaign.id, changes)
        for row in redial:  # never recorded, so never dialled: the same attempt, under its key
            log.warning("campaign %s row %d: attempt %d left unrecorded by a stopped process; placing it",
                        campaign.id, row.position, row.attempts)
            await self._place(spec, row)
        return live

    def _outcome(self, campaign: CampaignRecord, spec: CampaignSpec, attempt: Attempt, now: dt.datetime) -> RowChange | None:
        call = attempt.call
        if call is None or not call.is_final:
            return None
        status = call.status
        if status == statuses.FAILED and call.failure_reason == ABANDONED_UNPLACED:
            return RowChange(status, "the gateway stopped while placing the call; not retried (it may have rung)")
        if status == statuses.FAILED and call.failure_reason == ULTRAVOX_OVER_CAPACITY:
            return RowChange(PENDING, f"attempt {attempt.row.attempts}: Ultravox was over capacity; dialled again, "
                             "not counted", due_at=now, give_back=True)
        if status == statuses.FAILED and call.failure_reason == NEVER_PLACED:
            return RowChange(PENDING, f"attempt {attempt.row.attempts} never placed (the gateway stopped); "
                             "dialled again, not counted", due_at=now, give_back=True)
        rule = spec.retry.get(cast(RETRYABLE, status))  # a status that is not RETRYABLE finds no rule
        if rule is not None and attempt.row.attempts < rule.attempts and campaign.status != CANCELED:
            return RowChange(PENDING, f"attempt {attempt.row.attempts}: {status}",
                             due_at=now + dt.timedelta(seconds=rule.delay_seconds))
        return RowChange(status, call.failure_reason or call.end_reason)

    async def _settled(self, campaign_id: str, changes: list[tuple[RowRecord, RowChange]]) -> None:
        await self.store.settle(changes)
        for _, change in changes:
            self._on_row_outcome(campaign_id, change.status)


TERMINAL_CAMPAIGN = (CANCELED, COMPLETED)
