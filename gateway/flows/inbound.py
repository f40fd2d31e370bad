"""Inbound calls: route the called number, create the Ultravox call once, answer with XML."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..carriers.base import Carrier, InboundCall
from ..logs import bind
from ..settings import RouteSettings, Settings
from ..store import IN_PROGRESS, CREATING, REJECTED, CallRecord, CallStore, Claim
from ..store.calls import utcnow
from ..ultravox import UltravoxClient, UltravoxError
from ..work import Work, process_name
from .call_request import CallBodies, CallIdentity
from .connect import Connector

log = logging.getLogger("gateway.inbound")

# Time kept back from the deadline to render and send the XML.
RESPONSE_MARGIN_SECONDS = 0.3
# How often a delivery waiting on another replica's Ultravox call looks at the store.
POLL_SECONDS = 0.05


# How often some process looks for calls a dead process left half-made.
SWEEP_SECONDS = 30.0
# How long to look up, at Ultravox, the call a dead process may have made for a record.
LOOKUP_SECONDS = 5.0
# The metadata key carrying the gateway's record id on each Ultravox call (CallIdentity).
RECORD_METADATA_KEY = "gateway.call_id"
CARRIER_METADATA_KEY = "gateway.carrier"
CARRIER_CALL_METADATA_KEY = "gateway.carrier_call_id"
# Calls created without a record (the store down or stalled), remembered in this process so that
# the carrier's retries of one call join it instead of creating one each: how long, how many.
# Another replica, or this one restarted, asks Ultravox (for at most UNRECORDED_LOOKUP_SECONDS).
UNRECORDED_LOOKUP_SECONDS = 1.0
UNRECORDED_MEMORY_SECONDS = 600.0
UNRECORDED_MEMORY_SIZE = 10_000


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
    stream_expires: int | None = None  # bridge mode: the expiry of the call's one media token


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
        self._unrecorded: OrderedDict[tuple[str, str], tuple[float, Joined]] = OrderedDict()
        # Holds the `creating` records it claims; a restarted process is another owner.
        self.owner = process_name()
        work.register(AbandonedInboundSweep, self.settle_abandoned, every=SWEEP_SECONDS)

    async def settle_abandoned(self, _: AbandonedInboundSweep) -> None:
        """Records left `creating` past their lease (their process died mid-creation, or lost the
        store): each adopts the Ultravox call made for it, or fails with the reason. Any replica."""
        lapsed = await self.store.lapsed_creating(now=utcnow(), stale_after=self._stale_after)
        for record in lapsed:
            try:
                settled = await self._settle(record, retake=False, deadline=self._clock() + LOOKUP_SECONDS)
            except UltravoxError as error:  # tried again at the next sweep
                log.warning("%s call %s: left creating; cannot look it up at Ultravox yet: %s", record.carrier,
                            record.carrier_call_id, error.reason)
                continue
            if settled.record.status == IN_PROGRESS:
                log.warning("%s call %s: left creating by a stopped process; adopted its Ultravox call %s",
                            record.carrier, record.carrier_call_id, settled.record.ultravox_call_id)
            else:
                log.warning("%s call %s: left creating by a stopped process; %s", record.carrier,
                            record.carrier_call_id, settled.record.failure_reason)

    async def _settle(self, record: CallRecord, *, retake: bool, deadline: float) -> Claim:
        """Settle a `creating` record whose lease lapsed, by what Ultravox has for it: adopt its call,
        or (none made) fail it, or with `retake` take it over to create the call now. Raises
        UltravoxError when Ultravox cannot say (then nothing is created)."""
        found = await self.ultravox.find_call(RECORD_METADATA_KEY, record.id, deadline=deadline)
        if found is not None and found.join_url and not found.ended:
            # Bridged, the adopted call gets its one media token now: every later answer repeats it.
            return await self.store.settle_creating(record, ultravox_call_id=found.call_id, join_url=found.join_url,
                                                    stream_expires=self.connector.stream_expiry(record.route, record.id))
        if found is not None:
            return await self.store.settle_creating(
                record, ultravox_call_id=found.call_id,
                failure_reason="the gateway stopped while creating the call; its Ultravox call ended unconnected")
        if retake:
            return await self.store.settle_creating(record, retake_for=self.owner, lease=self._stale_after)
        return await self.store.settle_creating(
            record, failure_reason="the gateway stopped while creating the Ultravox call (Ultravox has none for it)")

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
        return Answer(self.connector.answer(carrier, route.name, joined.call_id, joined.join_url,
                                            expires=joined.stream_expires), "connected")

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
        if claim is not None and not claim.owned and self._lapsed(claim.record):
            bind(call_id=claim.record.id)
            try:
                # Its owner is gone: a carrier retry after a crash reuses the call it made, or (none
                # made) retakes the record; never a second Ultravox call for one carrier call.
                claim = await self._settle(claim.record, retake=True, deadline=deadline - RESPONSE_MARGIN_SECONDS)
            except UltravoxError as error:
                log.warning("%s call %s: apology, its record was left creating and Ultravox cannot say "
                            "whether its call exists: %s", carrier.name, call.call_id, error.reason)
                return None
        if claim is not None and not claim.owned:
            bind(call_id=claim.record.id)
            return await self._result_of_other_delivery(claim, deadline)
        if claim is None and (remembered := self._remembered_unrecorded(carrier.name, call.call_id)) is not None:
            log.warning("%s call %s: store unavailable; joining the call created unrecorded for an earlier delivery",
                        carrier.name, call.call_id)
            return remembered
        if claim is None and (made := await self._made_unrecorded_elsewhere(carrier, call, route, deadline)) is not None:
            return made
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
        stream_expires = self.connector.stream_expiry(route.name, gateway_call_id)
        joined = Joined(created.join_url, gateway_call_id, stream_expires)
        if gateway_call_id:
            # Shielded: the Ultravox call exists now, and retries must find its join URL.
            await asyncio.shield(self._quietly(self.store.mark_connected(
                gateway_call_id, ultravox_call_id=created.call_id, join_url=created.join_url,
                stream_expires=stream_expires)))
        else:
            self._remember_unrecorded(carrier.name, call.call_id, joined)
        return joined

    async def _made_unrecorded_elsewhere(self, carrier: Carrier, call: InboundCall, route: RouteSettings,
                                         deadline: float) -> Joined | None:
        """The store is out, and this process made no call for this carrier call: another replica
        (or this one before a restart) may have, unrecorded. Ultravox is asked by the carrier call id
        every call carries in its metadata; if it cannot say, the call is made (never silence)."""
        try:
            found = await self.ultravox.find_call(CARRIER_CALL_METADATA_KEY, call.call_id, also={
                CARRIER_METADATA_KEY: carrier.name}, deadline=min(deadline - RESPONSE_MARGIN_SECONDS,
                                                                  self._clock() + UNRECORDED_LOOKUP_SECONDS))
        except UltravoxError as error:
            log.warning("%s call %s: store unavailable and Ultravox cannot say whether a call was made for it "
                        "elsewhere (%s); making one", carrier.name, call.call_id, error.reason)
            return None
        if found is None or found.ended or not found.join_url:
            return None
        log.warning("%s call %s: store unavailable; joining Ultravox call %s, created unrecorded elsewhere",
                    carrier.name, call.call_id, found.call_id)
        joined = Joined(found.join_url, None, self.connector.stream_expiry(route.name, None))
        self._remember_unrecorded(carrier.name, call.call_id, joined)
        return joined

    def _lapsed(self, record: CallRecord) -> bool:
        """A `creating` record whose owner's lease ran out (records from before leases: by age)."""
        if record.status != CREATING:
            return False
        now = utcnow()
        return record.lease_until < now if record.lease_until else now - record.updated_at > self._stale_after

    def _remember_unrecorded(self, carrier: str, carrier_call_id: str, joined: Joined) -> None:
        self._unrecorded[(carrier, carrier_call_id)] = (self._clock(), joined)
        while len(self._unrecorded) > UNRECORDED_MEMORY_SIZE:
            self._unrecorded.popitem(last=False)

    def _remembered_unrecorded(self, carrier: str, carrier_call_id: str) -> Joined | None:
        entry = self._unrecorded.get((carrier, carrier_call_id))
        if entry is None or self._clock() - entry[0] > UNRECORDED_MEMORY_SECONDS:
            return None
        return entry[1]

    async def _claim(self, call: InboundCall, route: RouteSettings) -> Claim | None:
        try:
            return await self.store.claim_inbound(
                carrier=call.carrier,
                carrier_call_id=call.call_id,
                from_number=call.from_number,
                to_number=call.to_number,
                route=route.name,
                stale_after=self._stale_after,
                owner=self.owner,
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
            return Joined(record.join_url, record.id, record.stream_expires)
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
        ultravox = self.settings.ultravox
        return dt.timedelta(seconds=ultravox.inbound_deadline_seconds + ultravox.creating_lease_margin_seconds)

    @staticmethod
    async def _quietly(operation) -> None:
        try:
            await operation
        except Exception:
            log.exception("store update failed")
