"""Operator transfers: the model names an operator, the gateway moves the live carrier call.

Cold: the caller's call runs <Dial> to the operator; the dial's action callback says how it ended.
Warm: the caller waits in a conference while the operator is called, briefed and asked to press 1.
Whenever no person takes the caller (no answer, busy, declined, voicemail, carrier error), the
caller goes back to the agent in a new Ultravox call continuing the old one (priorCallId).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable, Mapping

import httpx

from .. import statuses
from ..carriers.base import Carrier, OutboundDial, Webhook, carrier_leg
from ..http import RemoteError
from ..logs import bind, bind_call
from ..settings import Settings
from ..store import CallRecord, CallStore, CallUpdate, TransferRecord, TransferStore
from ..store import transfers as status
from ..store.transfers import TransferChange, TransferExpectation
from ..store.calls import utcnow
from ..ultravox import UltravoxClient, UltravoxError
from ..urls import Urls
from ..work import Work
from .call_request import CallBodies
from .connect import Connector

log = logging.getLogger("gateway.transfer")

CARRIER_WORK_SECONDS = 10.0  # a redirect or an operator call, in the background
BRIEFING_SECONDS = 30  # time to speak a reason and a summary
LEG_MARGIN_SECONDS = 15


MAX_REASON = 500
MAX_SUMMARY = 1000


@dataclass(frozen=True)
class TransferRequest:
    """A transfer asked for by the agent's tool or through the call-control API."""

    kind: str  # cold | warm
    operator: str
    reason: str
    summary: str | None


@dataclass(frozen=True)
class ToolInvocation:
    """What Ultravox sends when the model uses a transfer tool."""

    ultravox_call_id: str
    request: TransferRequest

    @classmethod
    def of(cls, kind: str, payload: Mapping[str, Any]) -> "ToolInvocation":
        return cls(str(payload.get("callId") or ""), TransferRequest(
            kind=kind,
            operator=str(payload.get("operator") or ""),
            reason=str(payload.get("reason") or "").strip()[:MAX_REASON],
            summary=str(payload.get("summary") or "").strip()[:MAX_SUMMARY] or None,
        ))


class Refusal(StrEnum):
    """Why a transfer was not started."""

    NOT_CONNECTED = "not-connected"  # ended, or no live carrier leg (yet)
    CARRIER_CANNOT = "carrier-cannot"  # the call's carrier cannot move a live call
    UNKNOWN_OPERATOR = "unknown-operator"  # not one the call's route allows
    MISSING_DETAILS = "missing-details"  # no reason, or a warm transfer without a summary
    OPERATOR_CLOSED = "operator-closed"  # outside its hours, and every fallback too
    UNDER_WAY = "under-way"  # the call already has a transfer in progress


@dataclass(frozen=True)
class TransferOutcome:
    """What became of a transfer request: started (`transfer`), or refused and why."""

    transfer: TransferRecord | None = None
    refusal: Refusal | None = None
    allowed: tuple[str, ...] = ()  # UNKNOWN_OPERATOR: the operators the call's route allows
    detail: str = ""  # MISSING_DETAILS: what is missing; OPERATOR_CLOSED: the operator's hours


@dataclass(frozen=True)
class TransferStep:
    """A callback of a transfer, served on its own route (transfer-{name}) by TransferFlow.{handler}:
    (carrier, transfer, leg, webhook) -> the carrier's answer (None for reports)."""

    name: str
    handler: str
    operator_leg: bool = False  # about the operator's phone (else the caller's)
    event: bool = False  # a report, not a fetch of call instructions


TRANSFER_STEPS = (
    TransferStep("dial", "fetch_dial"),
    TransferStep("hold", "fetch_hold"),
    TransferStep("music", "fetch_music"),
    TransferStep("return", "fetch_return"),
    TransferStep("caller-left", "caller_left"),
    TransferStep("result", "dial_result"),
    TransferStep("whisper", "whisper", operator_leg=True),
    TransferStep("brief", "brief", operator_leg=True),
    TransferStep("accept", "accept", operator_leg=True),
    TransferStep("operator-status", "operator_status", operator_leg=True, event=True),
)


