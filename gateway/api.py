"""The dialer API under /v1: place calls, read them back. JSON in, JSON out, Bearer keys."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import inputs
from .access import ApiAccess, access_of, openapi_refusals
from .carriers import CARRIERS
from .flows.events import EVENT_DATA, EventOutbox
from .flows.outbound import DialRejected, DialRequest, OutboundFlow
from .logs import bind_call
from .media.recording import recording_dirs, snapshot
from .settings import EVENT_TYPES, Settings
from .statuses import STATUSES
from .store import CallFilters, CallRecord, CallStore, TransferStore
from .store.events import DELIVERY_STATUSES, Delivery, EventFilters, EventStore, StoredEvent
from .views import CallView, TransferView

MAX_PAGE = 200
DEFAULT_PAGE = 50
# Bounds of what a query or path names: ids (UUIDs, names) are far shorter; event sequence numbers
# and recording parts are a row's integer and a list index.
MAX_ID_LENGTH = 200
MAX_SEQ = 2**63 - 1
MAX_RECORDINGS = 10_000


def problem(status: int, detail: Any, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class CallsApi:
    def __init__(self, settings: Settings, store: CallStore, outbound: OutboundFlow, transfers: TransferStore):
        self.settings = settings
        self.store = store
        self.outbound = outbound
        self.transfers = transfers
        self.recording_dirs = [directory.path for directory in recording_dirs(settings.routes)]

    async def create(self, request: Request) -> Response:
        access = access_of(request)
        try:
            dial = await json_body(request, DialRequest, self.settings.max_body_bytes, what="the dial request")
        except ApiRefusal as rejection:
            return rejection.response
        if refusal := access.dial_refusal(dial.route, dial.carrier or self.settings.outbound.carrier):
            return problem(403, refusal)
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            return problem(400, "Idempotency-Key must be 1 to 255 characters")
        try:
            record, created = await self.outbound.dial(dial, api_key_id=access.key_id, idempotency_key=idempotency_key)
        except DialRejected as rejection:
            headers = {"Retry-After": "60"} if rejection.status == 429 else {}
            return problem(rejection.status, rejection.reason, **headers)
        headers = {"Location": f"/v1/calls/{record.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(CallView.of(record), status_code=201, headers=headers)

    async def get(self, request: Request) -> Response:
        record = await self._record(request)
        if record is None:
            return problem(404, "no such call")
        bind_call(record)
        view = CallView.of(record)
        view["transfers"] = [TransferView.of(t) for t in await self.transfers.for_call(record.id)]
        return JSONResponse(view)

    async def recording(self, request: Request) -> Response:
        """One stretch of a call's recording, as a WAV streamed from disk (?part=N, default 0)."""
        try:
            part = inputs.whole_number(request.query_params.get("part", "0"), name="part", maximum=MAX_RECORDINGS)
        except inputs.InvalidInput:
            return problem(400, "part must be a whole number: 0 for the call's first recording, 1 for the next…")
        record = await self._record(request)
        if record is None:
            return problem(404, "no such call")
        bind_call(record)
        paths = record.recordings
        if not paths:
            return problem(404, "this call has no recording")
        parts = {"Recording-Parts": str(len(paths))}
        if part >= len(paths):
            return problem(404, f"this call has {len(paths)} recording(s): part 0 to {len(paths) - 1}", **parts)
        # The stored path is the gateway's own, but only files in the recording directories are served.
        found = await asyncio.to_thread(snapshot, Path(paths[part]), self.recording_dirs)
        if found is None:
            return problem(404, "the recording is no longer on disk", **parts)
        # Not FileResponse: that reads to the end of the file, and a recording still being
        # written grows past the Content-Length taken a moment before.
        return StreamingResponse(iterate_in_threadpool(found.chunks()), media_type="audio/wav", headers={
            **parts, "Content-Length": str(found.size),
            "Content-Disposition": f'attachment; filename="{found.path.name}"',
        })

    async def list(self, request: Request) -> Response:
        query = request.query_params
        try:
            filters = CallFilters(
                scope=access_of(request).scope,
                status=_choice(query.get("status"), STATUSES, "status"),
                carrier=_choice(query.get("carrier"), list(CARRIERS), "carrier"),
                direction=_choice(query.get("direction"), ["inbound", "outbound"], "direction"),
                created_after=_time(query.get("created_after"), "created_after"),
                created_before=_time(query.get("created_before"), "created_before"),
            )
            limit = _limit(query.get("limit"))
            cursor = _decode_cursor(query.get("cursor"))
        except ValueError as error:
            return problem(400, str(error))
        records, more = await self.store.list(filters=filters, limit=limit, cursor=cursor)
        next_cursor = _encode_cursor(records[-1]) if more and records else None
        return JSONResponse({"calls": [CallView.of(r) for r in records], "next_cursor": next_cursor})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def _record(self, request: Request) -> CallRecord | None:
        return await call_in_scope(request, self.store)


