"""create_app(settings) -> Starlette: the route table and the process-wide resources it shares."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import time
from pathlib import Path

import httpx
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from .access import guarded
from .api import CallsApi, EventsApi
from .callbacks import UltravoxCallbacks
from .campaigns_api import CampaignsApi
from .control import CallControlApi
from .carriers import CARRIERS, Carrier
from .drain import Drain
from .flows.call_request import CallBodies
from .flows.campaigns import CampaignFlow
from .flows.connect import Connector
from .delivery_process import DeliveryProcess
from .flows.events import CallEndedReports, CampaignEvents, EventDelivery, EventOutbox, EventUpkeep
from .flows.control import CallControl
from .flows.handover import HandoverFlow
from .flows.inbound import InboundFlow
from .flows.replays import ReplayMemory
from .flows.outbound import OutboundFlow
from .flows.sending import HttpSender
from .flows.tracking import CallTracking
from .flows.transfer import TRANSFER_STEPS, TransferFlow
from .http import create_client
from .logs import RequestIds
from .media.admission import MediaSockets
from .media.bridge import MediaBridge
from .media.recording import RecordingUpkeep, recording_dirs, recording_file
from .metrics import MAX_CAMPAIGN_SERIES, CampaignFigures, LiveCounts, Metrics
from .security import match_api_key
from .settings import Settings
from .store import CallRecord, CallStore, TransferStore
from .store.calls import utcnow
from .store.campaigns import CampaignStore
from .store.events import EventStore
from .store.jobs import JobStore
from .ultravox import UltravoxClient, create_http_client
from .urls import Urls
from .webhooks import CarrierWebhooks
from .work import Work

log = logging.getLogger("gateway")

UPKEEP_EVERY_SECONDS = 3600.0
# A call the store still has live after this long was never told it ended (a lost callback): not live.
LIVE_HORIZON = dt.timedelta(hours=12)
LIVE_COUNTS_TIMEOUT_SECONDS = 1.0


class Gateway:
    """The shared resources (store, pooled HTTP clients, carriers) and the services built on them."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.carriers: dict[str, Carrier] = {name: cls(settings) for name, cls in CARRIERS.items()}
        self.metrics = Metrics(list(self.carriers))
        self.urls = Urls(settings)
        # Built at start-up, on the server's event loop.
        self.store: CallStore | None = None
        self.http: httpx.AsyncClient | None = None
        self.carrier_http: httpx.AsyncClient | None = None
        self.transfer: TransferFlow | None = None
        self.webhooks: CarrierWebhooks | None = None
        self.callbacks: UltravoxCallbacks | None = None
        self.media: MediaSockets | None = None
        self.api: CallsApi | None = None
        self.control: CallControlApi | None = None
        self.work: Work | None = None
        self.delivery: EventDelivery | DeliveryProcess | None = None
        self.campaign_work: Work | None = None
        self.campaigns_api: CampaignsApi | None = None
        self.campaign_store: CampaignStore | None = None
        self.events_api: EventsApi | None = None
        self.handover: HandoverFlow | None = None
        self.drainer: Drain | None = None
        self.recording_upkeep: RecordingUpkeep | None = None
        self._upkeep: asyncio.Task | None = None
        self.transfers: TransferStore | None = None
        self.connector = Connector(settings, self.urls)
        self._live_counts_ok = True  # the last scrape could read them (a failure is logged once)

    async def start(self) -> None:
        if self.settings.insecure_skip_signature_verification:
            log.warning("=" * 72)
            log.warning("INSECURE: carrier signature verification is OFF. Anyone can forge webhooks.")
            log.warning("Use this for local development only.")
            log.warning("=" * 72)
        for note in self.settings.warnings():
            log.warning("config: %s", note)
        settings, clock, carriers, urls = self.settings, self.clock, self.carriers, self.urls
        self.store = store = CallStore.open(settings.database_url)
        await store.migrate()
        self.http = create_http_client(settings.ultravox)
        # Carrier REST calls share one client; each request carries its own auth and its carrier's
        # timeout (the client's own is only an outer bound).
        slowest = max((carrier.config.request_timeout_seconds for carrier in carriers.values()), default=10.0)
        self.carrier_http = create_client(pool_size=20, timeout=slowest)
        ultravox = UltravoxClient(self.http, settings.ultravox, clock=clock)
        self.transfers = transfers = TransferStore(store.database)
        # Each flow registers the durable work it does; the loops start once all have. Deliveries
        # to the user's endpoints are not jobs: each endpoint has a dispatcher of its own (so a
        # slow endpoint never holds a transfer's timer), claiming the deliveries themselves.
        jobs = JobStore(store.database)
        self.work = work = Work(jobs, lease_seconds=settings.work_lease_seconds, poll_seconds=settings.work_poll_seconds)
        events = EventStore(store.database)
        EventUpkeep(settings, events, work)
        if settings.webhooks and settings.events.delivery_process:
            self.delivery = DeliveryProcess(settings, metrics=self.metrics)
        else:
            self.delivery = EventDelivery(
                settings, events, HttpSender(settings.webhooks, settings.events.timeout_seconds), metrics=self.metrics,
                callers_waiting=lambda: self.webhooks is not None and self.webhooks.in_flight > 0)
        outbox = EventOutbox(settings, urls, calls_work=work, wake=self.delivery.wake)
        if outbox.active:  # no endpoint: no events written at all
            store.observer = transfers.observer = outbox
        self.events_api = EventsApi(settings, events, outbox)
        bodies, connector = CallBodies(settings, urls), self.connector
        outbound = OutboundFlow(settings, store, ultravox, carriers, self.carrier_http, urls=urls, bodies=bodies,
                                connector=connector, work=work, clock=clock)
        control = CallControl(store, ultravox, carriers, self.carrier_http, clock=clock)
        tracking = CallTracking(store, transfers, on_stray_leg=control.stray_leg)
        self.transfer = TransferFlow(
            settings, store, transfers, ultravox, carriers, self.carrier_http, work=work, urls=urls, bodies=bodies,
            connector=connector, on_outcome=lambda t: self.metrics.transfers.labels(t.operator, t.kind, t.status).inc(),
        )
        self.handover = HandoverFlow(settings, store, ultravox, carriers, self.carrier_http, urls=urls, bodies=bodies,
                                     connector=connector, clock=clock)
        self.webhooks = CarrierWebhooks(
            settings, carriers, urls, self.metrics, clock=clock, inbound=InboundFlow(
                settings, store, ultravox, bodies, connector, work=work, clock=clock),
            outbound=outbound, tracking=tracking, transfer=self.transfer, transfers=transfers,
            handover=self.handover, replays=ReplayMemory(settings, store, work=work),
        )
        self.api = CallsApi(settings, store, outbound, transfers)
        # Campaign dispatch has a loop of its own too: a burst of dials never holds a transfer's timer.
        self.campaign_work = Work(jobs, lease_seconds=settings.work_lease_seconds,
                                  poll_seconds=settings.work_poll_seconds)
        self.campaign_store = campaign_store = CampaignStore(
            store.database, observer=CampaignEvents(outbox) if outbox.active else None)
        campaigns = CampaignFlow(settings, campaign_store, store, outbound, work=self.campaign_work, clock=clock,
                                 on_row_outcome=self.metrics.campaign_row_outcome,
                                 on_capacity_refusal=lambda _: self.metrics.campaign_refusals.inc())
        outbound.on_over_capacity = campaigns.over_capacity
        self.callbacks = UltravoxCallbacks(settings, self.transfer, tracking, campaigns)
        self.campaigns_api = CampaignsApi(settings, campaign_store, campaigns)
        CallEndedReports(settings, store, transfers, ultravox, outbox, events, urls, clock=clock)
        self.control = CallControlApi(settings, store, carriers, control, self.transfer)
        # Repair and retention of the recording directories: at start, then hourly. Each process
        # looks after the directories it sees (a pod's own volume, or a shared one: both idempotent),
        # so this is not shared durable work: any replica could not reach another's local volume.
        self.recording_upkeep = RecordingUpkeep(recording_dirs(settings.routes), store)
        self._upkeep = asyncio.get_running_loop().create_task(
            _repeat(self.recording_upkeep.run, UPKEEP_EVERY_SECONDS), name="recording-upkeep")

        async def transfer_active(call_id: str) -> bool:
            return any(not t.is_final for t in await transfers.for_call(call_id))

        bridge = MediaBridge(store, self.carrier_http, recordings=self._recording_path,
                             on_stats=self.metrics.add_media_stats, transfer_active=transfer_active)
        self.drainer = Drain(bridge, self.handover, drain_seconds=settings.drain_seconds, clock=clock,
                             on_change=lambda draining: self.metrics.draining.set(int(draining)))
        self.media = MediaSockets(
            settings, carriers, store, bridge, connector, public_url=urls.of_request,
            on_refused=lambda carrier: self.metrics.webhooks.labels(carrier.name, "media_refused").inc(),
        )
        await work.start()
        await self.delivery.start()
        await self.campaign_work.start()
        # The ~120k objects of the loaded libraries never die: keep them out of the collector's
        # full passes, which otherwise paused the event loop 20–50 ms (measured in bench/bridge.py).
        gc.freeze()

    async def drain(self) -> None:
        """SIGTERM: see gateway/drain.py. The server stops once this returns."""
        if self.drainer is not None:
            await self.drainer.run()

    async def stop(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        if self.delivery is not None:
            await self.delivery.stop()
        for loop in (self.work, self.campaign_work):
            if loop is not None:
                await loop.stop()
        for client in (self.http, self.carrier_http):
            if client is not None:
                await client.aclose()
        if self.store is not None:
            await self.store.close()

    def _recording_path(self, record: CallRecord) -> Path | None:
        route = self.settings.route_named(record.route) if record.route else None
        if not route or not route.recording_dir:
            return None
        return recording_file(route.recording_dir, record.id)

    # --- operations -------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.drainer is not None and self.drainer.draining:  # the load balancer sends new calls elsewhere
            return JSONResponse({"status": "draining"}, status_code=503)
        problems = []
        assert self.store is not None  # started before any request is served
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2)
        except Exception as error:
            problems.append(f"store unavailable: {type(error).__name__}")
        if stalled := self.store.writer_stalled_for():  # one stranded connection, while others answer
            problems.append(f"store writer stalled for {stalled:.1f} s")
        if not self.settings.ultravox.api_key:
            problems.append("ULTRAVOX_API_KEY is not set")
        if not self.settings.routes:
            problems.append("no routes configured")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(self, request: Request) -> Response:
        token = self.settings.metrics_token
        if token and match_api_key(request.headers.get("authorization"), [token]) is None:
            return JSONResponse({"detail": "send Authorization: Bearer <GATEWAY_METRICS_TOKEN>"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        self.metrics.live.show(await self._live_counts())
        self.metrics.campaigns.show(await self._campaign_figures())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _live_counts(self) -> LiveCounts | None:
        """Live calls and transfers as the store has them (the same on every replica: a direct call's
        end reaches whichever replica its callback lands on, so no process knows its own). None when
        the store does not answer in time: /metrics still answers, without these series."""
        since = utcnow() - LIVE_HORIZON
        assert self.store is not None and self.transfers is not None  # started before any request is served
        try:
            calls, transfers = await asyncio.wait_for(
                asyncio.gather(self.store.live_calls(since), self.transfers.live_transfers(since)),
                timeout=LIVE_COUNTS_TIMEOUT_SECONDS,
            )
        except Exception as error:
            if self._live_counts_ok:
                log.warning("/metrics without live calls: the store did not answer (%s)", type(error).__name__)
            self._live_counts_ok = False
            return None
        self._live_counts_ok = True
        by_mode: dict[tuple[str, str], int] = {}
        for carrier, route, count in calls:
            key = (carrier, self.connector.mode(route))
            by_mode[key] = by_mode.get(key, 0) + count
        return LiveCounts(calls=by_mode, transfers=dict(transfers))

    async def _campaign_figures(self) -> list[CampaignFigures] | None:
        assert self.campaign_store is not None
        try:
            found = await asyncio.wait_for(self.campaign_store.unfinished(MAX_CAMPAIGN_SERIES),
                                           timeout=LIVE_COUNTS_TIMEOUT_SECONDS)
        except Exception as error:
            log.warning("/metrics without campaign series: the store did not answer (%s)", type(error).__name__)
            return None
        return [CampaignFigures(campaign.id, campaign.status, counts, campaign.pace) for campaign, counts in found]

    # --- the route table: every URL the gateway serves, by name -------------------------------------
    def routes(self) -> list[BaseRoute]:
        def later(endpoint_of):
            # The services behind the endpoints exist once the app has started, on its event loop.
            async def endpoint(request):
                return await endpoint_of(self)(request)

            return endpoint

        def api(path: str, endpoint_of, method: str, name: str) -> Route:
            # The /v1 API: each operation behind the permission gateway.access.OPERATIONS names for it.
            return Route(path, guarded(self.settings, method, path, later(endpoint_of)), methods=[method], name=name)

        # Which methods a carrier's webhooks use is the carrier's to say (its webhook_formats).
        webhook = ["GET", "POST"]
        return [
            Route("/{carrier}/inbound", later(lambda g: g.webhooks.inbound), methods=webhook, name="inbound"),
            Route("/{carrier}/outbound/answer", later(lambda g: g.webhooks.outbound_answer), methods=webhook,
                  name="outbound-answer"),
            Route("/{carrier}/status", later(lambda g: g.webhooks.status), methods=webhook, name="status"),
            Route("/{carrier}/machine-detection", later(lambda g: g.webhooks.machine_detection), methods=webhook,
                  name="machine-detection"),
            Route("/{carrier}/voicemail", later(lambda g: g.webhooks.voicemail), methods=webhook, name="voicemail"),
            Route("/{carrier}/handover", later(lambda g: g.webhooks.handover), methods=webhook, name="handover"),
            *[Route(f"/{{carrier}}/transfer/{step.name}", later(lambda g, step=step: g.webhooks.transfer_steps[step.name]),
                    methods=webhook, name=f"transfer-{step.name}") for step in TRANSFER_STEPS],
            WebSocketRoute("/media/{carrier}", later(lambda g: g.media.serve), name="media"),
            api("/v1/calls", lambda g: g.api.create, "POST", "calls-create"),
            api("/v1/calls", lambda g: g.api.list, "GET", "calls-list"),
            api("/v1/calls/{call_id}", lambda g: g.api.get, "GET", "call"),
            api("/v1/calls/{call_id}/recording", lambda g: g.api.recording, "GET", "call-recording"),
            api("/v1/events", lambda g: g.events_api.list, "GET", "events"),
            api("/v1/events/{event_id}", lambda g: g.events_api.get, "GET", "event"),
            api("/v1/events/{event_id}/redeliver", lambda g: g.events_api.redeliver, "POST", "event-redeliver"),
            api("/v1/webhooks", lambda g: g.events_api.webhooks, "GET", "webhooks"),
            api("/v1/webhooks/{name}/enable", lambda g: g.events_api.enable, "POST", "webhook-enable"),
            *[api(f"/v1/calls/{{call_id}}/{action}", lambda g, action=action: getattr(g.control, action), "POST",
                  f"call-{action}") for action in ("hangup", "transfer", "messages")],
            api("/v1/campaigns", lambda g: g.campaigns_api.create, "POST", "campaigns-create"),
            api("/v1/campaigns", lambda g: g.campaigns_api.list, "GET", "campaigns-list"),
            api("/v1/campaigns/{campaign_id}", lambda g: g.campaigns_api.get, "GET", "campaign"),
            api("/v1/campaigns/{campaign_id}/rows", lambda g: g.campaigns_api.rows, "GET", "campaign-rows"),
            *[api(f"/v1/campaigns/{{campaign_id}}/{action}", lambda g, action=action: getattr(g.campaigns_api, action),
                  "POST", f"campaign-{action}") for action in ("pause", "resume", "cancel")],
            api("/v1/suppressions", lambda g: g.campaigns_api.suppress, "POST", "suppressions-add"),
            api("/v1/suppressions", lambda g: g.campaigns_api.suppressions, "GET", "suppressions"),
            api("/v1/suppressions/{number}", lambda g: g.campaigns_api.unsuppress, "DELETE", "suppression"),
            api("/v1/openapi.json", lambda g: g.api.openapi, "GET", "openapi"),
            Route("/ultravox/events", later(lambda g: g.callbacks.events), methods=["POST"], name="ultravox-events"),
            Route("/tools/transfer", later(lambda g: g.callbacks.cold_tool), methods=["POST"], name="tool-transfer"),
            Route("/tools/warm-transfer", later(lambda g: g.callbacks.warm_tool), methods=["POST"],
                  name="tool-warm-transfer"),
            Route("/tools/opt-out", later(lambda g: g.callbacks.opt_out_tool), methods=["POST"], name="tool-opt-out"),
            Route("/healthz", self.healthz, methods=["GET"], name="healthz"),
            Route("/readyz", self.readyz, methods=["GET"], name="readyz"),
            Route("/metrics", self.metrics_endpoint, methods=["GET"], name="metrics"),
        ]


async def _repeat(job, every_seconds: float) -> None:
    """Run `job` now and then every `every_seconds`; a failed run is logged and the next one comes."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("%s failed", getattr(job, "__qualname__", job))
        await asyncio.sleep(every_seconds)


class GatewayApp(Starlette):
    def build_middleware_stack(self):
        # Request ids around everything, Starlette's error answers included.
        return RequestIds(super().build_middleware_stack())


def create_app(settings: Settings) -> Starlette:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = gateway.routes()
    gateway.urls.bind(routes)
    app = GatewayApp(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app


def create_app_from_environment() -> Starlette:
    """The app of a worker process (`gateway serve --workers N`): settings from GATEWAY_CONFIG and the environment."""
    from .settings import load_settings

    return create_app(load_settings())
