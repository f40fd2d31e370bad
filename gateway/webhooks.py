"""The carriers' HTTP callbacks: read and authenticate the request, hand it to a flow, answer in the
carrier's dialect. A webhook that cannot be served normally still gets a valid answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from . import inputs
from .api import read_limited
from .carriers.base import QUERY, Carrier, RequestRejected, SignatureRejected, Webhook
from .flows.inbound import InboundFlow
from .flows.handover import HandoverFlow
from .logs import Throttled, bind
from .flows.outbound import OutboundFlow
from .flows.replays import Replayed, ReplayMemory
from .flows.tracking import CallTracking
from .flows.transfer import TRANSFER_STEPS, TransferFlow, TransferStep
from .metrics import Metrics
from .settings import Settings
from .store import TransferStore
from .urls import Urls

log = logging.getLogger("gateway")
# A transfer's operator legs are counted from 0; no fallback chain is this long.
MAX_LEG = 1000

async def read_webhook(
    request: Request, carrier: Carrier, *, max_bytes: int, url: str, callback: bool = False, issued_url: bool = False
) -> Webhook:
    """The request as the carrier sent it, in one of the formats the carrier sends its webhooks (or,
    `callback`, its callbacks to URLs the gateway issued) in. Bounded in size (declared, then read) and
    in fields (counted before parsing) by the carrier's limits: refusing costs next to nothing."""
    max_bytes = min(max_bytes, carrier.webhook_max_bytes)
    max_fields = carrier.webhook_max_fields
    accepted = carrier.formats(callback=callback)
    formats = [f for f in accepted if f.method == request.method]
    if not formats:
        methods = sorted({f.method for f in accepted})
        raise RequestRejected(f"{carrier.title} webhooks are sent with {' or '.join(methods)}", 405)
    carrier.refuse_unsigned(request.headers, issued_url=issued_url)
    if formats[0] is QUERY:
        query = request.url.query
        if len(query) > max_bytes:
            raise RequestRejected(f"query longer than {max_bytes} bytes", 414)
        return Webhook(url=url, method=request.method, headers=request.headers, body=b"",
                       params=form_fields(query, max_fields), client=_client(request), format=QUERY)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    chosen = next((f for f in formats if f.content_type == content_type), None)
    if chosen is None:
        expected = " or ".join(str(f.content_type) for f in formats)
        raise RequestRejected(f"expected {expected}, got {content_type or 'no content type'}", 415)
    body = await read_limited(request, max_bytes)
    if body is None:
        raise RequestRejected(f"body larger than {max_bytes} bytes", 413)
    params = _json_fields(body, max_fields) if chosen.name == "json" else form_fields(body, max_fields)
    return Webhook(url=url, method=request.method, headers=request.headers, body=body, params=params,
                   client=_client(request), format=chosen)


# No carrier field holds NUL or another control character, and PostgreSQL refuses a NUL in text
# (the insert failed, and the call went ahead unrecorded).
_CONTROL = inputs.CONTROL_CHARACTERS


def form_fields(raw: bytes | str, max_fields: int) -> dict[str, list[str]]:
    """A URL-encoded form (body or query) as fields; RequestRejected when it is not one, has more than
    `max_fields` fields or holds control characters."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        # parse_qsl counts the separators before it splits anything: too many fields cost one count.
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, max_num_fields=max_fields) if text else []
    except (UnicodeDecodeError, ValueError):
        raise RequestRejected("body is not a valid URL-encoded form (or has too many fields)") from None
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        if _CONTROL.search(name) or _CONTROL.search(value):
            raise RequestRejected("a field holds a NUL or another control character")
        params.setdefault(name, []).append(value)
    return params


def _json_fields(body: bytes, max_fields: int) -> dict[str, list[str]]:
    """A JSON object's top-level values as fields (nested ones as their JSON text)."""
    try:
        data = inputs.json_document(body)  # bounded depth: the nested values are written out below
    except inputs.InvalidInput as error:
        raise RequestRejected(f"body is {error}") from None
    if not isinstance(data, dict) or len(data) > max_fields:
        raise RequestRejected("expected a JSON object")
    if inputs.controls_anywhere(data):
        raise RequestRejected("a field holds a NUL or another control character")
    return {
        str(name): [value if isinstance(value, str) else json.dumps(value)]
        for name, value in data.items() if value is not None
    }


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