class EventsApi:
    """/v1/events (what was sent to the user's endpoints, and how it went) and /v1/webhooks."""

    def __init__(self, settings: Settings, events: EventStore, outbox: EventOutbox):
        self.settings = settings
        self.events = events
        self.outbox = outbox

    async def list(self, request: Request) -> Response:
        query = request.query_params
        try:
            filters = EventFilters(
                scope=access_of(request).scope,
                call_id=_optional_text(query.get("call_id"), "call_id"),
                type=_choice(query.get("type"), list(EVENT_TYPES), "type"),
                delivery_status=_choice(query.get("status"), DELIVERY_STATUSES, "status"),
                endpoint=_optional_text(query.get("endpoint"), "endpoint"),
            )
            limit = _limit(query.get("limit"))
            cursor = query.get("cursor")
            try:
                before_seq = None if not cursor else inputs.whole_number(cursor, name="cursor", maximum=MAX_SEQ)
            except inputs.InvalidInput:
                raise ValueError("cursor is not one this API handed out") from None
        except ValueError as error:
            return problem(400, str(error))
        found, more = await self.events.list(filters, limit=limit, before_seq=before_seq)
        return JSONResponse({"events": [EventView.of(event) for event in found],
                             "next_cursor": str(found[-1].seq) if more and found else None})

    async def get(self, request: Request) -> Response:
        event = await self._event(request, access_of(request))
        if event is None:
            return problem(404, "no such event")
        return JSONResponse(EventView.of(event))

    async def redeliver(self, request: Request) -> Response:
        """Send an event again: to every endpoint configured now, or to `{"endpoint": name}`."""
        access = access_of(request)
        try:
            name = (await json_body(request, Redelivery, self.settings.max_body_bytes, what='{"endpoint": NAME}',
                                    optional=True)).endpoint
        except ApiRefusal as refusal:
            return refusal.response
        names = [webhook.name for webhook in self.settings.webhooks]
        if name is not None and name not in names:
            return problem(422, f"no endpoint is named {name!r}; configured: {', '.join(names) or 'none'}")
        targets = [name] if name else names
        if not targets:
            return problem(409, "no [[webhooks]] endpoint is configured to deliver to")
        for target in targets:
            state = await self.events.endpoint(target)
            if state.disabled_at is not None:
                return problem(409, f"endpoint {target} is disabled ({state.disabled_reason}); enable it first with "
                                    f"POST /v1/webhooks/{target}/enable")
        visible = await self._event(request, access)
        event = None if visible is None else await self.outbox.redeliver(self.events, visible.id, targets)
        if event is None:
            return problem(404, "no such event")
        return JSONResponse(EventView.of(event), status_code=202)

    async def _event(self, request: Request, access: ApiAccess) -> StoredEvent | None:
        """The event in the path, if it is one of the calls the key sees (else None, as for no event)."""
        event_id = path_text(request, "event_id")
        return None if event_id is None else await self.events.get(event_id, access.scope)

    async def webhooks(self, request: Request) -> Response:
        return JSONResponse({"webhooks": [await self._webhook_view(webhook.name) for webhook in self.settings.webhooks]})

    async def enable(self, request: Request) -> Response:
        name = request.path_params["name"]
        if self.settings.webhook_named(name) is None:
            return problem(404, "no such endpoint")
        await self.events.enable(name)
        return JSONResponse(await self._webhook_view(name))

    async def _webhook_view(self, name: str) -> dict[str, Any]:
        webhook = self.settings.webhook_named(name)
        assert webhook is not None  # callers name configured endpoints
        state = await self.events.endpoint(name)
        return {"name": name, "url": webhook.url, "events": webhook.events, "routes": webhook.routes,
                "disabled_at": state.disabled_at.isoformat() if state.disabled_at else None,
                "disabled_reason": state.disabled_reason}


