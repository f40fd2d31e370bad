"""Call control: an application ends a live call (or cancels one still ringing) and tells the agent
something. Transfers asked for through the API are TransferFlow.begin, the path the agent's tool takes.

Who ends the call: the carrier, through its REST API, when the gateway placed or answered the call's
leg and the carrier has such an API; else Ultravox (a call it placed itself, a carrier without one):
ending the Ultravox call closes the call's media stream, which ends the call.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import httpx

from .. import statuses
from ..carriers.base import Carrier
from ..http import RemoteError
from ..logs import bind_call
from ..store import CallRecord, CallStore, CallUpdate
from ..ultravox import UltravoxCallInactive, UltravoxClient

log = logging.getLogger("gateway.control")

CONTROL_SECONDS = 10.0  # a hang-up or a message, while the API client waits
HANGUP_REASON = "hangup-api"  # end_reason of a call the API hung up
CANCEL_REASON = "canceled"  # end_reason of an outbound call the API stopped before it was answered
Urgency = Literal["immediate", "soon", "later"]  # Ultravox's user_text_message urgency


class CallConflict(Exception):
    """The call is not in a state for the action (it ended, or has no agent yet); nothing was done."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CallControl:
    def __init__(self, store: CallStore, ultravox: UltravoxClient, carriers: dict[str, Carrier],
                 carrier_http: httpx.AsyncClient, *, clock=time.monotonic):
        self.store = store
        self.ultravox = ultravox
        self.carriers = carriers
        self.http = carrier_http
        self._clock = clock

    async def hang_up(self, record: CallRecord) -> CallRecord:
        """End the call, or cancel an outbound call not answered yet; returns the record as it is now.

        Raises CallConflict for a call that has ended, gateway.http.RemoteError when the carrier or
        Ultravox refuses (the record is then unchanged).
        """
        bind_call(record)
        if record.is_final:
            raise CallConflict(f"the call has already ended ({record.status})")
        carrier = self.carriers[record.carrier]
        unanswered = record.direction == "outbound" and not statuses.is_answered(record.status)
        deadline = self._clock() + CONTROL_SECONDS
        if record.via != "ultravox" and carrier.can_hang_up and record.carrier_call_id:
            end = carrier.cancel if unanswered else carrier.hang_up
            await end(self.http, record.carrier_call_id, deadline=deadline)
            how = carrier.title
        elif record.ultravox_call_id:
            await self.ultravox.end_call(record.ultravox_call_id, deadline=deadline)
            how = "Ultravox"
        else:
            # No leg to reach yet (the dial is in flight, or the carrier names the leg only in its first
            # callback): the record ends now, and that callback's leg is hung up (stray_leg).
            how = "the record alone"
        log.info("call %s: %s through the API (by %s)", record.id, "canceled" if unanswered else "hung up", how)
        if unanswered:
            # Provisional: had the callee picked up meanwhile, the carrier's final word (completed) stands.
            change = CallUpdate(status=statuses.CANCELED, provisional=True, end_reason=CANCEL_REASON)
        else:
            change = CallUpdate(status=statuses.COMPLETED, end_reason=HANGUP_REASON)
        return (await self.store.update(record.id, change)).existing

    async def stray_leg(self, carrier: Carrier, record: CallRecord) -> None:
        """The carrier reports a live leg of a call that ended before the gateway knew the leg (hung up
        through the API while its dial was in flight): hang it up."""
        if not (carrier.can_hang_up and record.carrier_call_id):
            return
        log.info("call %s: hanging up its leg %s, reported after the call ended", record.id, record.carrier_call_id)
        try:
            await carrier.cancel(self.http, record.carrier_call_id, deadline=self._clock() + CONTROL_SECONDS)
        except RemoteError as error:  # the carrier's next callback about the leg tries again
            log.warning("call %s: its leg %s could not be hung up: %s", record.id, record.carrier_call_id, error.reason)

    async def tell_agent(self, record: CallRecord, text: str, urgency: Urgency | None) -> dict[str, str]:
        """Send the agent `text` as if the user had typed it (Ultravox's user_text_message); returns
        the data message sent. Raises CallConflict (no agent to tell), UltravoxError (refused)."""
        bind_call(record)
        if record.is_final:
            raise CallConflict(f"the call has already ended ({record.status})")
        if not record.ultravox_call_id:
            raise CallConflict("the call has no agent yet")
        message = {"type": "user_text_message", "text": text}
        if urgency is not None:
            message["urgency"] = urgency
        try:
            await self.ultravox.send_data_message(record.ultravox_call_id, message,
                                                  deadline=self._clock() + CONTROL_SECONDS)
        except UltravoxCallInactive:
            # Its agent's call ended: the caller hung up (its end not recorded yet), or is with an operator.
            raise CallConflict("the call's agent is not active (the call ended, or is with an operator)") from None
        return message
