"""Handing a live bridged call over to another replica, when this one must stop.

The draining process lets go of the Ultravox call (which ends it, so its conversation is final),
creates a new Ultravox call continuing that conversation (priorCallId), records it on the call,
and asks the carrier to fetch new instructions for the live call: the handover URL, answered by
any replica with the stream to the gateway's media socket, which the load balancer routes to a
replica that is still ready. The caller hears a moment of silence, and the agent carries on.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import httpx

from .. import statuses
from ..carriers.base import Carrier, carrier_leg
from ..http import RemoteError
from ..logs import bind_call
from ..settings import Settings
from ..store import CallRecord, CallStore, CallUpdate
from ..ultravox import UltravoxClient, UltravoxError
from ..urls import Urls
from .call_request import CallBodies
from .connect import Connector

log = logging.getLogger("gateway.handover")

WORK_SECONDS = 10.0  # creating the new Ultravox call, then the carrier's redirect
CONTINUE_PROMPT = (
    "(The call was just moved to another server; the caller may have heard a short silence. Carry on "
    "with the conversation where it was; don't mention the move unless the caller asks.)"
)


class HandoverFlow:
    def __init__(self, settings: Settings, store: CallStore, ultravox: UltravoxClient, carriers: dict[str, Carrier],
                 carrier_http: httpx.AsyncClient, *, urls: Urls, bodies: CallBodies, connector: Connector,
                 clock=time.monotonic):
        self.settings = settings
        self.store = store
        self.ultravox = ultravox
        self.carriers = carriers
        self.http = carrier_http
        self.urls = urls
        self.bodies = bodies
        self.connector = connector
        self._clock = clock

    def can_hand_over(self, record: CallRecord) -> bool:
        """Only a carrier that can redirect a live call can be moved to another replica."""
        return self.carriers[record.carrier].can_transfer and bool(record.carrier_call_id)

    async def hand_over(self, record: CallRecord, release_agent: Callable[[], Awaitable[bool]]) -> bool:
        """Move `record`'s live call to a fresh stream; `release_agent` lets go of its Ultravox call
        (without ending the carrier's stream). False: it could not be moved (it stays as it is)."""
        if not self.can_hand_over(record) or not await release_agent():
            return False
        carrier = self.carriers[record.carrier]
        deadline = self._clock() + WORK_SECONDS
        request = self.bodies.continuation(
            record,
            medium=self.connector.medium(carrier, record.route, record.id),
            prior_call_id=record.ultravox_call_id,
            prompt=CONTINUE_PROMPT,
            extra_metadata={"gateway.handed_over_from": record.ultravox_call_id or ""},
        )
        created = None
        try:
            created = await self.ultravox.create_call(request, deadline=deadline)
        except UltravoxError as error:
            # The agent is gone and no new one comes: the caller hears the apology (and the
            # fallback number, if any) from the handover URL instead of silence.
            log.error("call %s: handover found no new agent: %s", record.id, error.reason)
            await self.store.update(record.id, CallUpdate(status=statuses.FAILED,
                                                          failure_reason=f"handover failed: {error.reason}"))
        else:
            await self.store.rejoin(record.id, ultravox_call_id=created.call_id, join_url=created.join_url)
        try:
            await carrier.redirect(self.http, carrier_leg(record.carrier_call_id),
                                   self.urls.call_callback("handover", carrier.name, record.id),
                                   deadline=self._clock() + WORK_SECONDS)
        except RemoteError as error:
            log.warning("call %s: the carrier did not move the call (%s)", record.id, error.reason)
            return False
        log.info("call %s: handed over to Ultravox call %s", record.id, created.call_id if created else None)
        return True

    async def answer(self, carrier: Carrier, call_id: str) -> str:
        """The carrier fetching the handover URL: the stream to the call's current Ultravox call."""
        record = await self.store.get(call_id)
        if record is None or record.carrier != carrier.name:
            return carrier.hangup_answer()
        bind_call(record)
        if record.is_final or not record.join_url:
            fallback = self.settings.fallback
            return carrier.apology_answer(fallback.message, fallback.dial_number)
        return self.connector.record_answer(carrier, record, record.join_url)