class Redelivery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoint: str | None = None


class EventView(BaseModel):
    id: str
    type: str
    timestamp: str
    call_id: str | None
    data: dict[str, Any]
    # Each endpoint's delivery; its `history` (every attempt) in GET /v1/events/{id} only.
    deliveries: list[Delivery]

    @classmethod
    def of(cls, event: StoredEvent) -> dict[str, Any]:
        envelope = event.envelope
        return cls(id=event.id, type=event.type, timestamp=envelope["timestamp"], call_id=event.call_id,
                   data=envelope["data"], deliveries=list(event.deliveries)).model_dump(mode="json")


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    try:
        return inputs.whole_number(value, name="limit", minimum=1, maximum=MAX_PAGE)
    except inputs.InvalidInput:
        raise ValueError(f"limit must be 1 to {MAX_PAGE}") from None


def _optional_text(value: str | None, name: str) -> str | None:
    return None if value is None else inputs.plain_text(value, name=name, max_length=MAX_ID_LENGTH)


def path_text(request: Request, name: str) -> str | None:
    """A path parameter naming something the store holds, or None when it could name nothing
    (too long, or a NUL, which PostgreSQL refuses in text): the route answers 404 without asking."""
    value = request.path_params[name]
    return None if len(value) > MAX_ID_LENGTH or inputs.has_control_characters(value) else value


async def call_in_scope(request: Request, store: CallStore) -> CallRecord | None:
    """The call named in the path, if the request's API key may see it: None (answered 404) for a
    call outside its scope as for an id that names none, so a key learns nothing of other calls."""
    call_id = path_text(request, "call_id")
    return None if call_id is None else await store.get_within(call_id, access_of(request).scope)


class ApiRefusal(Exception):
    """The request is refused with `response` (a body the route does not take: 413, 415, 422; …)."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


Body = TypeVar("Body", bound=BaseModel)


async def json_body(request: Request, model: type[Body], limit: int, *, what: str, optional: bool = False) -> Body:
    """The request's JSON body as `model`; `optional`: a request without a body is the model's defaults.
    Raises ApiRefusal."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    wrong_type = problem(415, f"send {what} as application/json")
    if content_type != "application/json" and not (optional and not content_type):
        raise ApiRefusal(wrong_type)
    body = await read_limited(request, limit)
    if body is None:
        raise ApiRefusal(problem(413, f"body larger than {limit} bytes"))
    if not content_type:  # optional: no body at all
        if body:
            raise ApiRefusal(wrong_type)
        return model()
    if inputs.escapes_control_characters(body):
        raise ApiRefusal(problem(422, [{"field": None, "problem": "a string holds NUL or another control character"}]))
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise ApiRefusal(problem(422, [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "problem": e["msg"].removeprefix("Value error, ")}
            for e in error.errors()
        ])) from None


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is (or says it is) larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and inputs.whole_number_or_none(declared, maximum=limit) is None:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _choice(value: str | None, allowed: list[str], name: str) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}")
    return value


def _time(value: str | None, name: str) -> dt.datetime | None:
    # Stored times are UTC; SQLite compares them as text, so the bound value is UTC too.
    return None if value is None else inputs.timestamp(value, name=name)


def _encode_cursor(record: CallRecord) -> str:
    return inputs.encode_cursor(record.created_at.isoformat(), record.id)


def _decode_cursor(value: str | None) -> tuple[dt.datetime, str] | None:
    if not value:
        return None
    created_at, call_id = inputs.decode_cursor(value, 2)
    try:
        return inputs.timestamp(created_at, name="cursor"), call_id
    except inputs.InvalidInput:
        raise inputs.InvalidInput("cursor is not one this API handed out") from None


