"""create_app(settings) -> Starlette: routes, and the process-wide resources they share."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .api import CallsApi, read_limited
from .carriers import CARRIER_CLASSES, Carrier
from .carriers.base import RequestRejected, SignatureRejected, Webhook
from .flows.inbound import InboundFlow
from .flows.outbound import OutboundFlow
from .flows.tracking import CallTracking
from .flows.transfer import TransferFlow
from .http import create_client
from .media.bridge import MediaBridge, MediaStats, bridged
from .security import WebhookRejected, media_token_problem, tool_secret_matches, verify_ultravox_webhook
from .settings import Settings
from .store import CallStore, TransferStore
from .tools import SECRET_HEADER
from .ultravox import UltravoxClient, create_http_client

log = logging.getLogger("gateway")

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# Carrier callbacks of a transfer: XML to fetch (dial, hold, return, whisper) and events.
TRANSFER_STEPS = {"dial", "hold", "music", "return", "caller-left", "whisper", "result", "accept", "operator-status"}
OPERATOR_LEG_STEPS = {"whisper", "accept", "operator-status"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "gateway_inbound_webhooks", "Inbound call webhooks by carrier and outcome",
            ["carrier", "outcome"], registry=self.registry,
        )
        self.transfers = Counter(
            "gateway_transfers", "Finished operator transfers by operator, kind and result",
            ["operator", "kind", "result"], registry=self.registry,
        )
        self.media_frames = Counter(
            "gateway_media_frames", "Audio frames relayed in bridge mode", ["direction"], registry=self.registry,
        )
        self.media_events = Counter(
            "gateway_media_events", "Bridge-mode events: gaps, late frames, clears (barge-ins), dtmf, malformed frames",
            ["event"], registry=self.registry,
        )
        self.webhook_seconds = Histogram(
            "gateway_inbound_webhook_seconds", "Time to answer an inbound call webhook",
            ["carrier"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
        )


    def add_media_stats(self, stats) -> None:
        self.media_frames.labels("caller_to_agent").inc(stats.frames_in)
        self.media_frames.labels("agent_to_caller").inc(stats.frames_out)
        for event in ("gaps", "late_frames", "clears", "dtmf", "malformed"):
            self.media_events.labels(event).inc(getattr(stats, event))


class Gateway:
    """The shared resources (store, pooled HTTP client, carriers) and the HTTP handlers using them."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.carriers: dict[str, Carrier] = {name: cls(settings) for name, cls in CARRIER_CLASSES.items()}
        self.metrics = Metrics()
        self.store: CallStore | None = None
        self.http: httpx.AsyncClient | None = None
        self.carrier_http: httpx.AsyncClient | None = None
        self.inbound: InboundFlow | None = None
        self.outbound: OutboundFlow | None = None
        self.tracking: CallTracking | None = None
        self.transfer: TransferFlow | None = None
        self.bridge: MediaBridge | None = None
        self.transfer_store: TransferStore | None = None
        self.api: CallsApi | None = None

    async def start(self) -> None:
        if self.settings.insecure_skip_signature_verification:
            log.warning("=" * 72)
            log.warning("INSECURE: carrier signature verification is OFF. Anyone can forge webhooks.")
            log.warning("Use this for local development only.")
            log.warning("=" * 72)
        for note in self.settings.warnings():
            log.warning("config: %s", note)
        self.store = CallStore.open(self.settings.database_url)
        await self.store.migrate()
        self.http = create_http_client(self.settings.ultravox)
        # Carrier REST calls (placing calls) share one client; each request carries its own auth.
        self.carrier_http = create_client(pool_size=20, timeout=10.0)
        ultravox = UltravoxClient(self.http, self.settings.ultravox, clock=self.clock)
        self.inbound = InboundFlow(self.settings, self.store, ultravox, clock=self.clock)
        self.outbound = OutboundFlow(
            self.settings, self.store, ultravox, self.carriers, self.carrier_http, clock=self.clock
        )
        self.transfer_store = TransferStore(self.store.database)
        self.tracking = CallTracking(self.store, self.transfer_store)
        self.transfer = TransferFlow(
            self.settings, self.store, self.transfer_store, ultravox, self.carriers, self.carrier_http,
            on_outcome=lambda t: self.metrics.transfers.labels(t.operator, t.kind, t.status).inc(),
        )
        self.api = CallsApi(self.settings, self.store, self.outbound, self.transfer_store)
        self.bridge = MediaBridge(
            self.store, self.carrier_http, recordings=self._recording_path, on_stats=self.metrics.add_media_stats,
            transfer_active=self._transfer_active,
        )
        # The ~120k objects of the loaded libraries never die: keep them out of the collector's
        # full passes, which otherwise paused the event loop 20–50 ms (measured in bench/bridge.py).
        gc.freeze()

    async def stop(self) -> None:
        if self.transfer is not None:
            await self.transfer.drain()
        for client in (self.http, self.carrier_http):
            if client is not None:
                await client.aclose()
        if self.store is not None:
            await self.store.close()

    # --- carrier webhooks -------------------------------------------------------------------------
    @staticmethod
    def carrier_endpoint(carrier: Carrier, handler):
        async def endpoint(request: Request) -> Response:
            return await handler(carrier, request)

        endpoint.__name__ = f"{carrier.name}_{handler.__name__}"
        return endpoint

    async def verified_webhook(
        self, carrier: Carrier, request: Request, *, url_issued: Callable[[], bool] | None = None
    ) -> Webhook:
        """The carrier's signed form; with `url_issued`, also the gateway's own token in the URL."""
        webhook = await self.read_webhook(request)
        carrier.verify(webhook)
        if url_issued is not None and not url_issued():
            raise SignatureRejected("this callback URL was not issued by this gateway")
        return webhook

    def _call_url_issued(self, request: Request) -> bool:
        query = request.query_params
        return self.outbound.valid_callback(query.get("call", ""), query.get("t"))

    async def handle_outbound_answer(self, carrier: Carrier, request: Request) -> Response:
        """The callee picked up a call the gateway placed: connect the agent."""
        deadline = self.clock() + self.settings.ultravox.inbound_deadline_seconds
        try:
            webhook = await self.verified_webhook(carrier, request, url_issued=lambda: self._call_url_issued(request))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        call_id = request.query_params.get("call", "")
        try:
            xml = await asyncio.wait_for(
                self.outbound.answer(carrier, webhook, call_id, deadline), timeout=max(0.0, deadline - self.clock())
            )
        except Exception:  # the deadline, or a bug: the callee hears the apology either way
            log.exception("%s answer for outbound call %s failed", carrier.name, call_id)
            xml = carrier.apology_xml(self.settings.fallback.message, None)
        return Response(xml, media_type=carrier.xml_media_type)

    async def handle_status(self, carrier: Carrier, request: Request) -> Response:
        """Call progress callbacks: the call named in the URL, or an inbound call by its carrier id."""
        call_id = request.query_params.get("call")
        try:
            webhook = await self.verified_webhook(
                carrier, request, url_issued=(lambda: self._call_url_issued(request)) if call_id is not None else None
            )
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        record = await self.tracking.carrier_status(carrier, webhook, call_id)
        if record is None:
            log.info("%s status callback for a call this gateway does not know", carrier.name)
        return Response(status_code=204)

    def _refused(self, carrier: Carrier, rejection: RequestRejected) -> Response:
        self.metrics.webhooks.labels(carrier.name, f"http_{rejection.status}").inc()
        log.warning("%s webhook refused (%d): %s", carrier.name, rejection.status, rejection.detail)
        return PlainTextResponse(rejection.detail + "\n", status_code=rejection.status)

    async def handle_inbound(self, carrier: Carrier, request: Request) -> Response:
        started = self.clock()
        deadline = started + self.settings.ultravox.inbound_deadline_seconds
        try:
            call = carrier.parse_inbound(await self.verified_webhook(carrier, request))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        try:
            # The hard stop: whatever happens below, the carrier gets XML before its own timeout.
            answer = await asyncio.wait_for(
                self.inbound.answer(carrier, call, deadline), timeout=max(0.0, deadline - self.clock())
            )
        except asyncio.TimeoutError:
            log.warning("%s call %s: deadline reached, answering with the apology", carrier.name, call.call_id)
            answer = self.inbound.apology(carrier)
        except Exception:
            log.exception("%s call %s: unexpected error, answering with the apology", carrier.name, call.call_id)
            answer = self.inbound.apology(carrier)
        self.metrics.webhooks.labels(carrier.name, answer.outcome).inc()
        self.metrics.webhook_seconds.labels(carrier.name).observe(self.clock() - started)
        return Response(answer.xml, media_type=carrier.xml_media_type)

    async def read_webhook(self, request: Request) -> Webhook:
        """The raw form as the carrier sent it, bounded in size, plus the URL it was sent to."""
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != FORM_CONTENT_TYPE:
            raise RequestRejected(f"expected {FORM_CONTENT_TYPE}, got {content_type or 'no content type'}", 415)
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            raise RequestRejected(f"body larger than {self.settings.max_body_bytes} bytes", 413)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True) if body else []
        except (UnicodeDecodeError, ValueError):
            raise RequestRejected("body is not a valid URL-encoded form") from None
        params: dict[str, list[str]] = {}
        for name, value in pairs:
            params.setdefault(name, []).append(value)
        return Webhook(
            url=self.public_url(request),
            method=request.method,
            headers=request.headers,
            body=body,
            params=params,
        )

    def public_url(self, request: Request | WebSocket) -> str:
        """The URL as the carrier addressed it: the configured public base, our path, the query."""
        base = self.settings.public_url
        if base is None:
            url = f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
        else:
            url = base + request.url.path
        query = request.url.query
        return f"{url}?{query}" if query else url

    # --- operations -------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = []
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2)
        except Exception as error:
            problems.append(f"store unavailable: {type(error).__name__}")
        if not self.settings.ultravox.api_key:
            problems.append("ULTRAVOX_API_KEY is not set")
        if not self.settings.routes:
            problems.append("no routes configured")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    def _recording_path(self, record) -> Path | None:
        route = self.settings.route_named(record.route) if record.route else None
        if not route or not route.recording_dir:
            return None
        # One file per stretch of the call (a transfer back to the agent starts another).
        return Path(route.recording_dir) / f"{record.id}-{int(time.time() * 1000)}.wav"

    async def _transfer_active(self, call_id: str) -> bool:
        return any(not t.is_final for t in await self.transfer_store.for_call(call_id))

    def _api(self, name: str):
        async def endpoint(request: Request) -> Response:
            return await getattr(self.api, name)(request)  # the API exists once the app has started

        endpoint.__name__ = f"api_{name}"
        return endpoint

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- operator transfers -----------------------------------------------------------------------
    def transfer_tool(self, kind: str):
        async def endpoint(request: Request) -> Response:
            if not self.settings.tool_secret:
                return PlainTextResponse("GATEWAY_TOOL_SECRET is not configured on this gateway\n", status_code=403)
            if not tool_secret_matches(request.headers.get(SECRET_HEADER), self.settings.tool_secret):
                log.warning("transfer tool call refused: wrong or missing %s", SECRET_HEADER)
                return PlainTextResponse("wrong or missing tool secret\n", status_code=403)
            body = await read_limited(request, self.settings.max_body_bytes)
            try:
                payload = json.loads(body or b"")
                if not isinstance(payload, dict):
                    raise ValueError
            except ValueError:
                return PlainTextResponse("expected a JSON object\n", status_code=400)
            reply = await self.transfer.invoke(kind, payload)
            return PlainTextResponse(reply.text, status_code=reply.status, headers={
                "X-Ultravox-Agent-Reaction": reply.reaction,
            })

        endpoint.__name__ = f"{kind}_transfer_tool"
        return endpoint

    async def handle_transfer_callback(self, carrier: Carrier, request: Request) -> Response:
        """The carrier fetching transfer XML, or reporting a dial, a key press or the operator's leg."""
        step = request.path_params["step"]
        if step not in TRANSFER_STEPS:
            return PlainTextResponse("not found\n", status_code=404)
        transfer_id = request.query_params.get("transfer", "")
        leg_text = request.query_params.get("leg")
        leg = int(leg_text) if leg_text is not None and leg_text.isdigit() else None
        try:
            webhook = await self.verified_webhook(
                carrier, request,
                url_issued=lambda: self.transfer.valid_url(transfer_id, step, leg, request.query_params.get("t")),
            )
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        transfer = await self.transfer_store.get(transfer_id)
        if transfer is None:
            return Response(carrier.hangup_xml(), media_type=carrier.xml_media_type)
        flow = self.transfer
        try:
            if step == "result":
                xml = await flow.dial_result(carrier, transfer, leg, webhook)
            elif step == "whisper":
                xml = await flow.whisper(carrier, transfer, leg, webhook)
            elif step == "accept":
                xml = await flow.accept(carrier, transfer, leg, webhook)
            elif step == "operator-status":
                await flow.operator_status(carrier, transfer, leg, webhook)
            else:
                xml = await flow.xml(carrier, transfer, step)
        except Exception:
            log.exception("transfer %s: %s failed", transfer_id, step)
            if step in OPERATOR_LEG_STEPS:
                # The operator's phone: hang it up; the caller, still on hold, goes on to the next
                # operator or back to the agent.
                flow.operator_failed(carrier, transfer, leg)
                xml = carrier.hangup_xml()
            else:
                # The caller's phone: never silence, the apology (and the fallback number, if any).
                xml = carrier.apology_xml(self.settings.fallback.message, self.settings.fallback.dial_number)
        if step == "operator-status":  # an event, not a fetch: nothing to play
            return Response(status_code=204)
        return Response(xml, media_type=carrier.xml_media_type)

    # --- bridge mode: the carrier's media socket --------------------------------------------------
    async def media_socket(self, websocket: WebSocket) -> None:
        carrier = self.carriers.get(websocket.path_params["carrier"])
        if carrier is None:
            await websocket.close(code=1008)
            return
        query = websocket.query_params
        carrier_call_id, token = query.get("call"), query.get("token")
        problem = None
        if not self.settings.insecure_skip_signature_verification:
            problem = carrier.upgrade_problem(self.public_url(websocket), websocket.headers)
        if problem is None and token is not None:
            problem = self._media_token_problem(carrier, carrier_call_id or "", token)
        elif problem is None and not carrier.upgrade_is_signed:
            problem = "missing media token"
        if problem is not None:
            return await self._refuse_media(carrier, websocket, problem)
        start = None
        if token is None:
            # A signed upgrade without our query (Twilio may drop it): the credentials come as
            # stream parameters in the start message, checked before anything reaches Ultravox.
            await websocket.accept()
            start = await self.bridge.read_start(carrier, websocket, MediaStats())
            params = start.parameters if start else {}
            carrier_call_id, token = params.get("call", ""), params.get("token", "")
            problem = self._media_token_problem(carrier, carrier_call_id, token)
            if problem is None and start.carrier_call_id not in (None, carrier_call_id):
                problem = "the stream's call is not the one its token names"
            if problem is not None:
                return await self._refuse_media(carrier, websocket, problem)
        record = await self.store.find_by_carrier_call(carrier.name, carrier_call_id)
        if record is None or not record.join_url or not bridged(self.settings, record):
            problem = "no bridged call waiting for this media stream"
        # One socket per token, on whichever replica it lands: a compare-and-set in the store.
        elif not await self.store.claim_media_token(record.id, token):
            problem = "media token already used"
        if problem is not None:
            return await self._refuse_media(carrier, websocket, problem)
        if start is None:
            await websocket.accept()
        await self.bridge.run(carrier, websocket, record, start=start)

    def _media_token_problem(self, carrier: Carrier, carrier_call_id: str, token: str) -> str | None:
        return media_token_problem(self.settings.ultravox.api_key or "", carrier.name, carrier_call_id, token, time.time())

    async def _refuse_media(self, carrier: Carrier, websocket: WebSocket, problem: str) -> None:
        log.warning("%s media socket refused: %s", carrier.name, problem)
        self.metrics.webhooks.labels(carrier.name, "media_refused").inc()
        # Before accepting, a close is an HTTP 403 to the carrier; after, a policy-violation close.
        await websocket.close(code=1008)

    # --- Ultravox call events ---------------------------------------------------------------------
    async def ultravox_events(self, request: Request) -> Response:
        secret = self.settings.ultravox.webhook_secret
        if not secret:
            return PlainTextResponse("ULTRAVOX_WEBHOOK_SECRET is not configured on this gateway\n", status_code=403)
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            return PlainTextResponse("body too large\n", status_code=413)
        try:
            verify_ultravox_webhook(
                secret, body, request.headers.get("x-ultravox-webhook-timestamp"),
                request.headers.get("x-ultravox-webhook-signature"),
                tolerance_seconds=self.settings.ultravox.webhook_tolerance_seconds,
            )
        except WebhookRejected as rejection:
            log.warning("Ultravox event refused: %s", rejection)
            return PlainTextResponse(f"{rejection}\n", status_code=403)
        try:
            event = json.loads(body)
            name, call = event["event"], event["call"]
            call["callId"]
        except (ValueError, KeyError, TypeError):
            return PlainTextResponse("expected {\"event\": …, \"call\": {\"callId\": …}}\n", status_code=400)
        await self.tracking.ultravox_event(name, call)
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        routes = []
        for name, carrier in self.carriers.items():
            routes += [
                Route(f"/{name}/inbound", self.carrier_endpoint(carrier, self.handle_inbound), methods=["POST"]),
                Route(f"/{name}/outbound/answer", self.carrier_endpoint(carrier, self.handle_outbound_answer),
                      methods=["POST"]),
                Route(f"/{name}/status", self.carrier_endpoint(carrier, self.handle_status), methods=["POST"]),
                Route("/%s/transfer/{step:str}" % name, self.carrier_endpoint(carrier, self.handle_transfer_callback),
                      methods=["POST"]),
            ]
        routes += [
            Route("/v1/calls", self._api("create"), methods=["POST"]),
            Route("/v1/calls", self._api("list"), methods=["GET"]),
            Route("/v1/calls/{call_id}", self._api("get"), methods=["GET"]),
            Route("/v1/openapi.json", self._api("openapi"), methods=["GET"]),
            Route("/ultravox/events", self.ultravox_events, methods=["POST"]),
            WebSocketRoute("/media/{carrier}", self.media_socket),
            Route("/tools/transfer", self.transfer_tool("cold"), methods=["POST"]),
            Route("/tools/warm-transfer", self.transfer_tool("warm"), methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        return routes


def create_app(settings: Settings) -> Starlette:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(routes=gateway.routes(), lifespan=lifespan)
    app.state.gateway = gateway
    return app