@dataclass(frozen=True)
class TransferStart:
    """Durable work: move the caller for a transfer the tool has just accepted."""

    transfer_id: str


@dataclass(frozen=True)
class OperatorLegUnavailable:
    """Durable work: an operator's leg will not take the caller (it declined, hung up, reached
    voicemail, or reported nothing by its deadline): the next operator, else back to the agent."""

    transfer_id: str
    leg: int
    why: str = ""  # empty: the leg's deadline passed


@dataclass(frozen=True)
class ToolReply:
    """What the transfer tool answers Ultravox: words for the model and how it should react."""

    text: str
    reaction: str = "speaks"  # X-Ultravox-Agent-Reaction: speaks | listens
    status: int = 200


class TransferFlow:
    def __init__(
        self,
        settings: Settings,
        calls: CallStore,
        transfers: TransferStore,
        ultravox: UltravoxClient,
        carriers: dict[str, Carrier],
        carrier_http: httpx.AsyncClient,
        *,
        work: Work,
        urls: Urls,
        bodies: CallBodies,
        connector: Connector,
        on_outcome: Callable[[TransferRecord], None] = lambda transfer: None,
        clock=time.monotonic,
        now=utcnow,
    ):
        self.settings = settings
        self.calls = calls
        self.transfers = transfers
        self.ultravox = ultravox
        self.carriers = carriers
        self.http = carrier_http
        self.urls = urls
        self.bodies = bodies
        self.connector = connector
        self.on_outcome = on_outcome
        self._clock = clock
        self._now = now
        # What happens after a tool reply or a callback's answer is durable work, not a task: if
        # this process dies, another one does it (a caller on hold is never forgotten).
        self.work = work
        work.register(TransferStart, self._start)
        work.register(OperatorLegUnavailable, self._leg_unavailable)

    # --- starting a transfer: the agent's tool and the call-control API -----------------------------
    async def invoke(self, invocation: ToolInvocation) -> ToolReply:
        """The tool: check the request, start the transfer in the background, answer within the tool timeout."""
        bind(ultravox_call_id=invocation.ultravox_call_id)
        record = await self.calls.find_by_ultravox_call_id(invocation.ultravox_call_id)
        if record is None:
            return ToolReply("I can't transfer this call: the phone gateway doesn't know it.")
        bind_call(record)
        return _tool_reply(invocation.request, await self.begin(record, invocation.request))

    async def begin(self, record: CallRecord, request: TransferRequest) -> TransferOutcome:
        """Start `request` for the call, unless something stands in the way; the carrier work is durable
        and happens after this returns."""
        if record.is_final or not record.carrier_call_id or not statuses.is_answered(record.status):
            return TransferOutcome(refusal=Refusal.NOT_CONNECTED)
        if not self.carriers[record.carrier].can_transfer:
            return TransferOutcome(refusal=Refusal.CARRIER_CANNOT)
        allowed = tuple(self._allowed_operators(record))
        if request.operator not in allowed:
            return TransferOutcome(refusal=Refusal.UNKNOWN_OPERATOR, allowed=allowed)
        if not request.reason or (request.kind == "warm" and not request.summary):
            missing = "a reason" if not request.reason else "a summary for the person"
            return TransferOutcome(refusal=Refusal.MISSING_DETAILS, detail=missing)
        operator = self._first_open(request.operator, tried=())
        if operator is None:
            return TransferOutcome(refusal=Refusal.OPERATOR_CLOSED, detail=self._hours(request.operator))
        transfer = await self.transfers.start(
            call_id=record.id, kind=request.kind, operator=operator, reason=request.reason, summary=request.summary,
            prior_ultravox_call_id=record.ultravox_call_id,
            then=lambda transfer_id: self.work.job(TransferStart(transfer_id)),
        )
        if transfer is None:
            return TransferOutcome(refusal=Refusal.UNDER_WAY)
        bind(transfer_id=transfer.id)
        self.work.wake()
        log.info("call %s: %s transfer %s to %s", record.id, request.kind, transfer.id, operator)
        return TransferOutcome(transfer=transfer)

    def _allowed_operators(self, record: CallRecord) -> list[str]:
        route = self.settings.route_named(record.route) if record.route else None
        return list(route.operators) if route else []

    def _first_open(self, name: str | None, *, tried: tuple[str, ...]) -> str | None:
        """`name` if open and not tried yet, else the first such operator down its fallback chain."""
        now = self._now()
        while name is not None:
            operator = self.settings.operators[name]
            if name not in tried and operator.is_open(now):
                return name
            name = operator.fallback
        return None

    def _hours(self, name: str) -> str:
        operator = self.settings.operators[name]
        return f"open {', '.join(operator.hours)} {operator.timezone}" if operator.hours else "not answering"

    async def _start(self, job: TransferStart) -> None:
        transfer = await self.transfers.get(job.transfer_id)
        if transfer is None or transfer.status != status.REQUESTED:
            return  # started already (this job ran before, in a process that died after starting it)
        record = await self.calls.existing(transfer.call_id)
        bind_call(record)
        start = self._start_cold if transfer.kind == "cold" else self._start_warm
        await start(transfer, record)

    async def _leg_unavailable(self, job: OperatorLegUnavailable) -> None:
        transfer = await self.transfers.get(job.transfer_id)
        if transfer is None or transfer.is_final or transfer.leg != job.leg:
            return  # the leg was settled already: accepted, or moved on by an earlier event
        record = await self.calls.existing(transfer.call_id)
        bind_call(record)
        why = job.why or f"{transfer.operator} did not pick up in time"
        await self._operator_unavailable(self.carriers[record.carrier], transfer, job.leg, why)

    async def _leg_is_a_no(self, transfer: TransferRecord, leg: int, why: str) -> None:
        await self.work.schedule(OperatorLegUnavailable(transfer.id, leg, why))

    def _leg_deadline(self, transfer_id: str, leg: int, seconds: float):
        """The durable timer after which leg `leg` counts as a no; one per leg (the first armed stands)."""
        return self.work.job(OperatorLegUnavailable(transfer_id, leg), delay=seconds,
                             key=f"transfer-leg-deadline:{transfer_id}:{leg}")

    # --- cold -------------------------------------------------------------------------------------
    async def _start_cold(self, transfer: TransferRecord, record: CallRecord) -> None:
        carrier = self.carriers[record.carrier]
        if await self._move_caller(carrier, transfer, record, "dial"):
            await self.transfers.update(transfer.id, TransferChange(status=status.DIALING),
                                        expect=TransferExpectation(status=status.REQUESTED))

    async def dial_result(self, carrier: Carrier, transfer: TransferRecord, attempt: int | None, webhook: Webhook) -> str:
        """The <Dial> to the operator ended: done if they answered, else the next operator or the agent."""
        result = carrier.parse_dial_result(webhook)
        if transfer.is_final or transfer.status == status.RETURNING:  # a repeated callback
            return await self._after_final(carrier, transfer)
        if attempt != len(transfer.tried) - 1:
            # About an earlier operator's dial (the carrier repeating itself): the next dial is already chosen.
            return self._dial_answer(carrier, transfer, say=None)
        if result.answered:
            # The operator talked with the caller; the <Dial> ends when one of them hangs up.
            await self._finish(transfer, status.CONNECTED, "answered")
            await self.transfers.mark_ended(transfer.id)
            await self.calls.update(transfer.call_id, CallUpdate(status=statuses.COMPLETED))
            return carrier.hangup_answer()
        if result.caller_gone:
            await self._finish(transfer, status.FAILED, "the caller hung up while the operator's phone rang")
            await self.calls.update(transfer.call_id, CallUpdate(status=statuses.COMPLETED))
            return carrier.hangup_answer()
        why = f"{transfer.operator} did not answer ({result.status})"
        following = self._first_open(transfer.operator, tried=transfer.tried)
        if following is not None:
            # Compare-and-set on the operator: a repeated callback must not skip one down the chain.
            moved = await self.transfers.update(
                transfer.id, TransferChange(operator=following, tried=(*transfer.tried, following), outcome=why),
                expect=TransferExpectation(tried=transfer.tried),
            )
            if moved is None:  # the same callback, delivered twice at once: answer as the other delivery
                current = await self.transfers.existing(transfer.id)
                if current.is_final or current.status == status.RETURNING:
                    return await self._after_final(carrier, current)
                return self._dial_answer(carrier, current, say=None)
            return self._dial_answer(carrier, moved, say=None)
        return await self._return_to_agent(carrier, transfer, why)

    def _dial_answer(self, carrier: Carrier, transfer: TransferRecord, *, say: str | None) -> str:
        operator = self.settings.operators[transfer.operator]
        # The action URL names which attempt it reports on, so a late repeat is recognised.
        action_url = self.url(carrier, "result", transfer.id, leg=len(transfer.tried) - 1)
        return carrier.dial_answer(
            say=say, target=operator.target, action_url=action_url,
            ring_timeout=operator.ring_timeout_seconds, caller_id=operator.caller_id,
        )

    # --- warm -------------------------------------------------------------------------------------
    async def _start_warm(self, transfer: TransferRecord, record: CallRecord) -> None:
        carrier = self.carriers[record.carrier]
        if await self._move_caller(carrier, transfer, record, "hold"):
            await self._call_operator(carrier, transfer, record)

    async def _call_operator(self, carrier: Carrier, transfer: TransferRecord, record: CallRecord) -> None:
        operator = self.settings.operators[transfer.operator]
        leg = transfer.leg
        dial = OutboundDial(
            to=operator.target,
            # The operator sees the line the caller called (inbound) or the one the gateway dialled from.
            from_=operator.caller_id or (record.to_number if record.direction == "inbound" else record.from_number),
            answer_url=self.url(carrier, "whisper", transfer.id, leg=leg),
            status_url=self.url(carrier, "operator-status", transfer.id, leg=leg),
            ring_timeout_seconds=operator.ring_timeout_seconds,
            # No answering-machine detection: it would keep the operator in silence while it listens.
            # A voicemail is kept from the briefing by the key press it never makes (see whisper).
        )
        # If no event about this leg ever comes (a lost callback, a carrier outage, this process
        # dying), the caller must not wait on hold for ever: past its deadline the leg counts as a no.
        await self.work.add(self._leg_deadline(transfer.id, leg, self.leg_deadline_seconds(transfer.operator)))
        try:
            leg_id = await carrier.place_call(self.http, dial, deadline=self._clock() + CARRIER_WORK_SECONDS)
        except Exception as error:
            reason = error.reason if isinstance(error, RemoteError) else type(error).__name__
            await self._operator_unavailable(carrier, transfer, leg, f"{transfer.operator} could not be called: {reason}")
            return
        placed = await self.transfers.update(transfer.id, TransferChange(status=status.DIALING, operator_leg_id=leg_id),
                                             expect=TransferExpectation(leg=leg))
        if placed is None and leg_id:
            # The caller left (or the transfer moved on) while this operator was being called.
            with contextlib.suppress(RemoteError):
                await carrier.hang_up(self.http, leg_id, deadline=self._clock() + CARRIER_WORK_SECONDS)

    def leg_deadline_seconds(self, operator_name: str) -> float:
        """How long an operator's leg may go without settling: ringing, the two key presses (to
        hear the briefing, to take the call) with the briefing between, plus a margin; or the
        configured [transfer] leg_timeout_seconds."""
        configured = self.settings.transfer.leg_timeout_seconds
        if configured is not None:
            return configured
        operator = self.settings.operators[operator_name]
        return (operator.ring_timeout_seconds + BRIEFING_SECONDS
                + 2 * self.settings.transfer.accept_timeout_seconds + LEG_MARGIN_SECONDS)

    async def whisper(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> str:
        """The operator's phone was picked up: ask for a key press before a word of the briefing.
        A voicemail never presses one, so it records no reason and no summary, and a person is
        never kept in silence while answering-machine detection listens."""
        if transfer.is_final or leg != transfer.leg:
            return carrier.hangup_answer()
        answered = carrier.parse_answer(webhook)
        if answered.carrier_call_id:  # the leg's own id, to hang it up if the caller leaves
            await self.transfers.update(transfer.id, TransferChange(operator_leg_id=answered.carrier_call_id),
                                        expect=TransferExpectation(leg=leg))
        if answered.machine:  # a carrier that says so anyway
            await self._leg_is_a_no(transfer, leg, f"{transfer.operator}'s voicemail answered")
            return carrier.hangup_answer()
        return carrier.whisper_answer(
            "A caller is being transferred to you by the assistant. Press 1 to hear why.",
            accept_url=self.url(carrier, "brief", transfer.id, leg=leg),
            timeout=self.settings.transfer.accept_timeout_seconds,
        )

    async def brief(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> str:
        """A person pressed a key: if 1, the reason and summary, and a key press to take the call."""
        if (refused := await self._unless_pressed_one(carrier, transfer, leg, webhook)) is not None:
            return refused
        briefing = f"Reason: {transfer.reason}."
        if transfer.summary:
            briefing += f" Summary: {transfer.summary}"
        briefing += " Press 1 to take the call."
        return carrier.whisper_answer(
            briefing, accept_url=self.url(carrier, "accept", transfer.id, leg=leg),
            timeout=self.settings.transfer.accept_timeout_seconds,
        )

    async def _unless_pressed_one(self, carrier: Carrier, transfer: TransferRecord, leg: int,
                                  webhook: Webhook) -> str | None:
        """The hang-up for a key press of a leg that is not current, or of a key other than 1 (the
        operator declines); None when the current leg's operator pressed 1."""
        if transfer.is_final or leg != transfer.leg:
            return carrier.hangup_answer()
        if carrier.pressed_digits(webhook) != "1":
            await self._leg_is_a_no(transfer, leg, f"{transfer.operator} declined")
            return carrier.hangup_answer()
        return None

    async def accept(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> str:
        if (refused := await self._unless_pressed_one(carrier, transfer, leg, webhook)) is not None:
            return refused
        # Only if this leg is still the current one: its hang-up callback may have moved on already.
        if not await self._finish(transfer, status.CONNECTED, "accepted", expect=TransferExpectation(leg=leg)):
            return carrier.hangup_answer()
        return carrier.conference_answer(
            self.conference(transfer), say="Connecting you now.", starts=True, ends=True, wait_url=None, action_url=None,
        )

    async def operator_status(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> None:
        update = carrier.parse_status(webhook)
        if update.carrier_call_id and not transfer.is_final and leg == transfer.leg and not transfer.operator_leg_id:
            await self.transfers.update(transfer.id, TransferChange(operator_leg_id=update.carrier_call_id),
                                        expect=TransferExpectation(leg=leg))
        if update.answered_by in (statuses.MACHINE, statuses.FAX) and not transfer.is_final and leg == transfer.leg:
            # The verdict in a status callback (Telnyx TeXML, whose instructions wait for it; Plivo
            # hanging a machine up itself): the briefing is never played, the leg is ended.
            leg_id = update.carrier_call_id or transfer.operator_leg_id
            if leg_id:
                with contextlib.suppress(RemoteError):
                    await carrier.hang_up(self.http, leg_id, deadline=self._clock() + CARRIER_WORK_SECONDS)
            await self._operator_unavailable(carrier, transfer, leg, f"{transfer.operator}'s voicemail answered")
            return
        if update.status in statuses.FINAL_STATUSES and not transfer.is_final:
            # Hung up, busy, no answer…: before accepting, any end of the operator's leg is a no.
            why = f"{transfer.operator} did not take the call ({update.status})"
            await self._operator_unavailable(carrier, transfer, leg, why)

    async def operator_failed(self, carrier: Carrier, transfer: TransferRecord, leg: int | None) -> None:
        """Handling an operator-leg event failed: treat the leg as a no, as durable work."""
        if leg is not None:
            await self._leg_is_a_no(transfer, leg, f"{transfer.operator}'s leg failed")

    async def caller_left(self, carrier: Carrier, transfer: TransferRecord, leg: int | None = None,
                          webhook: Webhook | None = None) -> str:
        """The caller's conference ended for them: after the conversation, or hanging up on hold."""
        await self.calls.update(transfer.call_id, CallUpdate(status=statuses.COMPLETED))
        if transfer.status == status.CONNECTED:
            await self.transfers.mark_ended(transfer.id)
        elif not transfer.is_final:
            # The record as finished, not as read before: the operator's leg id may have arrived since.
            finished = await self._finish(transfer, status.FAILED, "the caller hung up while on hold")
            if finished and finished.operator_leg_id:  # nobody left to talk to: stop the operator's phone
                with contextlib.suppress(RemoteError):
                    await carrier.hang_up(self.http, finished.operator_leg_id, deadline=self._clock() + CARRIER_WORK_SECONDS)
        return carrier.hangup_answer()

    async def _operator_unavailable(self, carrier: Carrier, transfer: TransferRecord, leg: int, why: str) -> None:
        """The operator's leg will not take the caller: try the next operator, else back to the agent."""
        # The first event about this leg acts (a declined key press, then its hang-up callback…);
        # the later ones, and any about an older leg, find it released.
        # The next leg's deadline is armed with the move itself: should this process die before it
        # calls the next operator, the caller is not left on hold (the longest operator's deadline).
        longest = max(self.leg_deadline_seconds(name) for name in self.settings.operators)
        current = await self.transfers.release_leg(transfer.id, leg, then=self._leg_deadline(transfer.id, leg + 1, longest))
        if current is None:
            return
        self.work.wake()
        record = await self.calls.existing(transfer.call_id)
        bind_call(record)
        following = self._first_open(current.operator, tried=current.tried)
        if following is not None:
            current = await self.transfers.update(
                current.id, TransferChange(operator=following, tried=(*current.tried, following), outcome=why),
            ) or current
            await self._call_operator(carrier, current, record)
            return
        await self.transfers.update(current.id, TransferChange(outcome=why))
        try:
            await carrier.redirect(self.http, carrier_leg(record.carrier_call_id), self.url(carrier, "return", current.id),
                                   deadline=self._clock() + CARRIER_WORK_SECONDS)
        except RemoteError as error:
            # The caller hung up while waiting, or the carrier refuses: nobody left to return.
            await self._finish(current, status.FAILED, f"{why}; the caller could not be returned: {error.reason}")

    # --- moving the caller and bringing them back ---------------------------------------------------
    async def _move_caller(self, carrier: Carrier, transfer: TransferRecord, record: CallRecord, step: str) -> bool:
        try:
            await carrier.redirect(self.http, carrier_leg(record.carrier_call_id), self.url(carrier, step, transfer.id),
                                   deadline=self._clock() + CARRIER_WORK_SECONDS)
            return True
        except RemoteError as error:
            await self._finish(transfer, status.FAILED, f"carrier error: {error.reason}")
            # The caller never left the agent (as far as we know): tell it, so it can tell the caller.
            await self._tell_agent(
                record.ultravox_call_id,
                f"(The transfer to {transfer.operator} could not be started: {error.reason}. "
                "Tell the caller and offer to help another way.)",
            )
            return False

    # Call instructions the caller's call fetches after a redirect.
    async def fetch_return(self, carrier: Carrier, transfer: TransferRecord, leg: int | None, webhook: Webhook) -> str:
        return await self._return_to_agent(carrier, transfer, transfer.outcome or "the transfer did not go through")

    async def fetch_music(self, carrier: Carrier, transfer: TransferRecord, leg: int | None, webhook: Webhook) -> str:
        return carrier.hold_music_answer(self.settings.transfer.hold_music_url)

    async def fetch_dial(self, carrier: Carrier, transfer: TransferRecord, leg: int | None, webhook: Webhook) -> str:
        if transfer.is_final or transfer.status == status.RETURNING:
            return await self._after_final(carrier, transfer)
        return self._dial_answer(carrier, transfer, say=self.settings.transfer.connecting_message)

    async def fetch_hold(self, carrier: Carrier, transfer: TransferRecord, leg: int | None, webhook: Webhook) -> str:
        if transfer.is_final or transfer.status == status.RETURNING:
            return await self._after_final(carrier, transfer)
        wait_url = (self.url(carrier, "music", transfer.id) if carrier.hold_music_is_answer
                    else self.settings.transfer.hold_music_url)
        return carrier.conference_answer(
            self.conference(transfer), say=self.settings.transfer.connecting_message, starts=False, ends=True,
            wait_url=wait_url, action_url=self.url(carrier, "caller-left", transfer.id),
        )

    async def _after_final(self, carrier: Carrier, transfer: TransferRecord) -> str:
        """A carrier repeating a request after the transfer ended, or fetching one it gave up on."""
        record = await self.calls.existing(transfer.call_id)
        bind_call(record)
        if transfer.status in (status.RETURNED, status.RETURNING):
            join_url = await self._returned_join_url(transfer)
            if join_url:
                return self._connect(carrier, record, join_url)
        if transfer.status == status.FAILED and not record.is_final:
            # We gave up on moving the caller (a timeout), yet the carrier moved them: the agent takes them back.
            return await self._return_to_agent(carrier, transfer, transfer.outcome or "the transfer failed", after_failure=True)
        return carrier.hangup_answer()

    async def _returned_join_url(self, transfer: TransferRecord) -> str | None:
        deadline = self._clock() + self.settings.ultravox.inbound_deadline_seconds - 0.5
        while True:
            transfer = await self.transfers.existing(transfer.id)
            if transfer.status == status.RETURNED:
                return (await self.calls.existing(transfer.call_id)).join_url
            if transfer.status != status.RETURNING or self._clock() + 0.05 >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def _return_to_agent(self, carrier: Carrier, transfer: TransferRecord, why: str, *, after_failure: bool = False) -> str:
        """A new Ultravox call continuing the old conversation, told what happened."""
        expected = status.FAILED if after_failure else transfer.status
        # Compare-and-set: of two deliveries of the same callback, one creates the call.
        claimed = await self.transfers.update(
            transfer.id, TransferChange(status=status.RETURNING), only_if_active=not after_failure,
            expect=TransferExpectation(status=expected),
        )
        if claimed is None or expected in (status.RETURNING, status.RETURNED):
            return await self._after_final(carrier, await self.transfers.existing(transfer.id))
        record = await self.calls.existing(transfer.call_id)
        bind_call(record)
        operator = self.settings.operators[transfer.operator]
        request = self.bodies.continuation(
            record,
            medium=self.connector.medium(carrier, record.route, record.id),
            prior_call_id=transfer.prior_ultravox_call_id,
            prompt=(
                f"You tried to transfer the caller to {transfer.operator} ({operator.description}), but it did not "
                f"go through: {why}. Tell the caller briefly, apologise, and offer to help another way or take a message."
            ),
            extra_metadata={"gateway.returned_from_transfer": transfer.id},
        )
        deadline = self._clock() + self.settings.ultravox.inbound_deadline_seconds - 0.5
        try:
            created = await self.ultravox.create_call(request, deadline=deadline)
        except UltravoxError as error:
            await self._finish(transfer, status.FAILED, f"{why}; the agent could not be reached: {error.reason}",
                               only_if_active=False)
            fallback = self.settings.fallback
            return carrier.apology_answer(fallback.message, fallback.dial_number)
        await self.calls.rejoin(record.id, ultravox_call_id=created.call_id, join_url=created.join_url)
        await self._finish(transfer, status.RETURNED, why, new_ultravox_call_id=created.call_id, only_if_active=False)
        return self._connect(carrier, record, created.join_url)

    def _connect(self, carrier: Carrier, record: CallRecord, join_url: str) -> str:
        return self.connector.record_answer(carrier, record, join_url)

    async def _tell_agent(self, ultravox_call_id: str | None, text: str) -> None:
        if not ultravox_call_id:
            return
        try:
            await self.ultravox.tell_agent(ultravox_call_id, text, deadline=self._clock() + CARRIER_WORK_SECONDS)
        except UltravoxError as error:
            log.warning("could not tell Ultravox call %s about the transfer: %s", ultravox_call_id, error.reason)

    async def _finish(self, transfer: TransferRecord, final: str, outcome: str, *,
                      expect: TransferExpectation | None = None,
                      only_if_active: bool = True, new_ultravox_call_id: str | None = None) -> TransferRecord | None:
        finished = await self.transfers.finish(
            transfer.id, final, outcome, expect=expect, only_if_active=only_if_active,
            new_ultravox_call_id=new_ultravox_call_id,
        )
        if finished is not None:
            log.info("transfer %s: %s (%s)", transfer.id, final, outcome)
            self.on_outcome(finished)
        return finished

    # --- plumbing ---------------------------------------------------------------------------------
    def conference(self, transfer: TransferRecord) -> str:
        return f"gateway-transfer-{transfer.id}"

    def url(self, carrier: Carrier, step: str, transfer_id: str, *, leg: int | None = None) -> str:
        return self.urls.transfer_callback(carrier.name, step, transfer_id, leg)


def _tool_reply(request: TransferRequest, outcome: TransferOutcome) -> ToolReply:
    """What the tool tells the model about `outcome`."""
    if outcome.transfer is not None:
        # The carrier takes the caller now; the agent should not start another sentence.
        return ToolReply(f"Transferring the caller to {outcome.transfer.operator} now.", reaction="listens")
    refusal = outcome.refusal
    if refusal is Refusal.NOT_CONNECTED:
        return ToolReply("I can't transfer this call: it is not connected to a phone line any more.")
    if refusal is Refusal.CARRIER_CANNOT:
        return ToolReply(
            "I can't transfer calls on this phone line. Don't transfer; tell the caller and offer to help "
            "another way or take a message."
        )
    if refusal is Refusal.UNKNOWN_OPERATOR:
        names = ", ".join(outcome.allowed) if outcome.allowed else "no one"
        return ToolReply(f"I can't transfer to {request.operator!r}. I can only transfer to: {names}.")
    if refusal is Refusal.MISSING_DETAILS:
        return ToolReply(f"I need {outcome.detail} before I can transfer the caller.")
    if refusal is Refusal.OPERATOR_CLOSED:
        return ToolReply(
            f"{request.operator} is not available at the moment ({outcome.detail}). "
            "Don't transfer; tell the caller and offer to help another way or take a message."
        )
    return ToolReply("A transfer is already under way for this call. Don't start another one.")
