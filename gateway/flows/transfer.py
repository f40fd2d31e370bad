"""Operator transfers: the model names an operator, the gateway moves the live carrier call.

Cold: the caller's call runs <Dial> to the operator; the dial's action callback says how it ended.
Warm: the caller waits in a conference while the operator is called, briefed and asked to press 1.
Whenever no person takes the caller (no answer, busy, declined, voicemail, carrier error), the
caller goes back to the agent in a new Ultravox call continuing the old one (priorCallId).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import httpx

from .. import statuses
from ..carriers.base import Carrier, OutboundDial, Webhook
from ..http import RemoteError
from ..security import callback_token, valid_callback_token
from ..settings import Settings
from ..store import CallRecord, CallStore, TransferRecord, TransferStore
from ..store import transfers as status
from ..store.calls import utcnow
from ..ultravox import UltravoxClient, UltravoxError
from .call_request import ultravox_callbacks

log = logging.getLogger("gateway.transfer")

CARRIER_WORK_SECONDS = 10.0  # a redirect or an operator call, in the background


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
        self.on_outcome = on_outcome
        self._clock = clock
        self._now = now
        self._background: set[asyncio.Task] = set()

    # --- the tool ---------------------------------------------------------------------------------
    async def invoke(self, kind: str, payload: dict[str, Any]) -> ToolReply:
        """Check the request, start the transfer in the background, answer within the tool timeout."""
        record = await self.calls.find_by_ultravox_call_id(str(payload.get("callId") or ""))
        if record is None:
            return ToolReply("I can't transfer this call: the phone gateway doesn't know it.")
        if record.is_final or not record.carrier_call_id:
            return ToolReply("I can't transfer this call: it is not connected to a phone line any more.")
        allowed = self._allowed_operators(record)
        requested = payload.get("operator")
        if requested not in allowed:
            names = ", ".join(allowed) if allowed else "no one"
            return ToolReply(f"I can't transfer to {requested!r}. I can only transfer to: {names}.")
        reason = str(payload.get("reason") or "").strip()[:500]
        summary = str(payload.get("summary") or "").strip()[:1000] or None
        if not reason or (kind == "warm" and not summary):
            missing = "a reason" if not reason else "a summary for the person"
            return ToolReply(f"I need {missing} before I can transfer the caller.")
        operator = self._first_open(requested, tried=[])
        if operator is None:
            return ToolReply(
                f"{requested} is not available at the moment ({self._hours(requested)}). "
                "Don't transfer; tell the caller and offer to help another way or take a message."
            )
        transfer = await self.transfers.start(
            call_id=record.id, kind=kind, operator=operator, reason=reason, summary=summary,
            prior_ultravox_call_id=record.ultravox_call_id,
        )
        if transfer is None:
            return ToolReply("A transfer is already under way for this call. Don't start another one.")
        start = self._start_cold if kind == "cold" else self._start_warm
        self._in_background(start(transfer, record))
        log.info("call %s: %s transfer %s to %s", record.id, kind, transfer.id, operator)
        # The carrier takes the caller now; the agent should not start another sentence.
        return ToolReply(f"Transferring the caller to {operator} now.", reaction="listens")

    def _allowed_operators(self, record: CallRecord) -> list[str]:
        route = self.settings.route_named(record.route) if record.route else None
        return list(route.operators) if route else []

    def _first_open(self, name: str | None, *, tried: list[str]) -> str | None:
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

    # --- cold -------------------------------------------------------------------------------------
    async def _start_cold(self, transfer: TransferRecord, record: CallRecord) -> None:
        carrier = self.carriers[record.carrier]
        if await self._move_caller(carrier, transfer, record, "dial"):
            await self.transfers.update(transfer.id, status=status.DIALING)

    async def dial_result(self, carrier: Carrier, transfer: TransferRecord, webhook: Webhook) -> str:
        """The <Dial> to the operator ended: done if they answered, else the next operator or the agent."""
        result = carrier.parse_dial_result(webhook)
        if transfer.is_final:  # a repeated callback
            return await self._after_final(carrier, transfer)
        if result.answered:
            await self._finish(transfer, status.CONNECTED, "answered")
            return carrier.hangup_xml()
        why = f"{transfer.operator} did not answer ({result.status})"
        following = self._first_open(transfer.operator, tried=transfer.tried)
        if following is not None:
            transfer = await self.transfers.update(
                transfer.id, operator=following, operators_tried=f"{transfer.operators_tried},{following}", outcome=why,
            ) or transfer
            return self._dial_xml(carrier, transfer, await self.calls.get(transfer.call_id), say=None)
        return await self._return_to_agent(carrier, transfer, why)

    def _dial_xml(self, carrier: Carrier, transfer: TransferRecord, record: CallRecord, *, say: str | None) -> str:
        operator = self.settings.operators[transfer.operator]
        return carrier.dial_xml(
            say=say, target=operator.target, action_url=self.url(carrier, "result", transfer.id),
            ring_timeout=operator.ring_timeout_seconds, caller_id=operator.caller_id,
        )

    # --- warm -------------------------------------------------------------------------------------
    async def _start_warm(self, transfer: TransferRecord, record: CallRecord) -> None:
        carrier = self.carriers[record.carrier]
        if await self._move_caller(carrier, transfer, record, "hold"):
            await self._call_operator(carrier, transfer, record)

    async def _call_operator(self, carrier: Carrier, transfer: TransferRecord, record: CallRecord) -> None:
        operator = self.settings.operators[transfer.operator]
        dial = OutboundDial(
            to=operator.target,
            # The operator sees the line the caller called (inbound) or the one the gateway dialled from.
            from_=operator.caller_id or (record.to_number if record.direction == "inbound" else record.from_number),
            answer_url=self.url(carrier, "whisper", transfer.id, leg=transfer.leg),
            status_url=self.url(carrier, "operator-status", transfer.id, leg=transfer.leg),
            ring_timeout_seconds=operator.ring_timeout_seconds,
            machine_detection=True,  # a voicemail greeting must not count as the operator
        )
        try:
            leg = await carrier.place_call(self.http, dial, deadline=self._clock() + CARRIER_WORK_SECONDS)
        except RemoteError as error:
            await self._operator_unavailable(
                carrier, transfer, transfer.leg, f"{transfer.operator} could not be called: {error.reason}"
            )
            return
        await self.transfers.update(transfer.id, status=status.DIALING, operator_leg_id=leg)

    def whisper(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> str:
        """The operator picked up: brief them, unless it is their voicemail."""
        if transfer.is_final or leg != transfer.leg:
            return carrier.hangup_xml()
        if carrier.parse_answer(webhook).machine:
            why = f"{transfer.operator}'s voicemail answered"
            self._in_background(self._operator_unavailable(carrier, transfer, leg, why))
            return carrier.hangup_xml()
        briefing = f"A caller is being transferred to you. Reason: {transfer.reason}."
        if transfer.summary:
            briefing += f" Summary: {transfer.summary}"
        briefing += " Press 1 to take the call."
        return carrier.whisper_xml(
            briefing, accept_url=self.url(carrier, "accept", transfer.id, leg=leg),
            timeout=self.settings.transfer.accept_timeout_seconds,
        )

    async def accept(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> str:
        if transfer.is_final or leg != transfer.leg:
            return carrier.hangup_xml()
        if carrier.pressed_digits(webhook) != "1":
            self._in_background(self._operator_unavailable(carrier, transfer, leg, f"{transfer.operator} declined"))
            return carrier.hangup_xml()
        await self._finish(transfer, status.CONNECTED, "accepted")
        return carrier.conference_xml(self.conference(transfer), say="Connecting you now.", starts=True, ends=True,
                                      hold_music_url=None)

    async def operator_status(self, carrier: Carrier, transfer: TransferRecord, leg: int, webhook: Webhook) -> None:
        update = carrier.parse_status(webhook)
        if update.status in statuses.FINAL_STATUSES and not transfer.is_final:
            # Hung up, busy, no answer…: before accepting, any end of the operator's leg is a no.
            why = f"{transfer.operator} did not take the call ({update.status})"
            await self._operator_unavailable(carrier, transfer, leg, why)

    async def _operator_unavailable(self, carrier: Carrier, transfer: TransferRecord, leg: int, why: str) -> None:
        """The operator's leg will not take the caller: try the next operator, else back to the agent."""
        # The first event about this leg acts (a declined key press, then its hang-up callback…);
        # the later ones, and any about an older leg, find it released.
        current = await self.transfers.release_leg(transfer.id, leg)
        if current is None:
            return
        record = await self.calls.get(transfer.call_id)
        following = self._first_open(current.operator, tried=current.tried)
        if following is not None:
            current = await self.transfers.update(
                current.id, operator=following, operators_tried=f"{current.operators_tried},{following}", outcome=why,
            ) or current
            await self._call_operator(carrier, current, record)
            return
        await self.transfers.update(current.id, outcome=why)
        try:
            await carrier.redirect(self.http, record.carrier_call_id, self.url(carrier, "return", current.id),
                                   deadline=self._clock() + CARRIER_WORK_SECONDS)
        except RemoteError as error:
            # The caller hung up while waiting, or the carrier refuses: nobody left to return.
            await self._finish(current, status.FAILED, f"{why}; the caller could not be returned: {error.reason}")

    # --- moving the caller and bringing them back ---------------------------------------------------
    async def _move_caller(self, carrier: Carrier, transfer: TransferRecord, record: CallRecord, step: str) -> bool:
        try:
            await carrier.redirect(self.http, record.carrier_call_id, self.url(carrier, step, transfer.id),
                                   deadline=self._clock() + CARRIER_WORK_SECONDS)
            return True
        except RemoteError as error:
            await self._finish(transfer, status.FAILED, f"carrier error: {error.reason}")
            # The caller never left the agent: tell it, so it can tell the caller.
            await self._tell_agent(
                record.ultravox_call_id,
                f"(The transfer to {transfer.operator} could not be started: {error.reason}. "
                "Tell the caller and offer to help another way.)",
            )
            return False

    async def xml(self, carrier: Carrier, transfer: TransferRecord, step: str) -> str:
        """XML the carrier fetches after a redirect of the caller's call."""
        if step == "return":
            return await self._return_to_agent(carrier, transfer, transfer.outcome or "the transfer did not go through")
        if transfer.is_final:
            return await self._after_final(carrier, transfer)
        say = self.settings.transfer.connecting_message
        if step == "dial":
            return self._dial_xml(carrier, transfer, await self.calls.get(transfer.call_id), say=say)
        return carrier.conference_xml(self.conference(transfer), say=say, starts=False, ends=True,
                                      hold_music_url=self.settings.transfer.hold_music_url)

    async def _after_final(self, carrier: Carrier, transfer: TransferRecord) -> str:
        """A carrier repeating a request after the transfer ended: the same answer as before."""
        record = await self.calls.get(transfer.call_id)
        if transfer.status == status.RETURNED and record.join_url:
            return carrier.connect_xml(record.join_url)
        return carrier.hangup_xml()

    async def _return_to_agent(self, carrier: Carrier, transfer: TransferRecord, why: str) -> str:
        """A new Ultravox call continuing the old conversation, told what happened."""
        if transfer.is_final:
            return await self._after_final(carrier, transfer)
        record = await self.calls.get(transfer.call_id)
        operator = self.settings.operators[transfer.operator]
        body = {
            "medium": carrier.ultravox_medium(),
            "firstSpeakerSettings": {"agent": {"prompt": (
                f"You tried to transfer the caller to {transfer.operator} ({operator.description}), but it did not "
                f"go through: {why}. Tell the caller briefly, apologise, and offer to help another way or take a message."
            )}},
            "metadata": {
                "gateway.carrier": record.carrier,
                "gateway.carrier_call_id": record.carrier_call_id or "",
                "gateway.call_id": record.id,
                "gateway.route": record.route or "",
                "gateway.returned_from_transfer": transfer.id,
            },
        }
        callbacks = ultravox_callbacks(f"{self.settings.public_url}/ultravox/events", self.settings.ultravox.webhook_secret)
        if callbacks:
            body["callbacks"] = callbacks
        deadline = self._clock() + self.settings.ultravox.inbound_deadline_seconds - 0.5
        try:
            created = await self.ultravox.create_call(
                body, agent_id=None, prior_call_id=transfer.prior_ultravox_call_id, deadline=deadline
            )
        except UltravoxError as error:
            await self._finish(transfer, status.FAILED, f"{why}; the agent could not be reached: {error.reason}")
            fallback = self.settings.fallback
            return carrier.apology_xml(fallback.message, fallback.dial_number)
        await self.calls.update(record.id, replace={"ultravox_call_id": created.call_id, "join_url": created.join_url})
        await self._finish(transfer, status.RETURNED, why, new_ultravox_call_id=created.call_id)
        return carrier.connect_xml(created.join_url)

    async def _tell_agent(self, ultravox_call_id: str | None, text: str) -> None:
        if not ultravox_call_id:
            return
        try:
            await self.ultravox.send_data_message(
                ultravox_call_id, {"type": "user_text_message", "text": text, "urgency": "immediate"},
                deadline=self._clock() + CARRIER_WORK_SECONDS,
            )
        except UltravoxError as error:
            log.warning("could not tell Ultravox call %s about the transfer: %s", ultravox_call_id, error.reason)

    async def _finish(self, transfer: TransferRecord, final: str, outcome: str, **values: Any) -> None:
        finished = await self.transfers.finish(transfer.id, final, outcome, **values)
        if finished is not None:
            log.info("transfer %s: %s (%s)", transfer.id, final, outcome)
            self.on_outcome(finished)

    # --- plumbing ---------------------------------------------------------------------------------
    def conference(self, transfer: TransferRecord) -> str:
        return f"gateway-transfer-{transfer.id}"

    def url(self, carrier: Carrier, step: str, transfer_id: str, *, leg: int | None = None) -> str:
        """A carrier callback URL for one transfer, with a token only the gateway can make."""
        token = callback_token(self.settings.ultravox.api_key or "", f"transfer:{transfer_id}")
        url = f"{self.settings.public_url}/{carrier.name}/transfer/{step}?transfer={quote(transfer_id)}&t={token}"
        return url if leg is None else f"{url}&leg={leg}"

    def valid_url(self, transfer_id: str, token: str | None) -> bool:
        return valid_callback_token(self.settings.ultravox.api_key or "", f"transfer:{transfer_id}", token)

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(self._logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _logged(work) -> None:
        try:
            await work
        except Exception:
            log.exception("transfer work failed")

    async def drain(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

