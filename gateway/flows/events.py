"""Events for the user's systems: what a call change means, written as it happens, delivered signed.

* `EventOutbox` sees every change of a call or transfer inside the store transaction that makes
  it, and answers with what that change implies: events (written in the same transaction, so an
  event exists if and only if its change does) and durable work (call.ended waits for Ultravox's
  summary and transcript). The inbound webhook never waits for a delivery: it only writes rows.
* `EventDelivery` sends them: durable work per stream (one endpoint, one call), so deliveries of
  a call go out one at a time in the order they happened, by whichever replica claims the stream.
  Signed per Standard Webhooks (the `standardwebhooks` library), the same `webhook-id` on every
  attempt; 2xx is delivered, 410 disables the endpoint, anything else is retried per
  `[events] retry_schedule_seconds` with jitter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import sqlalchemy as sa
from pydantic import BaseModel
from standardwebhooks import Webhook

from ..http import retry_after_seconds
from ..settings import EVENT_TYPES, Settings, WebhookSettings
from ..store import CallRecord, CallStore, CallUpdate, TransferRecord, TransferStore
from ..store.calls import utcnow
from ..store.events import (
    DELIVERED, FAILED, PENDING, Attempt, EventStore, NewEvent, Pending, insert_events, lock_calls, redeliver,
)
from ..store.jobs import JobStore, NewJob, schedule_job
from ..store.transfers import CONNECTED, RETURNED
from ..ultravox import CallReport, UltravoxClient, UltravoxError
from ..urls import Urls
from ..views import CallView, TransferView
from ..work import Work

log = logging.getLogger("gateway.events")

# A final status may still be corrected by the carrier's own a moment later (see CallUpdate's
# `provisional`): call.ended reports the status after this.
ENDED_SETTLE_SECONDS = 2.0
ARTIFACTS_POLL_SECONDS = 10.0
ULTRAVOX_DEADLINE_SECONDS = 10.0
PRUNE_EVERY_SECONDS = 3600.0
STREAM_BATCH = 20
# How long a replica trusts having read an endpoint as enabled: one another replica disabled meanwhile
# gets at most a few more attempts from it, each answered 410 again.
ENDPOINT_STATE_SECONDS = 5.0  # deliveries read at once from a stream
STREAM_BUDGET_SECONDS = 25.0  # then the stream's job yields its slot (and runs again at once)
JITTER = 0.2
USER_AGENT = "ultravox-telephony-gateway"


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


EVENT_DATA: dict[str, type[BaseModel]] = {
    "call.started": CallStartedData, "call.status_changed": CallStatusChangedData, "call.ended": CallEndedData,
    "transfer.started": TransferStartedData, "transfer.ended": TransferEndedData,
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
    endpoint: str
    stream: str  # a call id (or an event id, for an event of no call)


def stream_key(endpoint: str, stream: str) -> str:
    return f"deliver:{endpoint}:{stream}"


Effect = NewEvent | NewJob


class EventOutbox:
    """What a change means for the user's endpoints, decided in one place (see the module doc)."""

    def __init__(self, settings: Settings, urls: Urls, *, calls_work: Work, delivery_work: Work):
        self.settings = settings
        self.urls = urls
        self.calls_work = calls_work
        self.delivery_work = delivery_work

    @property
    def active(self) -> bool:
        return bool(self.settings.webhooks)

    def endpoints_for(self, event_type: str, route: str | None) -> tuple[str, ...]:
        return tuple(webhook.name for webhook in self.settings.webhooks if webhook.wants(event_type, route))

    # --- changes (called inside the store's transactions, on its connection's thread) -------------
    def call_changed(self, before: CallRecord | None, after: CallRecord) -> list[Effect]:
        effects: list[Effect] = []
        if after.ultravox_call_id and (before is None or not before.ultravox_call_id):
            effects += self.event("call.started", after, CallStartedData(call=CallView.of(after)))
        if before is not None and before.status != after.status:
            effects += self.event("call.status_changed", after, CallStatusChangedData(
                call=CallView.of(after), previous_status=before.status, status=after.status))
        if after.is_final and (before is None or not before.is_final) and self.endpoints_for("call.ended", after.route):
            effects.append(self.calls_work.job(ReportCallEnded(after.id), delay=ENDED_SETTLE_SECONDS,
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
        """Write `effects` in the caller's transaction: events with their deliveries, the streams'
        jobs (one per endpoint and call, run again if they are running), other jobs."""
        new_events = [effect for effect in effects if isinstance(effect, NewEvent)]
        for endpoint, stream in insert_events(connection, new_events) if new_events else ():
            schedule_job(connection, self._stream_job(endpoint, stream))
        for effect in effects:
            if isinstance(effect, NewJob):
                schedule_job(connection, effect)

    def _stream_job(self, endpoint: str, stream: str) -> NewJob:
        return self.delivery_work.job(DeliverEvents(endpoint, stream), key=stream_key(endpoint, stream), coalesce=True)

    def committed(self) -> None:
        """A transaction that may have written events committed: deliver them now. (The jobs it
        may have written are due seconds later, and the loops look every second anyway.)"""
        self.delivery_work.wake()

    # --- the API's actions ----------------------------------------------------------------------------
    async def emit(self, store: EventStore, effects: list[Effect]) -> None:
        """Write events outside a change of the call (call.ended, after the wait for Ultravox)."""
        def run(connection: sa.Connection) -> None:
            lock_calls(connection, [e.call_id for e in effects if isinstance(e, NewEvent) and e.call_id])
            self.write(connection, effects)

        await store.database.transaction(run)
        self.committed()

    async def redeliver(self, store: EventStore, event_id: str, endpoints: list[str]):
        def run(connection: sa.Connection):
            event, streams = redeliver(connection, event_id, endpoints)
            for endpoint, stream in streams:
                schedule_job(connection, self._stream_job(endpoint, stream))
            return event

        event = await store.database.transaction(run)
        self.committed()
        return event


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
class Sent:
    status_code: int | None
    error: str | None
    retry_after: float | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Outcome:
    pending: Pending
    attempt: Attempt
    status: str  # DELIVERED, FAILED (given up) or PENDING (retry_in seconds from now)
    retry_in: float | None = None
    gone: bool = False  # 410: the endpoint is to be disabled


class EventDelivery:
    """Runs DeliverEvents: a stream's deliveries in order, until it is empty or has to wait."""

    def __init__(self, settings: Settings, events: EventStore, jobs: JobStore, work: Work, http: httpx.AsyncClient,
                 *, metrics=None, clock=time.monotonic, now=utcnow, rng: random.Random | None = None):
        self.settings = settings
        self.events = events
        self.jobs = jobs
        self.http = http
        self.metrics = metrics
        self._clock = clock
        self._now = now
        self._random = rng or random.Random()
        self._signers = {webhook.name: Webhook(webhook.secret) for webhook in settings.webhooks}
        self._enabled_seen: dict[str, float] = {}  # endpoint -> when it was last read as enabled
        self._expedited: dict[str, float] = {}  # endpoint -> when its waiting deliveries were last expedited
        # A stream's job fails only when the store does: keep at it for hours rather than strand the
        # stream's deliveries (a new event or a redelivery would start it again, but may never come).
        work.register(DeliverEvents, self.run, max_attempts=100)
        work.register(PruneEvents, self.prune, every=PRUNE_EVERY_SECONDS)

    async def prune(self, _: PruneEvents) -> None:
        before = self._now() - dt.timedelta(days=self.settings.events.retention_days)
        while await self.events.prune(before) > 0:
            pass

    async def run(self, job: DeliverEvents) -> float | None:
        endpoint = self.settings.webhook_named(job.endpoint)
        if endpoint is None:
            skipped = await self.events.skip_stream(job.endpoint, job.stream, "the endpoint is no longer configured")
            log.warning("%d event(s) for endpoint %s not sent: it is no longer configured", skipped, job.endpoint)
            return None
        disabled = await self._disabled(endpoint.name)
        if disabled is not None:
            await self.events.skip_stream(endpoint.name, job.stream, f"the endpoint is disabled: {disabled}")
            return None
        started = self._clock()
        while self._clock() - started < STREAM_BUDGET_SECONDS:
            batch = await self.events.pending(endpoint.name, job.stream, STREAM_BATCH)
            # What the attempts came to, recorded together (a crash before that sends them again:
            # at least once, the same webhook-id).
            outcomes: list[Outcome] = []
            later: float | None = None
            for pending in batch:
                if self._clock() - started >= STREAM_BUDGET_SECONDS:
                    break
                outcome = await self._deliver(endpoint, pending)
                outcomes.append(outcome)
                if outcome.status == PENDING or outcome.gone:
                    later = outcome.retry_in
                    break
            await self.events.attempted(outcomes)
            if any(o.status == DELIVERED and o.pending.attempts for o in outcomes):
                await self._recovered(endpoint)
            if outcomes and outcomes[-1].gone:
                await self._disable(endpoint, job.stream, outcomes[-1].pending)
                return None
            if later is not None:
                return later
            if len(outcomes) == len(batch) and len(batch) < STREAM_BATCH:
                # All there was. An event written since asked for this job again (it coalesces), so
                # it runs once more: no need to look here.
                return None
        return 0.0  # more to send: again at once, after others had their turn

    async def _disabled(self, name: str) -> str | None:
        """Why the endpoint is disabled (a 410), or None. That it is enabled is read at most every
        few seconds; that it is disabled, every time (so enabling it takes effect at once)."""
        enabled_at = self._enabled_seen.get(name)
        if enabled_at is not None and self._clock() - enabled_at < ENDPOINT_STATE_SECONDS:
            return None
        state = await self.events.endpoint(name)
        if state.disabled_at is not None:
            self._enabled_seen.pop(name, None)
            return state.disabled_reason or "disabled"
        self._enabled_seen[name] = self._clock()
        return None

    async def _deliver(self, endpoint: WebhookSettings, pending: Pending) -> "Outcome":
        """Send one delivery; what it comes to (delivered, failed for good, or pending a retry)."""
        sent = await self._send(endpoint, pending)
        attempt = Attempt(self._now(), sent.status_code, sent.error, sent.duration_ms)
        if sent.delivered:
            self._count(endpoint, "delivered")
            if self.metrics is not None:
                self.metrics.delivery_lag.labels(endpoint.name).observe(
                    max(0.0, (attempt.attempted_at - pending.occurred_at).total_seconds()))
            return Outcome(pending, attempt, DELIVERED)
        if sent.status_code == 410:
            return Outcome(pending, attempt, FAILED, gone=True)
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
        return Outcome(pending, attempt, PENDING, retry_in=delay)

    async def _recovered(self, endpoint: WebhookSettings) -> None:
        """A delivery that had failed went through: the endpoint is back, so its other calls' deliveries
        need not wait for their next retry (once for a recovery, not for each of those deliveries)."""
        last = self._expedited.get(endpoint.name)
        if last is not None and self._clock() - last < ENDPOINT_STATE_SECONDS:
            return
        self._expedited[endpoint.name] = self._clock()
        woken = await self.jobs.expedite(DeliverEvents.__name__, stream_key(endpoint.name, ""))
        log.info("endpoint %s answers again: %d call(s) waiting to retry go now", endpoint.name, woken)

    async def _disable(self, endpoint: WebhookSettings, stream: str, pending: Pending) -> None:
        """The endpoint answered 410 Gone: nothing more goes to it until it is enabled again."""
        reason = f"answered 410 Gone to {pending.event_id}"
        await self.events.disable(endpoint.name, reason)
        self._enabled_seen.pop(endpoint.name, None)
        await self.events.skip_stream(endpoint.name, stream, f"the endpoint is disabled: {reason}")
        self._count(endpoint, "disabled")
        log.warning("endpoint %s disabled: it %s; enable it with POST /v1/webhooks/%s/enable",
                    endpoint.name, reason, endpoint.name)

    async def _send(self, endpoint: WebhookSettings, pending: Pending) -> Sent:
        now = self._now()
        # The timestamp is this attempt's (receivers refuse old ones); the id and the body are the event's.
        headers = {
            "webhook-id": pending.event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signers[endpoint.name].sign(pending.event_id, now, pending.body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        started = self._clock()
        status_code, error, retry_after = None, None, None
        try:
            async with asyncio.timeout(self.settings.events.timeout_seconds):
                # Streamed and not read: what the receiver says beyond its status is not ours to keep.
                async with self.http.stream("POST", endpoint.url, content=pending.body.encode(), headers=headers) as response:
                    status_code = response.status_code
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
        except TimeoutError:
            error = f"no answer within {self.settings.events.timeout_seconds:g} s"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"[:200]
        if status_code is not None and not 200 <= status_code < 300:
            error = f"answered {status_code}"
        return Sent(status_code, error, retry_after, round((self._clock() - started) * 1000))

    def _count(self, endpoint: WebhookSettings, result: str) -> None:
        if self.metrics is not None:
            self.metrics.deliveries.labels(endpoint.name, result).inc()