def openapi_document() -> dict[str, Any]:
    dial_schema = DialRequest.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    call_schema = CallView.model_json_schema(ref_template="#/components/schemas/{model}")
    # The view writes `from` (a keyword in Python): the document says what the API sends.
    call_schema["properties"]["from"] = call_schema["properties"].pop("from_")
    call_schema["required"] = ["from" if name == "from_" else name for name in call_schema.get("required", [])]
    errors = {
        "401": {"description": "missing or unknown API key"},
        "403": {"description": "refused by the dial policy (destination, from number), or a route or carrier "
                               "outside the API key's scope"},
        "422": {"description": "invalid request, unknown route, or carrier not configured"},
        "429": {"description": "dial rate for this API key exceeded"},
    }
    call_ref = {"$ref": "#/components/schemas/Call"}
    # The call-control and campaigns APIs, built on this module, document their own routes.
    from . import campaigns_api, control

    schemas = {"DialRequest": dial_schema, "Call": call_schema, **control.openapi_schemas(),
               **campaigns_api.openapi_schemas()}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Ultravox telephony gateway dialer API", "version": "1", "description": API_DESCRIPTION},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "security": [{"bearer": []}],
        # What the gateway sends to the [[webhooks]] endpoints, signed per Standard Webhooks.
        "webhooks": _event_webhooks(schemas),
        "paths": {
            **_event_paths(schemas, errors),
            **control.openapi_paths(),
            **campaigns_api.openapi_paths(),
            "/v1/calls": {
                "post": {
                    "summary": "Phone someone with an agent",
                    "parameters": [{
                        "name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 255},
                        "description": "A retried request with the same key returns the first call",
                    }],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/DialRequest"}}}},
                    "responses": {"201": {"description": "call accepted", "content": {"application/json": {
                        "schema": call_ref}}}, **errors},
                },
                "get": {
                    "summary": "List calls, newest first",
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                        for name in ("created_after", "created_before", "cursor")
                    ] + [
                        {"name": name, "in": "query", "required": False, "schema": {"type": "string", "enum": values}}
                        for name, values in (("status", STATUSES), ("carrier", list(CARRIERS)),
                                             ("direction", ["inbound", "outbound"]))
                    ] + [{"name": "limit", "in": "query", "required": False,
                          "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}}],
                    "responses": {"200": {"description": "a page of calls", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "calls": {"type": "array", "items": call_ref},
                            "next_cursor": {"type": ["string", "null"]},
                        }}}}}, "401": errors["401"]},
                },
            },
            "/v1/calls/{call_id}/recording": {
                "get": {
                    "summary": "A bridged call's recording: a stereo WAV, caller left, agent right",
                    "parameters": [
                        {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "part", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
                         "description": "which stretch of the call (a return from a transfer starts another); "
                                        "default 0, the first"},
                    ],
                    "responses": {
                        "200": {
                            "description": "the recording as far as it is written",
                            "headers": {"Recording-Parts": {"schema": {"type": "integer"},
                                                            "description": "how many recordings the call has"}},
                            "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "400": {"description": "part is not a whole number"},
                        "401": errors["401"],
                        "404": {"description": "no such call, no recording, no such part, or the file is gone"},
                    },
                },
            },
            "/v1/openapi.json": {"get": {
                "summary": "This document (no API key needed)", "security": [],
                "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {}}}},
            }},
            "/v1/calls/{call_id}": {
                "get": {
                    "summary": "One call",
                    "parameters": [{"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "the call", "content": {"application/json": {
                        "schema": call_ref}}}, "401": errors["401"], "404": {"description": "no such call"}},
                },
            },
        },
    }
    openapi_refusals(document["paths"])
    return document


API_DESCRIPTION = (
    "Every operation takes `Authorization: Bearer KEY`. A key may be limited ([[api_keys]] in the "
    "configuration) to some permissions (each operation's `x-permission`: read, recordings, dial, control, "
    "campaigns, events, suppressions; without it: 403) and to a scope of calls (routes, carriers, its own "
    "calls): a call, campaign or event outside its scope answers 404, as one that does not exist; dialling "
    "outside it answers 403."
)


