"""Events for the user's systems: what a call change means, written as it happens, delivered signed.

* `EventOutbox` sees every change of a call or transfer inside the store transaction that makes
  it, and answers with what that change implies: events (written in the same transaction, so an
  event exists if and only if its change does) and durable work (call.ended waits for Ultravox's
  summary and transcript). The inbound webhook never waits for a delivery: it only writes rows.
* `EventDelivery` sends them: in every process that delivers (the delivery process beside each
  server process, gateway/delivery_process.py, or the server process itself), one dispatcher per
  endpoint claims the deliveries that are due and head their stream (one endpoint, one call), so
  a call's deliveries go out one at a time in the order they happened, by whichever replica
  claims them; many streams at once.
  It claims and records in batches (one transaction for many deliveries), which is what keeps
  the cost per event small. Signed per Standard Webhooks (the `standardwebhooks` library), the
  same `webhook-id` on every attempt; 2xx is delivered, 410 disables the endpoint, anything else
  is retried per `[events] retry_schedule_seconds` with jitter. The requests are sending.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, cast

import sqlalchemy as sa
from pydantic import BaseModel

from ..settings import EVENT_TYPES, Settings, WebhookSettings
from ..store import CallRecord, CallStore, CallUpdate, TransferRecord, TransferStore
from ..store.calls import utcnow
from ..store.campaigns import CANCELED as CAMPAIGN_CANCELED, COMPLETED as CAMPAIGN_COMPLETED, CampaignChange
from ..store.events import (
    DELIVERED, FAILED, PENDING, Attempt, EventStore, NewEvent, Pending, campaign_stream, insert_events, lock_calls,
    redeliver,
)
from ..store.jobs import NewJob, schedule_job
from ..store.transfers import CONNECTED, RETURNED
from ..ultravox import CallReport, UltravoxClient, UltravoxError
from ..urls import Urls
from ..views import CallView, TransferView, campaign_view, row_view
from ..work import Work
from .sending import IN_FLIGHT_PER_ENDPOINT, HttpSender

log = logging.getLogger("gateway.events")

ARTIFACTS_POLL_SECONDS = 10.0
ULTRAVOX_DEADLINE_SECONDS = 10.0
PRUNE_EVERY_SECONDS = 3600.0
# How long a replica trusts having read an endpoint as enabled: one another replica disabled meanwhile
# gets at most a few more attempts from it, each answered 410 again.
ENDPOINT_STATE_SECONDS = 5.0
# A dispatcher woken by a commit waits this long before it claims, and one whose sends finished
# before it records them: one transaction then covers the deliveries of many calls. It adds this
# much to each delivery's lag, which is not the caller's wait.
GATHER_SECONDS = 0.02
# Due deliveries no commit of this process announced (other replicas' events, retries that came
# due) are looked for this often.
POLL_SECONDS = 1.0
# Deliveries give way to callers: while this process's event loop runs late (it has more to do
# than it can, e.g. a burst of inbound calls), a dispatcher keeps only a few deliveries going, and
# catches up once the loop is on time again. Events are late then; no caller waits for them.
PACE_PROBE_SECONDS = 0.05
LOOP_BEHIND_SECONDS = 0.005  # how late the probe's timer may fire (smoothed) before that
IN_FLIGHT_WHILE_BEHIND = 4
PAUSE_WHILE_BEHIND_SECONDS = 0.25
STORE_RETRY_SECONDS = 1.0  # the store failed a claim or a record: again after this
JITTER = 0.2


# --- the events' data, as receivers get it (and /v1/openapi.json documents it) -------------------
class CallStartedData(BaseModel):
    """The gateway created the Ultravox call for an inbound or outbound call."""

    call: dict[str, Any]


class CallStatusChangedData(BaseModel):
    call: dict[str, Any]
    previous_status: str
    status: str


class Durations(BaseModel):
    total_seconds: float | None  # from the gateway taking the call (or the dial request) to its end
    talk_seconds: float | None  # from the answer (or the agent joining) to the end
    carrier_seconds: int | None  # as the carrier (or Ultravox) reported it


class CallEndedData(BaseModel):
    call: dict[str, Any]
    status: str
    end_reason: str | None
    durations: Durations
    transfers: list[dict[str, Any]]
    recordings: list[str]  # download URLs (bridge mode with recording), one per stretch of the call
    summary: str | None
    short_summary: str | None
    # [{role: user|agent|tool_call|tool_result, text, medium?, tool_name?}]; None: not available
    transcript: list[dict[str, Any]] | None
    # complete: everything Ultravox had; partial: it did not have the summary in time; none: no
    # Ultravox call, or Ultravox did not answer
    artifacts: Literal["complete", "partial", "none"]


class TransferStartedData(BaseModel):
    call_id: str
    transfer: dict[str, Any]


class TransferEndedData(BaseModel):
    call_id: str
    transfer: dict[str, Any]
    # connected: the caller is with a person; returned: back with the agent; failed: not moved
    result: Literal["connected", "returned", "failed"]
    reason: str | None


class CampaignStartedData(BaseModel):
    """A campaign was created: it dispatches from its starts_at."""

    campaign: dict[str, Any]  # as GET /v1/campaigns/{id} shows it


class CampaignEndedData(BaseModel):
    """A campaign ended: every row done (completed), or canceled (its live calls go on to their end)."""

    campaign: dict[str, Any]
    status: Literal["completed", "canceled"]


class CampaignRowFinishedData(BaseModel):
    """A campaign row reached its final status (a call's final status, suppressed, rejected, expired, canceled)."""

    campaign_id: str
    row: dict[str, Any]  # as GET /v1/campaigns/{id}/rows shows it


EVENT_DATA: dict[str, type[BaseModel]] = {
    "call.started": CallStartedData, "call.status_changed": CallStatusChangedData, "call.ended": CallEndedData,
    "transfer.started": TransferStartedData, "transfer.ended": TransferEndedData,
    "campaign.started": CampaignStartedData, "campaign.ended": CampaignEndedData,
    "campaign.row_finished": CampaignRowFinishedData,
}
assert tuple(EVENT_DATA) == EVENT_TYPES


# --- durable work ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportCallEnded:
    call_id: str


@dataclass(frozen=True)
class PruneEvents:
    """Periodic: events past `[events] retention_days` go."""


@dataclass(frozen=True)
class DeliverEvents:
    """The first version's job per stream. Deliveries are claimed directly now, so such a job
    left in the store by that version has nothing to do (its deliveries go out all the same)."""

    endpoint: str
    stream: str


Effect = NewEvent | NewJob


class EventOutbox:
    """What a change means for the user's endpoints, decided in one place (see the module doc)."""

    def __init__(self, settings: Settings, urls: Urls, *, calls_work: Work, wake: Callable[[], None] = lambda: None):
        self.settings = settings
        self.urls = urls
        self.calls_work = calls_work
        self._wake = wake  # the dispatchers of this process: new deliveries

    @property
    def active(self) -> bool:
        return bool(self.settings.webhooks)

    def endpoints_for(self, event_type: str, route: str | None) -> tuple[str, ...]:
        return tuple(webhook.name for webhook in self.settings.webhooks if webhook.wants(event_type, route))

    # --- changes (called inside the store's transactions, on its connection's thread) -------------
    def call_changed(self, before: CallRecord | None, after: CallRecord) -> list[Effect]:
        effects: list[Effect] = []
        started = after.ultravox_call_id and (before is None or not before.ultravox_call_id)
        previous = before.status if before is not None and before.status != after.status else None
        view = CallView.of(after) if started or previous else {}  # the same call in both
        if started:
            effects += self.event("call.started", after, CallStartedData(call=view))
        if previous:
            effects += self.event("call.status_changed", after, CallStatusChangedData(
                call=view, previous_status=previous, status=after.status))
        if after.is_final and (before is None or not before.is_final) and self.endpoints_for("call.ended", after.route):
            effects.append(self.calls_work.job(ReportCallEnded(after.id), delay=self.settings.events.ended_settle_seconds,
                                               key=f"call-ended:{after.id}"))
        return effects

    def transfer_changed(self, before: TransferRecord | None, after: TransferRecord, route: str | None) -> list[Effect]:
        if before is None:
            return self.event("transfer.started", None, TransferStartedData(
                call_id=after.call_id, transfer=TransferView.of(after)), call_id=after.call_id, route=route)
        if after.is_final and not before.is_final:
            result: Literal["connected", "returned", "failed"] = (
                "connected" if after.status == CONNECTED else "returned" if after.status == RETURNED else "failed")
            return self.event("transfer.ended", None, TransferEndedData(
                call_id=after.call_id, transfer=TransferView.of(after), result=result, reason=after.outcome),
                call_id=after.call_id, route=route)
        return []

    def event(self, event_type: str, record: CallRecord | None, data: BaseModel, *, call_id: str | None = None,
               route: str | None = None, key: str | None = None) -> list[Effect]:
        if record is not None:
            call_id, route = record.id, record.route
        endpoints = self.endpoints_for(event_type, route)
        if not endpoints:
            return []
        return [NewEvent(event_type, data.model_dump(mode="json"), endpoints, call_id=call_id, key=key)]

    def write(self, connection: sa.Connection, effects: list[Effect]) -> None:
        """Write `effects` in the caller's transaction: events with their deliveries, and jobs."""
        new_events = [effect for effect in effects if isinstance(effect, NewEvent)]
        if new_events:
            insert_events(connection, new_events)
        for effect in effects:
            if isinstance(effect, NewJob):
                schedule_job(connection, effect)

    def committed(self) -> None:
        """A transaction that may have written events committed: deliver them soon. (The jobs it
        may have written are due seconds later, and the loops look every second anyway.)"""
        self._wake()

    # --- the API's actions ----------------------------------------------------------------------------
    async def emit(self, store: EventStore, effects: list[Effect]) -> None:
        """Write events outside a change of the call (call.ended, after the wait for Ultravox)."""
        def run(connection: sa.Connection) -> None:
            lock_calls(connection, [e.call_id for e in effects if isinstance(e, NewEvent) and e.call_id])
            self.write(connection, effects)

        await store.database.transaction(run)
        self.committed()

    async def redeliver(self, store: EventStore, event_id: str, endpoints: list[str]):
        event = await store.database.transaction(redeliver, event_id, endpoints)
        self.committed()
        return event


class CampaignEvents:
    """A campaign's changes as events, written in their transactions (the CampaignStore's observer).
    One stream per campaign: its rows' events come after campaign.started, in the order they happened."""

    def __init__(self, outbox: EventOutbox):
        self.outbox = outbox

    def campaign_changed(self, connection: sa.Connection, change: CampaignChange) -> None:
        campaign = change.campaign
        route, stream = campaign.spec.get("route"), campaign_stream(campaign.id)
        new: list[NewEvent] = []

        def add(event_type: str, data: BaseModel, call_id: str | None = None) -> None:
            endpoints = self.outbox.endpoints_for(event_type, route)
            if endpoints:
                new.append(NewEvent(event_type, data.model_dump(mode="json"), endpoints, call_id=call_id,
                                    stream_id=stream))

        if change.started:
            add("campaign.started", CampaignStartedData(campaign=campaign_view(campaign, change.counts or {})))
        for row in change.finished:
            add("campaign.row_finished", CampaignRowFinishedData(campaign_id=campaign.id, row=row_view(row)),
                call_id=row.call_id)
        if change.ended and campaign.status in (CAMPAIGN_COMPLETED, CAMPAIGN_CANCELED):
            add("campaign.ended", CampaignEndedData(campaign=campaign_view(campaign, change.counts or {}),
                                                    status=cast(Literal["completed", "canceled"], campaign.status)))
        if new:
            insert_events(connection, new)

    def committed(self) -> None:
        self.outbox.committed()


# --- call.ended: the call as it ended, and what Ultravox made of it ------------------------------
class CallEndedReports:
    """Runs ReportCallEnded: waits (as durable work, never a task) for Ultravox's summary and
    transcript up to `[events] artifacts_wait_seconds` after the end, then writes call.ended once."""

    def __init__(self, settings: Settings, calls: CallStore, transfers: TransferStore, ultravox: UltravoxClient,
                 outbox: EventOutbox, events: EventStore, urls: Urls, *, clock=time.monotonic, now=utcnow):
        self.settings = settings
        self.calls = calls
        self.transfers = transfers
        self.ultravox = ultravox
        self.outbox = outbox
        self.events = events
        self.urls = urls
        self._clock = clock
        self._now = now
        outbox.calls_work.register(ReportCallEnded, self.run)

    async def run(self, job: ReportCallEnded) -> float | None:
        record = await self.calls.get(job.call_id)
        if record is None:
            return None
        report = await self._ultravox_report(record)
        complete = report is not None and report.ended is not None and bool(report.summary or report.short_summary)
        waited = (self._now() - (record.ended_at or record.updated_at)).total_seconds()
        wait_for = self.settings.events.artifacts_wait_seconds
        if record.ultravox_call_id and not complete and waited < wait_for:
            return min(ARTIFACTS_POLL_SECONDS, max(0.5, wait_for - waited))  # look again
        if report is not None and report.summary and not record.summary:
            record = (await self.calls.update(record.id, CallUpdate(summary=report.summary))).record or record
        transfers = await self.transfers.for_call(record.id)
        artifacts: Literal["complete", "partial", "none"] = (
            "none" if report is None else "complete" if complete else "partial")
        data = CallEndedData(
            call=CallView.of(record), status=record.status, end_reason=record.end_reason,
            durations=_durations(record), transfers=[TransferView.of(t) for t in transfers],
            recordings=[self.urls.public("call-recording", call_id=record.id) + f"?part={part}"
                        for part in range(len(record.recordings))],
            summary=(report.summary if report else None) or record.summary,
            short_summary=report.short_summary if report else None,
            transcript=list(report.transcript) if report is not None else None,
            artifacts=artifacts,
        )
        await self.outbox.emit(self.events, self.outbox.event("call.ended", record, data, key=f"call.ended:{record.id}"))
        return None

    async def _ultravox_report(self, record: CallRecord) -> CallReport | None:
        """None: no Ultravox call, or Ultravox does not know it or did not answer."""
        if not record.ultravox_call_id:
            return None
        try:
            return await self.ultravox.call_report(
                record.ultravox_call_id, deadline=self._clock() + ULTRAVOX_DEADLINE_SECONDS)
        except UltravoxError as error:
            log.info("call %s: Ultravox's summary and transcript not read: %s", record.id, error.reason)
            return None


def _durations(record: CallRecord) -> Durations:
    end = record.ended_at
    return Durations(
        total_seconds=round((end - record.created_at).total_seconds(), 3) if end else None,
        talk_seconds=round((end - record.answered_at).total_seconds(), 3) if end and record.answered_at else None,
        carrier_seconds=record.duration_seconds,
    )


# --- delivery ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    pending: Pending
    attempt: Attempt
    status: str  # DELIVERED, FAILED (given up) or PENDING (again at retry_at)
    retry_at: dt.datetime | None = None
    gone: bool = False  # 410: the endpoint is to be disabled
    probe_failed: bool = False  # sent before its retry was due, and failed: it counts for no retry


class DeliveryMetrics(Protocol):
    """Where EventDelivery counts its attempts: this process's /metrics (gateway.metrics.Metrics), or
    the serving process's, relayed from a delivery process (gateway.delivery_process)."""

    def delivery_counted(self, endpoint: str, result: str, count: int = 1) -> None: ...

    def delivery_lag_seen(self, endpoint: str, seconds: float) -> None: ...


class EventUpkeep:
    """The events' periodic durable work (PruneEvents), in every serving process whoever delivers."""

    def __init__(self, settings: Settings, events: EventStore, work: Work, *, now=utcnow):
        self.settings = settings
        self.events = events
        self._now = now
        work.register(PruneEvents, self.prune, every=PRUNE_EVERY_SECONDS)
        work.register(DeliverEvents, _nothing_left)

    async def prune(self, _: PruneEvents) -> None:
        before = self._now() - dt.timedelta(days=self.settings.events.retention_days)
        skipped = await self.events.skip_unconfigured([webhook.name for webhook in self.settings.webhooks], before)
        if skipped:
            log.warning("%d old event deliveries given up: their endpoints are no longer configured", skipped)
        while await self.events.prune(before) > 0:
            pass


class EventDelivery:
    """Sends the events: one `_Dispatcher` per configured endpoint in this process (see the module doc).
    `gather_seconds`: how long a dispatcher lets commits and sends gather before a transaction."""

    def __init__(self, settings: Settings, events: EventStore, sender: HttpSender,
                 *, callers_waiting: Callable[[], bool] = lambda: False, metrics: DeliveryMetrics | None = None,
                 gather_seconds: float = GATHER_SECONDS, clock=time.monotonic, now=utcnow,
                 rng: random.Random | None = None):
        self.settings = settings
        self.callers_waiting = callers_waiting  # carrier webhooks are being answered
        self.events = events
        self.sender = sender
        self.metrics = metrics
        self.gather_seconds = gather_seconds
        self.clock = clock
        self._now = now
        self._random = rng or random.Random()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # whose claims these are
        self._enabled_seen: dict[str, float] = {}  # endpoint -> when it was last read as enabled
        self._expedited: dict[str, float] = {}  # endpoint -> when its waiting deliveries were last expedited
        self._dispatchers = [_Dispatcher(self, webhook) for webhook in settings.webhooks]
        self.pace = LoopPace()

    def wake(self) -> None:
        for dispatcher in self._dispatchers:
            dispatcher.wake()

    def giving_way(self) -> bool:
        """Callers are waiting and the loop is behind: deliveries keep to a trickle. (The loop being
        behind with no caller waiting is the deliveries' own doing: they go on at full pace.)"""
        return self.pace.behind() and self.callers_waiting()

    async def start(self) -> None:
        if self._dispatchers:
            await self.sender.start()
            self.pace.start()
        for dispatcher in self._dispatchers:
            dispatcher.start()

    async def stop(self) -> None:
        await asyncio.gather(*(dispatcher.stop() for dispatcher in self._dispatchers))
        await self.pace.stop()
        await self.sender.stop()  # after the dispatchers: their last sends are answered first

    def lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.events.timeout_seconds + self.settings.events.lease_margin_seconds)

    async def record(self, endpoint: WebhookSettings, outcomes: list[Outcome], *, claim: int = 0) -> list[Pending]:
        """What the attempts came to, and a claim of up to `claim` due deliveries (those the attempts
        freed included), in one transaction (a crash before it sends them again: at least once, the
        same webhook-id). Nothing is claimed for an endpoint that just answered 410. Then `recorded`."""
        gone = any(o.gone for o in outcomes)
        return await self.events.attempted_and_claim(self.owner, outcomes, endpoint.name, lease=self.lease(),
                                                     limit=0 if gone else claim)

    async def recorded(self, endpoint: WebhookSettings, outcomes: list[Outcome]) -> None:
        """What recorded attempts mean for the endpoint: back after failures, or gone (410)."""
        if any(o.status == DELIVERED and o.pending.attempts for o in outcomes):
            await self._recovered(endpoint)
        gone = next((o for o in outcomes if o.gone), None)
        if gone is not None:
            await self._disable(endpoint, gone.pending)

    async def disabled(self, name: str) -> str | None:
        """Why the endpoint is disabled (a 410), or None. That it is enabled is read at most every
        few seconds; that it is disabled, every time (so enabling it takes effect at once)."""
        enabled_at = self._enabled_seen.get(name)
        if enabled_at is not None and self.clock() - enabled_at < ENDPOINT_STATE_SECONDS:
            return None
        state = await self.events.endpoint(name)
        if state.disabled_at is not None:
            self._enabled_seen.pop(name, None)
            return state.disabled_reason or "disabled"
        self._enabled_seen[name] = self.clock()
        return None

    async def deliver(self, endpoint: WebhookSettings, pending: Pending) -> Outcome:
        """Send one delivery; what it comes to (delivered, failed for good, or pending a retry)."""
        sent_at = self._now()
        sent = await self.sender.send(endpoint.name, pending.event_id, pending.body)
        attempt = Attempt(self._now(), sent.status_code, sent.error, sent.duration_ms)
        if sent.delivered:
            self._count(endpoint, "delivered")
            if self.metrics is not None:
                self.metrics.delivery_lag_seen(
                    endpoint.name, max(0.0, (attempt.attempted_at - pending.occurred_at).total_seconds()))
            return Outcome(pending, attempt, DELIVERED)
        if sent.status_code == 410:
            return Outcome(pending, attempt, FAILED, gone=True)
        if pending.due_at > sent_at:  # a probe, sent before its retry was due: that retry stands
            return Outcome(pending, attempt, PENDING, retry_at=pending.due_at, probe_failed=True)
        schedule = self.settings.events.retry_schedule_seconds
        if pending.attempts + 1 > len(schedule):
            self._count(endpoint, "failed")
            log.warning("event %s to %s given up after %d attempts: %s", pending.event_id, endpoint.name,
                        pending.attempts + 1, sent.error or sent.status_code)
            return Outcome(pending, attempt, FAILED)
        self._count(endpoint, "retrying")
        delay = schedule[pending.attempts] * self._random.uniform(1 - JITTER, 1 + JITTER)
        if sent.retry_after is not None:  # the receiver says when (429, 503), within the schedule's longest wait
            delay = min(max(delay, sent.retry_after), max(schedule))
        log.info("event %s to %s: %s; attempt %d in %.0f s", pending.event_id, endpoint.name,
                 sent.error or f"answered {sent.status_code}", pending.attempts + 2, delay)
        return Outcome(pending, attempt, PENDING, retry_at=attempt.attempted_at + dt.timedelta(seconds=delay))

    async def _recovered(self, endpoint: WebhookSettings) -> None:
        """A delivery that had failed went through: the endpoint is back, so its other calls' deliveries
        need not wait for their next retry (once for a recovery, not for each of those deliveries)."""
        last = self._expedited.get(endpoint.name)
        if last is not None and self.clock() - last < ENDPOINT_STATE_SECONDS:
            return
        self._expedited[endpoint.name] = self.clock()
        woken = await self.events.expedite(endpoint.name)
        log.info("endpoint %s answers again: %d deliveries waiting to retry go now", endpoint.name, woken)

    async def _disable(self, endpoint: WebhookSettings, pending: Pending) -> None:
        """The endpoint answered 410 Gone: nothing more goes to it until it is enabled again."""
        reason = f"answered 410 Gone to {pending.event_id}"
        await self.events.disable(endpoint.name, reason)  # its waiting deliveries given up with it
        self._enabled_seen.pop(endpoint.name, None)
        self._count(endpoint, "disabled")
        log.warning("endpoint %s disabled: it %s; enable it with POST /v1/webhooks/%s/enable",
                    endpoint.name, reason, endpoint.name)

    def _count(self, endpoint: WebhookSettings, result: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery_counted(endpoint.name, result)


async def _nothing_left(_: DeliverEvents) -> None:
    return None


class _Dispatcher:
    """One endpoint's deliveries from this process: claims what is due (the heads of their
    streams), sends each at once, up to IN_FLIGHT_PER_ENDPOINT at a time, and records what they
    came to together. A stream's next delivery is due only once its head is recorded, so the
    order per call holds whichever replica sends what."""

    def __init__(self, delivery: EventDelivery, endpoint: WebhookSettings):
        self.delivery = delivery
        self.endpoint = endpoint
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task] = set()
        self._finished: list[Outcome] = []
        self._look = True  # claim at the next turn (woken, polled, or successors freed)
        self._failing = False  # the last attempt recorded here failed: probe ([events] probe_interval_seconds)
        self._probed_at = float("-inf")
        self._stopping = False
        self._task: asyncio.Task | None = None

    def wake(self) -> None:
        self._look = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"deliver-{self.endpoint.name}")

    async def stop(self) -> None:
        """Let the sends under way finish (within the send timeout) and record them; what is not
        recorded is sent again by whichever process claims it once its lease runs out."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.delivery.settings.events.timeout_seconds + 1)
        except TimeoutError:  # the store does not answer: leave it to the leases
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._sending):
            task.cancel()

    async def _run(self) -> None:
        while not self._stopping or self._sending or self._finished:
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store failed: nothing is lost (leases run out), try again shortly
                log.exception("deliveries to %s: the store failed; again in %.0f s", self.endpoint.name,
                              STORE_RETRY_SECONDS)
                await asyncio.sleep(STORE_RETRY_SECONDS)
                self._look = True

    async def _turn(self) -> None:
        finished, self._finished = self._finished, []
        if any(o.status != PENDING for o in finished):
            self._look = True  # their streams' next deliveries are due once these are recorded
        behind = self.delivery.giving_way()
        room = (IN_FLIGHT_WHILE_BEHIND if behind else IN_FLIGHT_PER_ENDPOINT) - len(self._sending)
        claiming = self._look and room > 0 and not self._stopping
        if claiming:
            self._look = False
        try:
            if claiming and await self.delivery.disabled(self.endpoint.name) is not None:
                await self.delivery.events.skip_endpoint(self.endpoint.name, "the endpoint is disabled")
                claiming = False
            # One transaction records what finished and claims what is due next.
            claimed = (await self.delivery.record(self.endpoint, finished, claim=room if claiming else 0)
                       if finished or claiming else [])
        except Exception:
            self._finished[:0] = finished  # recorded with the next ones
            raise
        if finished:
            last = finished[-1]
            self._failing = last.status == PENDING or (last.status == FAILED and not last.gone)
        if claiming:
            if not claimed and self._failing and self._probe_due():
                claimed = await self.delivery.events.claim(self.endpoint.name, self.delivery.owner,
                                                           lease=self.delivery.lease(), limit=1, early=True)
            for pending in claimed:
                task = asyncio.get_running_loop().create_task(self._send(pending))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            self._look = len(claimed) == room  # a full claim: there may be more
        if finished:
            await self.delivery.recorded(self.endpoint, finished)
        if behind and not self._stopping:
            await asyncio.sleep(PAUSE_WHILE_BEHIND_SECONDS)
            self._look = True
            return
        if self._finished or self._look and len(self._sending) < IN_FLIGHT_PER_ENDPOINT:
            await asyncio.sleep(self.delivery.gather_seconds)
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), POLL_SECONDS if not self._stopping else
                                   self.delivery.settings.events.timeout_seconds)
        except TimeoutError:
            self._look = True
        else:
            await asyncio.sleep(self.delivery.gather_seconds)  # let more commits and sends gather

    def _probe_due(self) -> bool:
        now = self.delivery.clock()
        if now - self._probed_at < self.delivery.settings.events.probe_interval_seconds:
            return False
        self._probed_at = now
        return True

    async def _send(self, pending: Pending) -> None:
        try:
            outcome = await self.delivery.deliver(self.endpoint, pending)
        except Exception:  # a bug, not the receiver: its lease runs out and it goes again
            log.exception("event %s to %s: not sent", pending.event_id, self.endpoint.name)
            return
        self._finished.append(outcome)
        self._wake.set()


class LoopPace:
    """Whether this process's event loop is behind: how late a timer set PACE_PROBE_SECONDS ahead
    fires (a loop with more ready work than it gets through runs timers late), smoothed."""

    def __init__(self):
        self.late = 0.0
        self._task: asyncio.Task | None = None

    def behind(self) -> bool:
        return self.late > LOOP_BEHIND_SECONDS

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-pace")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + PACE_PROBE_SECONDS
            await asyncio.sleep(PACE_PROBE_SECONDS)
            self.late = 0.7 * self.late + 0.3 * max(0.0, loop.time() - planned)
