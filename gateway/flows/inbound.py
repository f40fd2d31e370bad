"""Inbound calls: route the called number, create the Ultravox call once, answer with XML."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

from ..carriers.base import Carrier, InboundCall
from ..logs import bind
from ..settings import RouteSettings, Settings
from ..store import IN_PROGRESS, CREATING, REJECTED, CallStore, Claim
from ..store.calls import utcnow
from ..ultravox import UltravoxClient, UltravoxError
from ..work import Work
from .call_request import CallBodies, CallIdentity
from .connect import Connector

log = logging.getLogger("gateway.inbound")

# Time kept back from the deadline to render and send the XML.
RESPONSE_MARGIN_SECONDS = 0.3
# How often a delivery waiting on another replica's Ultravox call looks at the store.
POLL_SECONDS = 0.05


# How often some process looks for calls a dead process left half-made.
SWEEP_SECONDS = 30.0


@dataclass(frozen=True)
class AbandonedInboundSweep:
    """Periodic durable work: inbound calls a dead process left `creating`."""


@dataclass(frozen=True)
class Answer:
    body: str  # in the carrier's answer dialect (XML, JSON)
    outcome: str  # connected | apology | no_route


@dataclass(frozen=True)
class Joined:
    join_url: str
    call_id: str | None  # the gateway's record (None: created unrecorded during a store outage)


class InboundFlow:
    def __init__(
        self, settings: Settings, store: CallStore, ultravox: UltravoxClient, bodies: CallBodies,
        connector: Connector, *, work: Work, clock=time.monotonic,
    ):
        self.settings = settings
        self.store = store
        self.ultravox = ultravox
        self.bodies = bodies
        self.connector = connector
        self._clock = clock
        # Deliveries of the same carrier call in this process wait for the first one's result. Only
        # a shortcut: the store's claim is what makes one Ultravox call per carrier call, across
        # processes and restarts.
        self._in_flight: dict[tuple[str, str], asyncio.Future[Joined | None]] = {}
        work.register(AbandonedInboundSweep, self.settle_abandoned, every=SWEEP_SECONDS)

    async def settle_abandoned(self, _: AbandonedInboundSweep) -> None:
        """A record left `creating` past any carrier's patience: the carrier has long given the
        caller its fallback (or retried and been answered by a fresh attempt)."""
        abandoned = await self.store.fail_abandoned(
            "creating", before=utcnow() - self._stale_after,
            reason="the gateway stopped while creating the Ultravox call",
        )
        for record in abandoned:
            log.warning("%s call %s: left creating by a stopped process; marked failed", record.carrier,
                        record.carrier_call_id)

    def apology(self, carrier: Carrier) -> Answer:
        fallback = self.settings.fallback
        return Answer(carrier.apology_answer(fallback.message, fallback.dial_number), "apology")

    async def answer(self, carrier: Carrier, call: InboundCall, deadline: float) -> Answer:
        route = self.settings.route_for(call.to_number)
        bind(carrier=carrier.name, carrier_call_id=call.call_id, route=route.name if route else None)
        if route is None:
            log.warning("%s call %s to %s: no route and no default route", carrier.name, call.call_id, call.to_number)
            await self._record_without_route(call)
            return Answer(carrier.reject_answer(self.settings.fallback.no_route_message), "no_route")
        joined = await self._join(carrier, call, route, deadline)
        if joined is None:
            return self.apology(carrier)
        return Answer(self.connector.answer(carrier, route.name, joined.call_id, joined.join_url), "connected")

    async def _join(self, carrier: Carrier, call: InboundCall, route: RouteSettings, deadline: float) -> Joined | None:
        key = (carrier.name, call.call_id)
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Joined | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        joined = None
        try:
            joined = await self._claim_and_create(carrier, call, route, deadline)
            return joined
        finally:
            future.set_result(joined)
            del self._in_flight[key]

    async def _claim_and_create(
        self, carrier: Carrier, call: InboundCall, route: RouteSettings, deadline: float
    ) -> Joined | None:
        claim = await self._claim(call, route)
        if claim is not None and not claim.owned:
            bind(call_id=claim.record.id)
            return await self._result_of_other_delivery(claim, deadline)
        gateway_call_id = claim.record.id if claim else None
        bind(call_id=gateway_call_id)
        request = self.bodies.for_route(
            route,
            carrier=carrier,
            identity=CallIdentity(carrier.name, call.call_id, gateway_call_id, route.name),
            medium=self.connector.medium(carrier, route.name, gateway_call_id),
            webhook_params={
                **call.params,
                "carrier": carrier.name,
                "carrier_call_id": call.call_id,
                "from_number": call.from_number,
                "to_number": call.to_number,
            },
        )
        try:
            created = await self.ultravox.create_call(request, deadline=deadline - RESPONSE_MARGIN_SECONDS)
        except UltravoxError as error:
            log.warning("%s call %s: apology, %s", carrier.name, call.call_id, error.reason)
            if gateway_call_id:
                await self._quietly(self.store.mark_failed(gateway_call_id, error.reason))
            return None
        except BaseException as error:
            # Cancelled at the deadline, or a bug: the record must not stay `creating`, or carrier
            # retries would wait on it instead of trying again.
            if gateway_call_id:
                reason = "deadline reached" if isinstance(error, asyncio.CancelledError) else type(error).__name__
                await asyncio.shield(self._quietly(self.store.mark_failed(gateway_call_id, reason)))
            raise
        bind(ultravox_call_id=created.call_id)
        log.info("%s call %s joined Ultravox call %s", carrier.name, call.call_id, created.call_id)
        if gateway_call_id:
            # Shielded: the Ultravox call exists now, and retries must find its join URL.
            await asyncio.shield(self._quietly(
                self.store.mark_connected(gateway_call_id, ultravox_call_id=created.call_id, join_url=created.join_url)
            ))
        return Joined(created.join_url, gateway_call_id)

    async def _claim(self, call: InboundCall, route: RouteSettings) -> Claim | None:
        try:
            return await self.store.claim_inbound(
                carrier=call.carrier,
                carrier_call_id=call.call_id,
                from_number=call.from_number,
                to_number=call.to_number,
                route=route.name,
                stale_after=self._stale_after,
            )
        except Exception:
            # A store outage must not take the phone line down with it: connect the caller unrecorded.
            log.exception("%s call %s: store unavailable, creating the call without a record", call.carrier, call.call_id)
            return None

    async def _result_of_other_delivery(self, claim: Claim, deadline: float) -> Joined | None:
        """Another delivery (maybe on another replica) owns this call: wait for its join URL."""
        record = claim.record
        while record.status == CREATING and self._clock() + POLL_SECONDS < deadline - RESPONSE_MARGIN_SECONDS:
            await asyncio.sleep(POLL_SECONDS)
            record = await self.store.get(record.id) or record
        if record.status == IN_PROGRESS and record.join_url:
            return Joined(record.join_url, record.id)
        return None

    async def _record_without_route(self, call: InboundCall) -> None:
        await self._quietly(
            self.store.claim_inbound(
                carrier=call.carrier,
                carrier_call_id=call.call_id,
                from_number=call.from_number,
                to_number=call.to_number,
                route=None,
                status=REJECTED,
                failure_reason="no route for the called number",
                stale_after=self._stale_after,
            )
        )

    @property
    def _stale_after(self) -> dt.timedelta:
        # Past this, a `creating` record's owner is gone (its carrier stopped waiting long ago).
        return dt.timedelta(seconds=self.settings.ultravox.inbound_deadline_seconds + 5)

    @staticmethod
    async def _quietly(operation) -> None:
        try:
            await operation
        except Exception:
            log.exception("store update failed")