def _event_webhooks(schemas: dict[str, Any]) -> dict[str, Any]:
    headers = {
        "webhook-id": "the event's id: the same on every attempt (deduplicate on it)",
        "webhook-timestamp": "this attempt's time, in Unix seconds",
        "webhook-signature": "v1,<base64 HMAC-SHA256 with the endpoint's secret over id.timestamp.body>",
    }
    hooks = {}
    for event_type, model in EVENT_DATA.items():
        name = model.__name__.removesuffix("Data") + "Event"
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for nested, schema in schemas[model.__name__].pop("$defs", {}).items():
            schemas[nested] = schema
        schemas[name] = {"type": "object", "required": ["type", "timestamp", "data"], "properties": {
            "type": {"const": event_type},
            "timestamp": {"type": "string", "format": "date-time", "description": "when it happened"},
            "data": {"$ref": f"#/components/schemas/{model.__name__}"},
        }}
        hooks[event_type] = {"post": {
            "summary": (model.__doc__ or event_type).strip().splitlines()[0],
            "parameters": [{"name": header, "in": "header", "required": True, "schema": {"type": "string"},
                            "description": description} for header, description in headers.items()],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"2XX": {"description": "delivered"},
                          "410": {"description": "disables the endpoint (until POST /v1/webhooks/{name}/enable)"},
                          "default": {"description": "retried per [events] retry_schedule_seconds"}},
        }}
    return hooks


def _event_paths(schemas: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    schemas["DeliveredEvent"] = EventView.model_json_schema(ref_template="#/components/schemas/{model}")
    for nested, schema in schemas["DeliveredEvent"].pop("$defs", {}).items():
        schemas[nested] = schema
    event_ref = {"$ref": "#/components/schemas/DeliveredEvent"}
    event_id = {"name": "event_id", "in": "path", "required": True, "schema": {"type": "string"}}
    one = {"application/json": {"schema": event_ref}}
    unknown = {"description": "no such event"}
    webhook = {"type": "object", "properties": {
        name: {"type": ["string", "null"]} for name in ("name", "url", "disabled_at", "disabled_reason")}}
    return {
        "/v1/events": {"get": {
            "summary": "Events sent to the webhooks endpoints, newest first, with how each delivery went",
            "parameters": [
                {"name": "call_id", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "type", "in": "query", "required": False, "schema": {"type": "string", "enum": list(EVENT_TYPES)}},
                {"name": "status", "in": "query", "required": False, "description": "events with a delivery in this state",
                 "schema": {"type": "string", "enum": DELIVERY_STATUSES}},
                {"name": "endpoint", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
            ],
            "responses": {"200": {"description": "a page of events", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"events": {"type": "array", "items": event_ref},
                                                 "next_cursor": {"type": ["string", "null"]}}}}}},
                "400": {"description": "a filter is not one of the listed values"}, "401": errors["401"]},
        }},
        "/v1/events/{event_id}": {"get": {
            "summary": "One event, with every delivery attempt",
            "parameters": [event_id],
            "responses": {"200": {"description": "the event", "content": one}, "401": errors["401"], "404": unknown},
        }},
        "/v1/events/{event_id}/redeliver": {"post": {
            "summary": "Send an event again (same webhook-id), to every endpoint or to one",
            "parameters": [event_id],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"endpoint": {"type": "string"}}, "additionalProperties": False}}}},
            "responses": {"202": {"description": "the deliveries are pending again", "content": one},
                          "401": errors["401"], "404": unknown,
                          "409": {"description": "the endpoint is disabled, or none is configured"},
                          "422": {"description": "no endpoint of that name"}},
        }},
        "/v1/webhooks": {"get": {
            "summary": "The configured endpoints and whether a 410 disabled them",
            "responses": {"200": {"description": "the endpoints", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"webhooks": {"type": "array", "items": webhook}}}}}},
                "401": errors["401"]},
        }},
        "/v1/webhooks/{name}/enable": {"post": {
            "summary": "Deliver to an endpoint again after it answered 410",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the endpoint, enabled", "content": {"application/json": {
                "schema": webhook}}}, "401": errors["401"], "404": {"description": "no such endpoint"}},
        }},
    }
