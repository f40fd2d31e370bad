"""Outbound calls: check the dial policy, place the call once, connect the agent when answered."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import numbers, statuses
from ..carriers import CarrierName
from ..carriers.base import Carrier, MachineDetection, MachineVerdict, OutboundDial, PlacedCallQuery, Webhook
from ..http import RemoteError
from ..logs import bind, bind_call
from ..settings import RouteSettings, Settings, VoicemailPolicy
from ..store import CallRecord, CallStore, CallUpdate
from ..ultravox import CreatedCall, UltravoxClient, UltravoxError
from ..store.calls import utcnow
from ..tools import LEAVE_VOICEMAIL, opt_out_tools, voicemail_tool
from ..urls import Urls
from ..work import Work
from .call_request import CallBodies, CallIdentity
from .connect import Connector

log = logging.getLogger("gateway.outbound")

RATE_WINDOW_SECONDS = 60
# Inline `call` fields an API client may set. Anything else (tools, callbacks, data connections,
# media) could let a call reach numbers or hosts outside the dial policy.
INLINE_CALL_FIELDS = {
    "systemPrompt", "model", "voice", "temperature", "languageHint", "timeExceededMessage",
    "inactivityMessages", "recordingEnabled", "vadSettings",
}
# Time to place the call with the carrier or Ultravox before the API request gives up.
PLACE_DEADLINE_SECONDS = 10.0
# An answer webhook is the carrier's request like an inbound one: same budget.
POLL_SECONDS = 0.05
# Carriers that dial straight into the stream: the Ultravox call waits this long past the ring
# timeout for the callee's audio before ending unjoined.
JOIN_MARGIN_SECONDS = 30
# A dial request gives up after PLACE_DEADLINE_SECONDS; a record older than this with no outcome
# was left by a process that died placing it.
ABANDONED_AFTER_SECONDS = PLACE_DEADLINE_SECONDS + 20
SWEEP_SECONDS = 30.0
# Why such a call failed: the carrier may or may not have dialled it (a campaign never retries it).
ABANDONED_UNPLACED = "the gateway stopped while placing the call"
# ... and why when the carrier, asked, has no such call: it never dialled (a campaign dials the row
# again, without counting the attempt).
NEVER_PLACED = "the gateway stopped before the carrier placed the call"
# Why a call failed when Ultravox refused to create its agent call with 429/503 (over capacity):
# a campaign dials such a row again later without counting the attempt.
ULTRAVOX_OVER_CAPACITY = "Ultravox was over capacity (429/503)"
# A carrier that does not answer the question this long after the dial: the call is failed as
# ABANDONED_UNPLACED (it may have rung), never placed again.
LOOKUP_GIVE_UP_SECONDS = ABANDONED_AFTER_SECONDS + 300
# A dial reaches the carrier within its deadline of its record; a minute more covers the carrier's
# clock (a call of the carrier's created later is not this dial's).
DIAL_WINDOW_SECONDS = PLACE_DEADLINE_SECONDS + 60


@dataclass(frozen=True)
class AbandonedOutboundSweep:
    """Periodic durable work: outbound calls a dead process left unplaced or unjoined."""


class DialRequest(BaseModel):
    """Body of POST /v1/calls."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: str = Field(description="Number to call, E.164 (+15551234567)", json_schema_extra=numbers.E164_SCHEMA)
    from_: str | None = Field(default=None, alias="from", description="One of the deployment's numbers for the carrier",
                              json_schema_extra=numbers.E164_SCHEMA)
    carrier: CarrierName | None = None
    via: Literal["carrier", "ultravox"] | None = Field(
        default=None, description="carrier: the gateway dials; ultravox: Ultravox dials with its imported credentials"
    )
    route: str | None = Field(default=None, description="Name of a configured route whose agent takes the call")
    agent_id: str | None = Field(default=None, description="An Ultravox agent id")
    call: dict[str, Any] | None = Field(default=None, description="Inline Ultravox StartCallRequest fields")
    template_context: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    answering_machine_detection: bool = False
    voicemail: VoicemailPolicy | None = Field(
        default=None, description="When a machine answers: hangup, message (the configured voicemail_message, "
        "after the greeting) or agent (the agent leaves one); implies answering_machine_detection. Default: the route's")
    max_duration: float | None = Field(default=None, gt=0, description="Seconds")
    greeting: str | None = Field(default=None, description="Said by the agent if the callee stays silent")
    opt_out_tool: bool = Field(default=False, description="Give the agent the optOutOfCalls tool: the callee "
                               "asks not to be called again, and the number is added to the suppression list")

    @field_validator("to", "from_")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        return None if value is None else numbers.e164(value)

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(("ultravox.", "gateway.")):
                raise ValueError(f"key {key!r} uses a reserved prefix (ultravox. and gateway. are reserved)")
        return value

    @field_validator("call")
    @classmethod
    def _safe_inline_call(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            refused = sorted(set(value) - INLINE_CALL_FIELDS)
            if refused:
                raise ValueError(
                    f"call may not set {', '.join(refused)}; allowed: {', '.join(sorted(INLINE_CALL_FIELDS))}"
                )
        return value

    @model_validator(mode="after")
    def _one_agent(self) -> "DialRequest":
        if sum(x is not None for x in (self.route, self.agent_id, self.call)) != 1:
            raise ValueError("give exactly one of route, agent_id or call")
        if self.detects_machines and self.via == "ultravox":
            raise ValueError("answering_machine_detection needs via=carrier (the gateway decides on answer)")
        return self

    @property
    def detects_machines(self) -> bool:
        return self.answering_machine_detection or self.voicemail is not None

    def fingerprint(self) -> str:
        asked = self.model_dump(by_alias=True)
        if not asked["opt_out_tool"]:  # as hashed before the field existed: a retry across the upgrade matches
            del asked["opt_out_tool"]
        canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class AnswerOutcome:
    join_url: str | None = None  # connect the callee to this Ultravox call
    hang_up: bool = False  # a machine answered; no agent, no apology


class DialRejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class OutboundFlow:
    def __init__(
        self,
        settings: Settings,
        store: CallStore,
        ultravox: UltravoxClient,
        carriers: dict[str, Carrier],
        carrier_http: httpx.AsyncClient,
        *,
        urls: Urls,
        bodies: CallBodies,
        connector: Connector,
        work: Work,
        clock=time.monotonic,
    ):
        self.settings = settings
        self.store = store
        self.ultravox = ultravox
        self.carriers = carriers
        self.http = carrier_http
        self.urls = urls
        self.bodies = bodies
        self.connector = connector
        self._clock = clock
        self._answering: dict[str, asyncio.Future[str | None]] = {}
        # Told when Ultravox refuses a call's agent for capacity (the call, Retry-After seconds).
        self.on_over_capacity: Callable[[CallRecord, float | None], Awaitable[None]] | None = None
        work.register(AbandonedOutboundSweep, self.settle_abandoned, every=SWEEP_SECONDS)

    async def settle_abandoned(self, _: AbandonedOutboundSweep) -> None:
        """Calls a dead process left half-made are settled, so a retry with their Idempotency-Key
        answers instead of waiting. A dial is never placed again here: the carrier may have
        accepted it just before the process died. Where the carrier can be asked, its call list
        says: the call it has is adopted (the record follows it), and with none the record fails
        as NEVER_PLACED; while it cannot tell, it is asked again at the next sweep, and past
        LOOKUP_GIVE_UP_SECONDS (or where it cannot be asked) the record fails as
        ABANDONED_UNPLACED (it may have rung).
        (An Ultravox call created for such a dial ends by itself at its joinTimeout.)"""
        now = utcnow()
        before = now - dt.timedelta(seconds=ABANDONED_AFTER_SECONDS)
        for record in await self.store.abandoned("unplaced", before=before):
            await self._settle_unplaced(record, now)
        for record in await self.store.fail_abandoned(
            "unjoined", before=before, reason="the gateway stopped while connecting the agent",
        ):
            log.warning("outbound %s: left without its agent by a stopped process; hanging up", record.id)
            if record.carrier_call_id:
                with contextlib.suppress(RemoteError):
                    await self.carriers[record.carrier].hang_up(
                        self.http, record.carrier_call_id, deadline=self._clock() + PLACE_DEADLINE_SECONDS)

    async def _settle_unplaced(self, record: CallRecord, now: dt.datetime) -> None:
        carrier = self.carriers.get(record.carrier)
        reason = ABANDONED_UNPLACED
        if record.via == "carrier" and carrier is not None and carrier.finds_placed_calls:
            settled = await self._look_up_unplaced(carrier, record, now)
            if settled is None:
                return
            reason = settled
        failed = await self.store.fail_abandoned("unplaced", before=record.created_at + dt.timedelta(seconds=1),
                                                 reason=reason, call_id=record.id)
        if failed:
            log.warning("outbound %s: left unplaced by a stopped process; failed: %s", record.id, reason)

    async def _look_up_unplaced(self, carrier: Carrier, record: CallRecord, now: dt.datetime) -> str | None:
        """Ask the carrier whether it has the call a dead process was placing: it has (the call is
        adopted) or cannot tell yet (asked again at the next sweep), None; it never placed it,
        NEVER_PLACED; no answer for too long, ABANDONED_UNPLACED."""
        query = PlacedCallQuery(record.to_number, record.from_number, record.created_at,
                                record.created_at + dt.timedelta(seconds=DIAL_WINDOW_SECONDS))
        try:
            found = await carrier.find_placed_calls(self.http, query, deadline=self._clock() + PLACE_DEADLINE_SECONDS)
        except RemoteError as error:
            return self._ask_again(record, now, f"{carrier.title} could not say whether it has the call ({error.reason})")
        known = await self.store.known_carrier_calls(
            carrier.name, [call.carrier_call_id for call in found if call.carrier_call_id])
        unrecorded = [call for call in found if call.carrier_call_id not in known]
        if not unrecorded:
            within = carrier.lists_placed_calls_within
            if within is None or now - record.created_at < dt.timedelta(seconds=within):
                return self._ask_again(record, now, f"{carrier.title}'s call list shows no such call, which does not "
                                                    "prove it never placed one")
            return NEVER_PLACED
        # The carrier names calls by their numbers and times, not by anything of the gateway's:
        # while another call between the same numbers has not learnt its carrier call id yet
        # (placing, or waiting for its first callback), the call found may be that one's.
        others = await self.store.unnamed_calls(
            record.carrier, record.from_number, record.to_number, excluding=record.id,
            abandoned_before=now - dt.timedelta(seconds=ABANDONED_AFTER_SECONDS))
        if others:
            return self._ask_again(record, now, f"{carrier.title} has a call to that number, which may be that of "
                                                f"{', '.join(other.id for other in others[:3])}")
        # The oldest call to that number that no record has: the dead process's dial.
        call = unrecorded[-1]
        adopted = CallUpdate(status=call.status, carrier_call_id=call.carrier_call_id, placed=True)
        await self.store.update(record.id, adopted)
        log.warning("outbound %s: left unplaced by a stopped process; %s has it (%s, %s): adopted",
                    record.id, carrier.title, call.carrier_call_id or "queued, named by its first callback", call.status)
        return None

    def _ask_again(self, record: CallRecord, now: dt.datetime, why: str) -> str | None:
        """None (ask again at the next sweep) while the lookup may still settle; ABANDONED_UNPLACED
        once it has not for LOOKUP_GIVE_UP_SECONDS."""
        if now - record.created_at < dt.timedelta(seconds=LOOKUP_GIVE_UP_SECONDS):
            log.warning("outbound %s: left unplaced; %s; asking again later", record.id, why)
            return None
        log.warning("outbound %s: left unplaced; %s, for too long", record.id, why)
        return ABANDONED_UNPLACED

    # --- placing the call ---------------------------------------------------------------------------
    def check(self, request: DialRequest) -> None:
        """The dial policy's verdict on `request`, without placing it: DialRejected, or None."""
        carrier_name = request.carrier or self.settings.outbound.carrier
        self._check_policy(request, carrier_name, self.carriers[carrier_name], request.via or self.settings.outbound.default_via)
        self._route(request)

    async def dial(self, request: DialRequest, *, api_key_id: str, idempotency_key: str | None,
                   paced: bool = False) -> tuple[CallRecord, bool]:
        """Record and place the call; a repeat of an idempotent request returns the first call.
        `paced`: the caller keeps its own rate (a campaign), the key's calls_per_minute does not apply."""
        carrier_name = request.carrier or self.settings.outbound.carrier
        carrier = self.carriers[carrier_name]
        via = request.via or self.settings.outbound.default_via
        from_number = self._check_policy(request, carrier_name, carrier, via)
        route = self._route(request)
        inserted = await self.store.create_outbound(
            dict(
                carrier=carrier_name,
                via=via,
                from_number=from_number,
                to_number=request.to,
                route=route.name,
                api_key_id=api_key_id,
                idempotency_key=idempotency_key,
                request_hash=request.fingerprint(),
            ),
            # The route as it is now: answering must not depend on a config reloaded meanwhile.
            request={"request": request.model_dump(by_alias=True), "route": route.model_dump()},
            max_recent=None if paced else self.settings.outbound.policy.calls_per_minute_per_key,
            window=dt.timedelta(seconds=RATE_WINDOW_SECONDS),
        )
        if inserted.rate_limited:
            raise DialRejected(429, "too many calls for this API key; try again in a minute")
        record = inserted.record
        assert record is not None  # only a rate-limited insert has none
        bind_call(record)
        deadline = self._clock() + PLACE_DEADLINE_SECONDS
        if not inserted.created:
            if record.request_hash != request.fingerprint():
                raise DialRejected(422, "Idempotency-Key was already used for a different request")
            return await self._placed(record, deadline), False
        try:
            if via == "carrier":
                record = await self._place_with_carrier(carrier, record, request, route, deadline)
            else:
                record = await self._place_with_ultravox(carrier, record, request, route, deadline)
        except BaseException as error:
            # Never leave a call `queued` forever; a retry with the key would return it forever.
            log.exception("outbound %s: placing failed unexpectedly", record.id)
            failed = CallUpdate(status=statuses.FAILED, failure_reason=type(error).__name__)
            await asyncio.shield(self.store.update(record.id, failed))
            raise
        return record, True

    async def _placed(self, record: CallRecord, deadline: float) -> CallRecord:
        """A retried request while the first one is still placing the call: wait for its outcome."""
        while record.status == statuses.QUEUED and record.placed_at is None:
            if self._clock() + POLL_SECONDS >= deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
            record = await self.store.existing(record.id)
        return record

    def _check_policy(self, request: DialRequest, carrier_name: str, carrier: Carrier, via: str) -> str:
        outbound = self.settings.outbound
        owned = outbound.numbers.get(carrier_name, [])
        from_number = request.from_ or (owned[0] if owned else None)
        if from_number is None or from_number not in owned:
            raise DialRejected(403, f"from must be one of this deployment's {carrier_name} numbers")
        policy = outbound.policy
        if not any(request.to.startswith(prefix) for prefix in policy.allowed_prefixes):
            raise DialRejected(403, "the destination is outside the allowed countries/prefixes")
        denied = next((prefix for prefix in policy.denied_prefixes if request.to.startswith(prefix)), None)
        if denied:
            raise DialRejected(403, f"destinations starting {denied} are denied by the dial policy")
        if costly := policy.costly_refusal(request.to):
            raise DialRejected(403, f"the dial policy refuses the destination: {costly}")
        if via == "ultravox" and request.route and (route := self.settings.route_named(request.route)) and route.mode == "bridge":
            raise DialRejected(422, f"route {request.route} is in bridge mode: the gateway must place the call (via=carrier)")
        if via == "ultravox" and not carrier.ultravox_can_dial:
            raise DialRejected(422, f"Ultravox cannot place {carrier.title} calls itself: use via=carrier")
        if via == "carrier" and not carrier.can_dial:
            raise DialRejected(422, f"{carrier_name} REST credentials are not configured on this gateway")
        if request.detects_machines and not carrier.detects_machines:
            raise DialRejected(422, f"answering_machine_detection is not available on {carrier.title} calls: "
                                    f"{carrier.title} reports no answering machines on the calls the gateway places")
        if not self.settings.ultravox.api_key:
            raise DialRejected(422, "ULTRAVOX_API_KEY is not configured on this gateway")
        if not self.settings.public_url:
            raise DialRejected(422, "GATEWAY_PUBLIC_URL is not configured: carriers could not call back")
        return from_number

    def _route(self, request: DialRequest) -> RouteSettings:
        if request.route is not None:
            route = self.settings.route_named(request.route)
            if route is None:
                raise DialRejected(422, f"no route named {request.route!r}")
            overrides = {}
        else:
            route = None
            overrides = {"agent_id": request.agent_id, "call": request.call}
        try:
            base: dict[str, Any] = route.model_dump() if route else {"number": "*", "name": "api"}
            base.update({k: v for k, v in overrides.items() if v is not None})
            if request.greeting is not None:
                base["greeting"] = request.greeting
            if request.max_duration is not None:
                base["max_duration_seconds"] = request.max_duration
            # Resolved now, and recorded with the call: a config reloaded meanwhile changes nothing.
            outbound = self.settings.outbound
            base["voicemail"] = request.voicemail or base.get("voicemail") or outbound.voicemail
            base["voicemail_message"] = base.get("voicemail_message") or outbound.voicemail_message
            return RouteSettings.model_validate(base)
        except ValueError as error:
            raise DialRejected(422, str(error)) from None

    async def _place_with_carrier(
        self, carrier: Carrier, record: CallRecord, request: DialRequest, route: RouteSettings, deadline: float
    ) -> CallRecord:
        ring_timeout = self.settings.outbound.ring_timeout_seconds
        stream_url = None
        if carrier.dials_into_stream:
            # The carrier streams as soon as the callee picks up: the agent must exist before it rings.
            if not await self.store.claim_agent(record.id):
                return record
            created = await self._create_agent_call(
                carrier, record, request, route, deadline, join_timeout_seconds=ring_timeout + JOIN_MARGIN_SECONDS
            )
            if created is None:
                return await self.store.existing(record.id)
            stream_url, _ = self.connector.stream_url(
                carrier, record.route, record.id, created.join_url, lifetime=ring_timeout + JOIN_MARGIN_SECONDS
            )
        dial = OutboundDial(
            to=record.to_number,
            from_=record.from_number,
            answer_url=self.urls.call_callback("outbound-answer", carrier.name, record.id),
            status_url=self.urls.call_callback("status", carrier.name, record.id),
            ring_timeout_seconds=ring_timeout,
            machine_detection=self._machine_detection(carrier, record, request, route),
            stream_url=stream_url,
        )
        try:
            carrier_call_id = await carrier.place_call(self.http, dial, deadline=deadline)
        except RemoteError as error:
            log.warning("outbound %s via %s: not placed, %s", record.id, carrier.name, error.reason)
            return (await self.store.update(record.id, CallUpdate(status=statuses.FAILED, failure_reason=error.reason))).existing
        bind(carrier_call_id=carrier_call_id)
        log.info("outbound %s placed with %s (%s)", record.id, carrier.name, carrier_call_id or "id on callback")
        placed = (await self.store.update(record.id, CallUpdate(carrier_call_id=carrier_call_id, placed=True))).existing
        if placed.is_final and carrier_call_id:  # hung up through the API while the dial was in flight
            with contextlib.suppress(RemoteError):
                await carrier.cancel(self.http, carrier_call_id, deadline=self._clock() + PLACE_DEADLINE_SECONDS)
        return placed

    def _machine_detection(self, carrier: Carrier, record: CallRecord, request: DialRequest,
                           route: RouteSettings) -> MachineDetection | None:
        """Asynchronous detection: the agent takes the call at once (a person never waits in silence
        for the verdict), and the verdict comes to machine_detected; a message is left after the
        greeting, so its machine verdict waits for the greeting's end."""
        if not request.detects_machines:
            return None
        return MachineDetection(report_url=self.urls.call_callback("machine-detection", carrier.name, record.id),
                                greeting_end=route.voicemail != "hangup")

    async def _place_with_ultravox(
        self, carrier: Carrier, record: CallRecord, request: DialRequest, route: RouteSettings, deadline: float
    ) -> CallRecord:
        medium = carrier.outgoing_medium(
            record.to_number, record.from_number, self.urls.call_callback("status", carrier.name, record.id)
        )
        call_request = self._call_request(carrier, record, request, route, medium)
        try:
            created = await self.ultravox.create_call(call_request, deadline=deadline)
        except UltravoxError as error:
            log.warning("outbound %s via Ultravox: not placed, %s", record.id, error.reason)
            return await self._ultravox_refused(record, error)
        bind(ultravox_call_id=created.call_id)
        return (await self.store.update(record.id, CallUpdate(ultravox_call_id=created.call_id, placed=True))).existing

    def _call_request(self, carrier: Carrier, record: CallRecord, request: DialRequest, route: RouteSettings,
                      medium: dict[str, Any], join_timeout_seconds: float | None = None):
        return self.bodies.for_route(
            route,
            carrier=carrier,
            identity=CallIdentity(carrier.name, record.carrier_call_id, record.id, route.name),
            medium=medium,
            webhook_params={"carrier": carrier.name, "from_number": record.from_number, "to_number": record.to_number},
            agent_speaks_first=False,
            extra_template_context=request.template_context,
            extra_metadata=request.metadata,
            join_timeout_seconds=join_timeout_seconds,
            # Told to leave a message should a machine answer (machine_detected), it needs the tool.
            extra_tools=[
                *([voicemail_tool()] if request.detects_machines and route.voicemail == "agent" else []),
                *(opt_out_tools(self.settings, self.urls) if request.opt_out_tool else []),
            ],
        )

    async def _create_agent_call(
        self, carrier: Carrier, record: CallRecord, request: DialRequest, route: RouteSettings, deadline: float,
        *, join_timeout_seconds: float | None = None,
    ) -> CreatedCall | None:
        """The Ultravox call for an outbound call (once claim_agent said so); None: failed, recorded."""
        medium = self.connector.medium(carrier, record.route, record.id)
        call_request = self._call_request(carrier, record, request, route, medium, join_timeout_seconds)
        try:
            created = await self.ultravox.create_call(call_request, deadline=deadline)
        except UltravoxError as error:
            log.warning("outbound %s: no agent, %s", record.id, error.reason)
            await self._ultravox_refused(record, error)
            return None
        bind(ultravox_call_id=created.call_id)
        await self.store.update(record.id, CallUpdate(ultravox_call_id=created.call_id, join_url=created.join_url))
        return created

    async def _ultravox_refused(self, record: CallRecord, error: UltravoxError) -> CallRecord:
        """The call failed for want of its Ultravox call; a refusal for capacity is told on."""
        reason = ULTRAVOX_OVER_CAPACITY if error.over_capacity else error.reason
        failed = (await self.store.update(record.id, CallUpdate(status=statuses.FAILED, failure_reason=reason))).existing
        if error.over_capacity and self.on_over_capacity is not None:
            try:
                await self.on_over_capacity(failed, error.retry_after)
            except Exception:
                log.exception("outbound %s: telling of Ultravox's capacity failed", record.id)
        return failed

    # --- carrier callbacks --------------------------------------------------------------------------
    async def answer(self, carrier: Carrier, webhook: Webhook, call_id: str, deadline: float) -> str:
        """XML for the callee who just picked up: the agent, a hangup for a machine, or the apology."""
        record = await self.store.get(call_id)
        if record is None or record.via != "carrier" or record.carrier != carrier.name:
            log.warning("%s answer webhook for a call the gateway did not place: %r", carrier.name, call_id)
            return carrier.hangup_answer()
        bind_call(record)
        pending = self._answering.get(call_id)
        if pending is not None:  # the carrier retried while the first delivery is still working
            join_url = await asyncio.shield(pending)
            return await self._connect(carrier, record, join_url) if join_url else self._apology(carrier)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._answering[call_id] = future
        outcome = AnswerOutcome()
        try:
            outcome = await self._connect_answered(carrier, webhook, record, deadline)
        except BaseException as error:
            # The deadline or a bug: the callee hears the apology, the record says why.
            reason = "deadline reached" if isinstance(error, asyncio.CancelledError) else type(error).__name__
            await asyncio.shield(self.store.update(record.id, CallUpdate(status=statuses.FAILED, failure_reason=reason)))
            raise
        finally:
            future.set_result(outcome.join_url)
            del self._answering[call_id]
        if outcome.hang_up:
            return carrier.hangup_answer()
        if not outcome.join_url:
            return self._apology(carrier)
        return await self._connect(carrier, record, outcome.join_url)

    async def _connect(self, carrier: Carrier, record: CallRecord, join_url: str) -> str:
        return self.connector.record_answer(carrier, record, join_url)

    async def _connect_answered(
        self, carrier: Carrier, webhook: Webhook, record: CallRecord, deadline: float
    ) -> AnswerOutcome:
        answered = carrier.parse_answer(webhook)
        bind(carrier_call_id=answered.carrier_call_id)
        stored = record.request
        assert stored is not None  # every outbound call records what it was asked
        request = DialRequest.model_validate(stored["request"])
        if request.detects_machines and answered.machine:
            await self.store.update(record.id, CallUpdate(status=statuses.MACHINE_DETECTED, answered_by="machine",
                                                          carrier_call_id=answered.carrier_call_id))
            return AnswerOutcome(hang_up=True)
        answered_now = CallUpdate(status=statuses.ANSWERED, carrier_call_id=answered.carrier_call_id)
        record = (await self.store.update(record.id, answered_now)).existing
        if record.is_final:  # canceled or failed meanwhile: nobody to connect
            return AnswerOutcome(hang_up=True)
        if not await self.store.claim_agent(record.id):
            # A repeated answer webhook, maybe on another replica: hand back the same join URL.
            return AnswerOutcome(join_url=await self._join_url_of(record.id, deadline))
        route = RouteSettings.model_validate(stored["route"])
        created = await self._create_agent_call(carrier, record, request, route, deadline - 0.3)
        if created is None:
            return AnswerOutcome()
        await self.store.update(record.id, CallUpdate(status=statuses.IN_PROGRESS))
        return AnswerOutcome(join_url=created.join_url)

    # --- answering machines --------------------------------------------------------------------------
    async def machine_detected(self, carrier: Carrier, verdict: MachineVerdict, call_id: str) -> None:
        """Answering-machine detection's verdict on a call the gateway placed: recorded, and for a
        machine the call's voicemail policy, once however often the verdict is delivered."""
        record = await self.store.get(call_id)
        if record is None or record.via != "carrier" or record.carrier != carrier.name or record.request is None:
            return
        bind_call(record)
        carrier_call_id = record.carrier_call_id or verdict.carrier_call_id
        noted = CallUpdate(answered_by=verdict.answered_by, carrier_call_id=carrier_call_id)
        request = DialRequest.model_validate(record.request["request"])
        if not verdict.machine or not request.detects_machines:
            await self.store.update(record.id, noted)
            return
        route = RouteSettings.model_validate(record.request["route"])
        # A fax takes no message (nor does a call placed before voicemail policies were recorded).
        policy = (route.voicemail or "hangup") if verdict.answered_by == statuses.MACHINE else "hangup"
        if policy != "hangup" and carrier.reports_greeting_end and not verdict.greeting_ended:
            await self.store.update(record.id, noted)  # still greeting: the verdict at its end acts
            return
        # The one delivery whose update moves the call on acts on it.
        status = statuses.VOICEMAIL_LEFT if policy == "agent" else statuses.MACHINE_DETECTED
        changed = await self.store.update(record.id, CallUpdate(
            status=status, answered_by=verdict.answered_by, carrier_call_id=carrier_call_id))
        if not changed.advanced or not carrier_call_id:
            return
        log.info("outbound %s: a %s answered; voicemail policy %s", record.id, verdict.answered_by, policy)
        if policy == "message":
            # The call fetches voicemail_answer (and the agent's stream ends with the redirect).
            await self._carrier_does(carrier.redirect, carrier, record, carrier_call_id,
                                     self.urls.call_callback("voicemail", carrier.name, record.id))
        elif policy == "agent" and await self._agent_leaves_voicemail(changed.existing, verdict):
            return
        else:
            await self._carrier_does(carrier.hang_up, carrier, record, carrier_call_id)

    async def _agent_leaves_voicemail(self, record: CallRecord, verdict: MachineVerdict) -> bool:
        """Tell the call's agent to leave its message with Ultravox's leaveVoicemail (which then ends
        the call); False when it cannot be told."""
        when = "Its greeting is over: leave" if verdict.greeting_ended else "As soon as its greeting ends, leave"
        text = (f"(An answering machine took this call, not a person. {when} a short voicemail: call the "
                f"{LEAVE_VOICEMAIL} tool with a brief message saying who you are, why you called and how to "
                "reach you back. Do not wait for an answer.)")
        if not record.ultravox_call_id:
            return False
        try:
            await self.ultravox.tell_agent(record.ultravox_call_id, text,
                                           deadline=self._clock() + PLACE_DEADLINE_SECONDS)
        except UltravoxError as error:
            log.warning("outbound %s: the agent could not be told to leave a voicemail (%s); hanging up",
                        record.id, error.reason)
            return False
        return True

    async def _carrier_does(self, action, carrier: Carrier, record: CallRecord, carrier_call_id: str, *args) -> None:
        try:
            await action(self.http, carrier_call_id, *args, deadline=self._clock() + PLACE_DEADLINE_SECONDS)
        except RemoteError as error:
            log.warning("outbound %s: %s refused to act on the answering machine: %s", record.id, carrier.title,
                        error.reason)

    async def voicemail_answer(self, carrier: Carrier, call_id: str) -> str:
        """The call an answering machine took, moved here by voicemail policy "message": the message."""
        record = await self.store.get(call_id)
        if record is None or record.via != "carrier" or record.carrier != carrier.name or record.request is None:
            return carrier.hangup_answer()
        bind_call(record)
        route = RouteSettings.model_validate(record.request["route"])
        await self.store.update(record.id, CallUpdate(status=statuses.VOICEMAIL_LEFT))
        return carrier.voicemail_answer(route.voicemail_message or self.settings.outbound.voicemail_message)

    async def _join_url_of(self, call_id: str, deadline: float) -> str | None:
        while self._clock() + POLL_SECONDS < deadline:
            record = await self.store.existing(call_id)
            if record.join_url or record.is_final:
                return record.join_url
            await asyncio.sleep(POLL_SECONDS)
        return None

    def _apology(self, carrier: Carrier) -> str:
        return carrier.apology_answer(self.settings.fallback.message, None)