class CarrierWebhooks:
    def __init__(
        self, settings: Settings, carriers: dict[str, Carrier], urls: Urls, metrics: Metrics, *,
        inbound: InboundFlow, outbound: OutboundFlow, tracking: CallTracking, transfer: TransferFlow,
        transfers: TransferStore, handover: HandoverFlow, replays: ReplayMemory, clock=time.monotonic,
    ):
        self.settings = settings
        self.carriers = carriers
        self.urls = urls
        self.metrics = metrics
        self.inbound_flow = inbound
        self.outbound_flow = outbound
        self.tracking = tracking
        self.transfer_flow = transfer
        self.transfers = transfers
        self.handover_flow = handover
        self.replays = replays
        self.clock = clock
        self.in_flight = 0  # carrier webhooks being answered now (deliveries give way to them)
        # Every refusal is counted in the metrics; logged, one line per carrier and status every 10 s.
        self.refusals_log = Throttled(log, clock=clock)
        self._endpoints()

    async def _verified(self, carrier: Carrier, request: Request, *, callback: bool = True,
                        issued: Callable[[], bool] | None = None) -> Webhook:
        """The carrier's authenticated request (`callback`: to a callback route, not its inbound
        webhook); with `issued`, also the gateway's own token in the URL."""
        webhook = await read_webhook(request, carrier, max_bytes=self.settings.max_body_bytes,
                                     url=self.urls.of_request(request), callback=callback,
                                     issued_url=issued is not None)
        carrier.verify(webhook, issued_url=issued is not None)
        if issued is not None and not issued():
            raise SignatureRejected("this callback URL was not issued by this gateway")
        if callback:  # the inbound webhook's parse_inbound checks its own
            carrier.check_call_id(webhook)
        # A repeat of a webhook answered before raises Replayed (its endpoint gives that answer);
        # the first delivery's answer is recorded by its endpoint (see _endpoint).
        first = await self.replays.check(carrier, webhook)
        if first is not None:
            request.state.first_delivery = first
        return webhook

    def _refused(self, carrier: Carrier, rejection: RequestRejected) -> Response:
        self.metrics.webhooks.labels(carrier.name, f"http_{rejection.status}").inc()
        kind = (carrier.name, rejection.status)
        if rejection.explanation:
            self.refusals_log.warning(kind, "%s webhook refused (%d): %s; %s", carrier.name, rejection.status,
                                      rejection.detail, rejection.explanation)
        else:
            self.refusals_log.warning(kind, "%s webhook refused (%d): %s", carrier.name, rejection.status, rejection.detail)
        return PlainTextResponse(rejection.detail + "\n", status_code=rejection.status)

    def _endpoint(self, handler: Callable[[Carrier, Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            carrier = self.carriers.get(request.path_params["carrier"])
            if carrier is None:
                return PlainTextResponse("not found\n", status_code=404)
            bind(carrier=carrier.name)
            self.in_flight += 1
            try:
                try:
                    response = await handler(carrier, request)
                except Replayed as replayed:
                    self.metrics.webhooks.labels(carrier.name, "replayed").inc()
                    return self.replays.replayed_response(replayed)
                first = getattr(request.state, "first_delivery", None)
                # An apology is not an answer to repeat: the carrier's retry gets a fresh attempt.
                if first is not None and not getattr(request.state, "apology", False):
                    self.replays.answered(first, response)
                return response
            finally:
                self.in_flight -= 1

        endpoint.__name__ = handler.__name__
        return endpoint

    def _call_issued(self, request: Request, route: str, carrier: Carrier) -> Callable[[], bool]:
        query = request.query_params
        return lambda: self.urls.valid_call_callback(route, carrier.name, query.get("call", ""), query.get("t"))

    # --- the endpoints ----------------------------------------------------------------------------
    def _endpoints(self) -> None:
        self.inbound = self._endpoint(self._inbound)
        self.outbound_answer = self._endpoint(self._outbound_answer)
        self.status = self._endpoint(self._status)
        self.machine_detection = self._endpoint(self._machine_detection)
        self.voicemail = self._endpoint(self._voicemail)
        self.handover = self._endpoint(self._handover)
        self.transfer_steps = {step.name: self._endpoint(self._step_handler(step)) for step in TRANSFER_STEPS}

    def _step_handler(self, step: TransferStep):
        async def handler(carrier: Carrier, request: Request) -> Response:
            return await self._transfer_step(step, carrier, request)

        handler.__name__ = f"transfer_{step.name.replace('-', '_')}"
        return handler

    async def _inbound(self, carrier: Carrier, request: Request) -> Response:
        started = self.clock()
        deadline = started + self.settings.ultravox.inbound_deadline_seconds
        try:
            call = carrier.parse_inbound(await self._verified(carrier, request, callback=False))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        bind(carrier_call_id=call.call_id)
        try:
            # The hard stop: whatever happens below, the carrier gets its answer before its own timeout.
            # (In this task, unlike wait_for's: the ids the flow binds stay on the request's lines.)
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                answer = await self.inbound_flow.answer(carrier, call, deadline)
        except TimeoutError:
            log.warning("%s call %s: deadline reached, answering with the apology", carrier.name, call.call_id)
            answer = self.inbound_flow.apology(carrier)
        except Exception:
            log.exception("%s call %s: unexpected error, answering with the apology", carrier.name, call.call_id)
            answer = self.inbound_flow.apology(carrier)
        request.state.apology = answer.outcome == "apology"
        self.metrics.webhooks.labels(carrier.name, answer.outcome).inc()
        self.metrics.webhook_seconds.labels(carrier.name).observe(self.clock() - started)
        return carrier.answer_response(answer.body)

    async def _outbound_answer(self, carrier: Carrier, request: Request) -> Response:
        """The callee picked up a call the gateway placed: connect the agent."""
        deadline = self.clock() + self.settings.ultravox.inbound_deadline_seconds
        try:
            webhook = await self._verified(carrier, request, issued=self._call_issued(request, "outbound-answer", carrier))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        call_id = request.query_params.get("call", "")
        bind(call_id=call_id)
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                body = await self.outbound_flow.answer(carrier, webhook, call_id, deadline)
        except Exception:  # the deadline, or a bug: the callee hears the apology either way
            log.exception("%s answer for outbound call %s failed", carrier.name, call_id)
            body = carrier.apology_answer(self.settings.fallback.message, None)
            request.state.apology = True
        return carrier.answer_response(body)

    async def _instructions(self, carrier: Carrier, request: Request, route: str,
                            answer: Callable[[str], Awaitable[str]], fallback: Callable[[], str]) -> Response:
        """A live call fetching new instructions from a URL issued for it on `route`: `answer`'s for
        the call's id, or `fallback`'s should that fail."""
        try:
            await self._verified(carrier, request, issued=self._call_issued(request, route, carrier))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        call_id = request.query_params.get("call", "")
        bind(call_id=call_id)
        try:
            body = await answer(call_id)
        except Exception:
            log.exception("%s %s of call %s failed", carrier.name, route, call_id)
            body = fallback()
            request.state.apology = True
        return carrier.answer_response(body)

    async def _voicemail(self, carrier: Carrier, request: Request) -> Response:
        """An answering machine's call, moved here to be left the voicemail message."""
        return await self._instructions(
            carrier, request, "voicemail", lambda call_id: self.outbound_flow.voicemail_answer(carrier, call_id),
            carrier.hangup_answer)  # failing, nobody but a machine listens: end the call

    async def _handover(self, carrier: Carrier, request: Request) -> Response:
        """A live call moved off a draining replica fetches its new stream here (on any replica)."""
        fallback = self.settings.fallback  # never silence: the apology (and the fallback number, if any)
        return await self._instructions(
            carrier, request, "handover", lambda call_id: self.handover_flow.answer(carrier, call_id),
            lambda: carrier.apology_answer(fallback.message, fallback.dial_number))

    async def _status(self, carrier: Carrier, request: Request) -> Response:
        """Call progress callbacks: the call named in the URL, or an inbound call by its carrier id."""
        call_id = request.query_params.get("call")
        try:
            webhook = await self._verified(
                carrier, request, issued=self._call_issued(request, "status", carrier) if call_id is not None else None
            )
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        bind(call_id=call_id)
        record = await self.tracking.carrier_status(carrier, webhook, call_id)
        if record is None:
            log.info("%s status callback for a call this gateway does not know", carrier.name)
        elif call_id is not None and (verdict := carrier.parse_machine_verdict(webhook)) is not None:
            # Where the carrier reports detection in its status callbacks (Telnyx TeXML's
            # synchronous mode), it is acted on as from the report URL.
            await self.outbound_flow.machine_detected(carrier, verdict, call_id)
        return Response(status_code=204)

    async def _machine_detection(self, carrier: Carrier, request: Request) -> Response:
        """The verdict of answering-machine detection on a call the gateway placed (its report URL)."""
        try:
            webhook = await self._verified(carrier, request,
                                           issued=self._call_issued(request, "machine-detection", carrier))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        call_id = request.query_params.get("call", "")
        bind(call_id=call_id)
        verdict = carrier.parse_machine_verdict(webhook)
        if verdict is None:
            log.warning("%s machine detection callback without a verdict", carrier.name)
        else:
            await self.outbound_flow.machine_detected(carrier, verdict, call_id)
        return Response(status_code=204)

    async def _transfer_step(self, step: TransferStep, carrier: Carrier, request: Request) -> Response:
        """The carrier fetching a transfer's call instructions, or reporting a dial, a key press or a leg."""
        transfer_id = request.query_params.get("transfer", "")
        token = request.query_params.get("t")
        if not carrier.can_transfer:
            return PlainTextResponse("not found\n", status_code=404)
        try:
            # Read before the signature check (the URL's token covers it).
            leg_text = request.query_params.get("leg")
            leg = None if leg_text is None else inputs.whole_number(leg_text, name="leg", maximum=MAX_LEG)
        except inputs.InvalidInput as error:
            return self._refused(carrier, RequestRejected(str(error)))
        try:
            webhook = await self._verified(carrier, request, issued=lambda: self.urls.valid_transfer_callback(
                carrier.name, transfer_id, step.name, leg, token))
        except RequestRejected as rejection:
            return self._refused(carrier, rejection)
        bind(transfer_id=transfer_id)
        transfer = await self.transfers.get(transfer_id)
        if transfer is None:
            return carrier.answer_response(carrier.hangup_answer())
        bind(call_id=transfer.call_id)
        try:
            body = await getattr(self.transfer_flow, step.handler)(carrier, transfer, leg, webhook)
        except Exception:
            log.exception("transfer %s: %s failed", transfer_id, step.name)
            request.state.apology = True
            if step.operator_leg:
                # The operator's phone: hang it up; the caller, still on hold, goes on to the next
                # operator or back to the agent.
                with contextlib.suppress(Exception):  # logged above; the leg's deadline still stands
                    await self.transfer_flow.operator_failed(carrier, transfer, leg)
                body = carrier.hangup_answer()
            else:
                # The caller's phone: never silence, the apology (and the fallback number, if any).
                body = carrier.apology_answer(self.settings.fallback.message, self.settings.fallback.dial_number)
        if step.event:  # a report, not a fetch: nothing to play
            return Response(status_code=204)
        return carrier.answer_response(body)
