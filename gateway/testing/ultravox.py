"""A fake Ultravox: `FakeUltravox`, its ``serverWebSocket`` side (`FakeUltravoxSession`)
and the validation of request bodies against Ultravox's OpenAPI schema
(`validate_ultravox_request`).

The schema validation needs the ``test`` extra (``openapi-schema-validator``
and ``pyyaml``); those imports happen lazily so that importing this module
never requires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime as _dt
import importlib.resources
import json
import re
import threading
import time
import uuid
from collections import deque
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .server import ServerThread
from .speech import Speech, Utterances

__all__ = [
    "DATA_MESSAGE_TYPES",
    "FakeResponse",
    "FakeUltravox",
    "FakeUltravoxSession",
    "RecordedRequest",
    "validate_ultravox_request",
]


# ---------------------------------------------------------------------------
# Ultravox schema validation
# ---------------------------------------------------------------------------


_SCHEMA_URI = "urn:ultravox-openapi"
_SCHEMA_NAMES = {
    False: "ultravox.v1.StartCallRequest",
    True: "ultravox.v1.StartAgentCallRequest",
}
_schema_lock = threading.Lock()
_schema_doc: dict[str, Any] | None = None
_registries: dict[bool, Any] = {}  # strict -> referencing.Registry over the document
_validators: dict[tuple[str, bool], Any] = {}  # (component schema name, strict) -> validator


def _load_schema_doc() -> dict[str, Any]:
    global _schema_doc
    if _schema_doc is None:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        text = (
            importlib.resources.files("gateway")
            .joinpath("schemas/ultravox-openapi.yaml")
            .read_text(encoding="utf-8")
        )
        _schema_doc = yaml.load(text, Loader=loader)
    return _schema_doc


def _close_objects(schema: Any) -> None:
    """Add ``additionalProperties: false`` to every schema that lists properties.

    Walks schema keywords only (not arbitrary keys), so a property that happens
    to be named "properties" is not mistaken for the keyword.
    """
    if not isinstance(schema, dict):
        return
    if isinstance(schema.get("properties"), dict):
        schema.setdefault("additionalProperties", False)
        for sub in schema["properties"].values():
            _close_objects(sub)
    for key in ("items", "not", "additionalProperties"):
        _close_objects(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            _close_objects(sub)


def _schema_validator(schema_name: str, strict: bool) -> Any:
    """A cached validator for ``#/components/schemas/<schema_name>``; call with _schema_lock held."""
    key = (schema_name, strict)
    if key not in _validators:
        from openapi_schema_validator import OAS30WriteValidator

        if strict not in _registries:
            from referencing import Registry
            from referencing.jsonschema import DRAFT4

            doc = _load_schema_doc()
            if strict:
                doc = copy.deepcopy(doc)
                for schema in doc["components"]["schemas"].values():
                    _close_objects(schema)
            # OpenAPI 3.0 schemas are draft-4 flavoured; register the whole
            # document so "#/components/schemas/..." refs resolve inside it.
            _registries[strict] = Registry().with_resource(_SCHEMA_URI, DRAFT4.create_resource(doc))
        root = {"$ref": f"{_SCHEMA_URI}#/components/schemas/{schema_name}"}
        _validators[key] = OAS30WriteValidator(
            root,
            registry=_registries[strict],
            format_checker=OAS30WriteValidator.FORMAT_CHECKER,
        )
    return _validators[key]


def _validator(agent: bool, strict: bool) -> Any:
    with _schema_lock:
        return _schema_validator(_SCHEMA_NAMES[agent], strict)


def _schema_errors(body: Any, schema_name: str, *, strict: bool, prefix: str = "") -> list[str]:
    """Messages for ``body`` against a component schema, each led by its JSON path."""
    with _schema_lock:
        validator = _schema_validator(schema_name, strict)
    errors = sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
    messages = []
    for error in errors:
        path = "/".join(str(p) for p in error.absolute_path)
        where = "/".join(part for part in (prefix, path) if part) or "<root>"
        messages.append(f"{where}: {error.message}")
    return messages


def _extra_rules(body: dict[str, Any]) -> list[str]:
    # Rules Ultravox states in the schema's descriptions but cannot express in it.
    errors = []
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for name in metadata:
            if str(name).startswith("ultravox."):
                errors.append(f"metadata: key {name!r} uses the reserved 'ultravox.' prefix")
    medium = body.get("medium")
    if isinstance(medium, dict) and len(medium) > 1:
        errors.append(f"medium: at most one call medium may be set, got {sorted(medium)}")
    return errors


def validate_ultravox_request(
    body: dict[str, Any], *, agent: bool, strict: bool = True
) -> list[str]:
    """Validate a start-call request body against Ultravox's OpenAPI schema.

    ``agent`` picks ``StartAgentCallRequest`` (``POST /api/agents/{id}/calls``)
    over ``StartCallRequest`` (``POST /api/calls``). ``strict`` rejects unknown
    fields in every object that declares its properties and adds the rules of
    `_extra_rules`. Returns error messages, empty when the body is valid.
    """
    if not isinstance(body, dict):
        return [f"<root>: request body must be a JSON object, got {type(body).__name__}"]
    messages = _schema_errors(body, _SCHEMA_NAMES[agent], strict=strict)
    if strict:
        messages.extend(_extra_rules(body))
    return messages


_TOOL_DEFINITION_SCHEMA = "ultravox.v1.BaseToolDefinition"
_MODEL_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_IMPLEMENTATIONS = ("http", "client", "dataConnection")


def _tool_definition_errors(definition: Any, *, strict: bool = True) -> list[str]:
    """Validate a durable tool's ``definition`` against ``BaseToolDefinition``.

    ``strict`` closes every object, as for calls, and adds the rules Ultravox
    states only in the schema's descriptions. Messages are led by
    ``definition/...`` paths.
    """
    if not isinstance(definition, dict):
        return [f"definition: must be a JSON object, got {type(definition).__name__}"]
    messages = _schema_errors(definition, _TOOL_DEFINITION_SCHEMA, strict=strict, prefix="definition")
    if strict:
        name = definition.get("modelToolName")
        if isinstance(name, str) and not _MODEL_TOOL_NAME.fullmatch(name):
            messages.append(
                f"definition/modelToolName: {name!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$"
            )
        implementations = [key for key in _TOOL_IMPLEMENTATIONS if key in definition]
        if len(implementations) != 1:
            messages.append(
                "definition: exactly one implementation (http, client or dataConnection) "
                f"must be set, got {implementations}"
            )
        http = definition.get("http")
        if isinstance(http, dict):
            for key in ("baseUrlPattern", "httpMethod"):
                if not http.get(key):
                    messages.append(f"definition/http: {key} is required")
    return messages


# ---------------------------------------------------------------------------
# FakeUltravox
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RecordedRequest:
    path: str
    agent_id: str | None
    headers: dict[str, str]  # lower-case names, as Starlette gives them
    body: dict[str, Any]
    received_at: float  # time.monotonic()
    query: dict[str, str] = dataclasses.field(default_factory=dict)
    method: str = "POST"


@dataclasses.dataclass
class FakeResponse:
    """One scripted answer; `FakeUltravox.script` queues these per request."""

    status: int = 201
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    omit_join_url: bool = False
    hang: bool = False
    delay: float = 0.0
    # Held until this is set, then answered as scripted (the call is created even if the client
    # that asked is gone by then, as a real service would).
    hold: threading.Event | None = None


_HANG_SECONDS = 3600.0
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_ERROR_DETAILS = {
    429: "Request was throttled.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}
# Query parameters each start-call endpoint documents (strict mode rejects others:
# Ultravox would silently ignore them).
_CALL_QUERY_PARAMS = {
    False: frozenset({"enableGreetingPrompt", "priorCallId", "throttle"}),
    True: frozenset({"throttle"}),
}
DATA_MESSAGE_TYPES = frozenset({"forced_agent_message", "hang_up", "user_text_message"})
# The fields of each data message the REST API takes (Ultravox's data-message docs): name -> (kind,
# required). The OpenAPI schema only says "type"; strict mode also refuses fields not listed.
_DATA_MESSAGE_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "user_text_message": {"text": (str, True), "urgency": (str, False)},
    "hang_up": {"message": (str, False)},
    "forced_agent_message": {"content": (str, False), "toolCalls": (list, False), "knownToolResults": (list, False),
                             "uninterruptible": (bool, False), "urgency": (str, False)},
}
_URGENCIES = ("immediate", "soon", "later")
_TOOL_READ_ONLY = frozenset({"toolId", "created", "ownership"})


class _ConnectionCounter:
    """ASGI middleware noting each TCP connection's client (host, port)."""

    def __init__(self, app: Any, fake: "FakeUltravox") -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("client"):
            with self.fake._lock:
                self.fake._clients.add(tuple(scope["client"]))
        await self.app(scope, receive, send)


class _FakeServerThread(ServerThread):
    def __init__(self, fake: "FakeUltravox", **kwargs: Any) -> None:
        super().__init__(fake.app, **kwargs)
        self._fake = fake

    def stop(self, timeout: float = 10.0) -> None:
        # Let scripted hangs return so shutdown does not wait them out.
        self._fake._release.set()
        super().stop(timeout)


async def _hold(scripted: FakeResponse, release: threading.Event, extra_delay: float = 0.0) -> bool:
    """Sleep out a scripted delay; for a scripted hang, wait until released. True if it hung."""
    await asyncio.sleep(extra_delay + scripted.delay)
    if not scripted.hang:
        return False
    # Polls so that stopping the server can release the request.
    deadline = time.monotonic() + _HANG_SECONDS
    while not release.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return True


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


class FakeUltravox:
    """A fake of the parts of Ultravox's REST API the gateway uses.

    * ``POST /api/calls`` (optional ``?priorCallId=<uuid>``) and
      ``POST /api/agents/{id}/calls``: bodies validated against the OpenAPI
      schema (unless ``validate=False``); each created call's JSON is kept in
      ``created_calls``.
    * ``POST /api/calls/{call_id}/send_data_message``: kept in
      ``data_messages`` as ``(call_id, body)``; 404 for a call the fake did not
      create, 422 for one in ``ended_calls``; the message's fields are checked
      (400, and noted in ``schema_errors``). A ``hang_up`` ends the call: it
      joins ``ended_calls`` and its serverWebSocket, if any, is closed.
    * ``GET /api/calls/{call_id}`` and ``GET /api/calls/{call_id}/messages``
      (paginated by ``pageSize`` and ``cursor``): a created call, still going
      until `end_call` gives it its end, summary and messages.
    * ``GET``/``POST /api/tools`` and ``GET``/``PUT /api/tools/{tool_id}``:
      durable tools, kept in ``tools`` (tool id -> Tool JSON).
    * ``GET /api/accounts/me``: the account the key belongs to (``account_name``).
    * A call created with ``medium.serverWebSocket`` gets a ``joinUrl`` on the
      fake itself (``ws://127.0.0.1:{port}/calls/{callId}/server?apiVersion=1``);
      the socket behind it plays Ultravox's side of the medium (see
      `FakeUltravoxSession`, ``sessions``, ``media_mode``, ``greeting`` and
      ``answer``); `converse` makes it hold a conversation, as a stand-in for a
      real agent.

    Every request is checked for ``X-API-Key`` and recorded in ``requests``;
    validation failures are also collected in ``schema_errors``. The n-th
    start-call request (whatever its outcome) consumes the n-th `FakeResponse`
    queued with `script`, and the n-th data message the n-th one queued with
    `script_data_messages`; a 401 or 400 takes precedence over the scripted
    status.
    """

    def __init__(
        self, api_key: str = "test-ultravox-key", *, strict: bool = True, validate: bool = True
    ) -> None:
        self.api_key = api_key
        self.strict = strict
        # Benchmarks switch schema validation off: it adds about a third to the fake's CPU per request,
        # and the fake shares the machine with the server being measured.
        self.validate = validate
        self.delay = 0.0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._script: deque[FakeResponse] = deque()
        self._data_script: deque[FakeResponse] = deque()
        self._clients: set[tuple[Any, ...]] = set()
        self.requests: list[RecordedRequest] = []
        self.schema_errors: list[str] = []
        self.calls_created = 0
        self.held_requests = 0  # create requests that reached a FakeResponse(hold=…)
        self.list_requests = 0  # GET /api/calls
        self.list_status: int | None = None  # set: GET /api/calls answers this error status instead
        self.created_calls: list[dict[str, Any]] = []  # the Call JSON of each 201
        self.data_messages: list[tuple[str, dict[str, Any]]] = []  # (call_id, body)
        self.ended_calls: set[str] = set()  # call ids whose data messages get 422
        self.call_reports: dict[str, dict[str, Any]] = {}  # call id -> its end (see end_call)
        self.tools: dict[str, dict[str, Any]] = {}  # tool id -> Tool JSON
        # GET /api/accounts/me: allowedConcurrentCalls, and live calls beyond its own sessions.
        self.allowed_concurrent_calls: int | None = None
        self.other_active_calls = 0
        # serverWebSocket medium: see the "serverWebSocket side" section below.
        self.base_url: str | None = None  # http://host:port, set by serve()
        self.sessions: dict[str, FakeUltravoxSession] = {}  # call id -> its socket session
        self.media_mode: str = "echo"  # "echo", "silent" or "converse" (see `converse`)
        # Sent (paced) right after a socket connects: PCM at the session's output rate, or Speech.
        self.greeting: bytes | Speech | None = None
        # "converse": sent (paced) after each thing the caller says.
        self.answer: bytes | Speech | None = None
        # What the sessions say goes out this many times faster than real time (see `converse`).
        self.pace = 1.0
        self.account_name = "Fake Ultravox account"
        self._socket_calls: dict[str, dict[str, Any]] = {}  # call id -> serverWebSocket medium
        self._sessions_changed = threading.Condition(self._lock)
        self.app = Starlette(
            routes=[
                WebSocketRoute("/calls/{call_id}/server", self._server_socket),
                Route("/api/calls", self._start_call, methods=["POST"]),
                Route("/api/agents/{agent_id}/calls", self._start_call, methods=["POST"]),
                Route(
                    "/api/calls/{call_id}/send_data_message",
                    self._send_data_message,
                    methods=["POST"],
                ),
                Route("/api/calls", self._list_calls, methods=["GET"]),
                Route("/api/calls/{call_id}", self._get_call, methods=["GET"]),
                Route("/api/calls/{call_id}/messages", self._messages, methods=["GET"]),
                Route("/api/accounts/me", self._account, methods=["GET"]),
                Route("/api/tools", self._tools, methods=["GET", "POST"]),
                Route("/api/tools/{tool_id}", self._tool, methods=["GET", "PUT"]),
                Route("/{path:path}", self._unknown_path, methods=_ALL_METHODS),
            ],
            middleware=[Middleware(_ConnectionCounter, fake=self)],
        )

    # -- configuration (called from the test thread) -----------------------

    def converse(self, greeting: Speech | None = None, answer: Speech | None = None, *,
                 pace: float = 1.0) -> "FakeUltravox":
        """Hold a conversation on serverWebSocket calls, standing in for a real agent: say
        `greeting` once the call connects, then `answer` after each thing the caller says (a
        stretch of speech followed by a pause, see `Utterances`); by default the WAVs shipped in
        gateway/testing/sounds. With `pace` above 1 it speaks that many times faster than real
        time (the same audio, its 20 ms frames sent closer together), for a caller who does too
        (`gateway simulate --pace`). Returns the fake."""
        if not pace > 0:
            raise ValueError("pace must be above 0")
        self.media_mode = "converse"
        self.greeting = greeting or Speech.shipped("greeting")
        self.answer = answer or Speech.shipped("answer")
        self.pace = pace
        return self

    def script(self, *responses: FakeResponse) -> None:
        """Queue per-request overrides for start-call requests, consumed in arrival order."""
        with self._lock:
            self._script.extend(responses)

    def script_data_messages(self, *responses: FakeResponse) -> None:
        """Queue overrides for ``send_data_message`` requests (a status below 300 means 204)."""
        with self._lock:
            self._data_script.extend(responses)

    def end_call(self, call_id: str, *, summary: str | None = None, short_summary: str | None = None,
                 messages: list[dict[str, Any]] | None = None, end_reason: str = "hangup") -> None:
        """What Ultravox has on the call once it is over: its end, summary and transcript
        (``messages`` as Ultravox's Message objects: role, text, medium…)."""
        with self._lock:
            self.ended_calls.add(call_id)
            self.call_reports[call_id] = {
                "ended": _now_iso(), "endReason": end_reason, "summary": summary, "shortSummary": short_summary,
                "messages": list(messages or []),
            }

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._data_script.clear()
            self._clients.clear()
            self.requests.clear()
            self.schema_errors.clear()
            self.calls_created = 0
            self.held_requests = 0
            self.list_requests = 0
            self.list_status = None
            self.created_calls.clear()
            self.data_messages.clear()
            self.ended_calls.clear()
            self.call_reports.clear()
            self.tools.clear()
            self.allowed_concurrent_calls = None
            self.other_active_calls = 0
            self.delay = 0.0
            self.sessions.clear()
            self._socket_calls.clear()
            self.media_mode = "echo"
            self.greeting = None
            self.answer = None
            self.pace = 1.0

    @property
    def connections_seen(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def call_ids(self) -> set[str]:
        """Ids of the calls the fake created."""
        with self._lock:
            return {call["callId"] for call in self.created_calls if "callId" in call}

    def serve(self, **kwargs: Any) -> ServerThread:
        """Start the fake on a free local port; use the result as a context manager."""
        self._release.clear()
        server = _FakeServerThread(self, **kwargs).start()
        self.base_url = server.url
        return server

    # -- request handling (runs on the server thread) -----------------------

    async def _receive(
        self, request: Request, *, agent_id: str | None = None
    ) -> tuple[Any, str | None]:
        """Read, record and decode a request: (JSON body or None, parse error)."""
        raw = await request.body()
        parse_error = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            body, parse_error = None, f"<root>: invalid JSON: {exc}"
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    path=request.url.path,
                    agent_id=agent_id,
                    headers=dict(request.headers),
                    body=body if isinstance(body, dict) else {},
                    received_at=time.monotonic(),
                    query=dict(request.query_params),
                    method=request.method,
                )
            )
        return body, parse_error

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if request.headers.get("x-api-key") == self.api_key:
            return None
        return JSONResponse(
            {"detail": "Authentication credentials were not provided or are invalid."},
            status_code=401,
        )

    def _rejected(self, errors: list[str]) -> JSONResponse:
        with self._lock:
            self.schema_errors.extend(errors)
        return JSONResponse({"detail": "; ".join(errors)}, status_code=400)

    def _query_errors(self, request: Request, agent: bool, body: Any) -> list[str]:
        errors = []
        query = request.query_params
        prior = query.get("priorCallId")
        if prior is not None and not _is_uuid(prior):
            errors.append(f"?priorCallId: {prior!r} is not a UUID")
        if self.strict:
            for name in sorted(set(query) - _CALL_QUERY_PARAMS[agent]):
                errors.append(f"?{name}: not a query parameter of {request.url.path}")
            greeting = query.get("enableGreetingPrompt")
            if greeting is not None and greeting not in ("true", "false"):
                errors.append(f"?enableGreetingPrompt: {greeting!r} is not a boolean")
            if prior is not None and isinstance(body, dict) and "initialMessages" in body:
                errors.append("initialMessages: must not be set together with ?priorCallId")
        return errors

    async def _start_call(self, request: Request) -> JSONResponse:
        agent_id = request.path_params.get("agent_id")
        body, parse_error = await self._receive(request, agent_id=agent_id)
        with self._lock:
            scripted = self._script.popleft() if self._script else FakeResponse()

        if await _hold(scripted, self._release, self.delay):
            return JSONResponse({"detail": "fake Ultravox shutting down"}, status_code=503)
        if scripted.hold is not None:
            with self._lock:
                self.held_requests += 1
            while not scripted.hold.is_set() and not self._release.is_set():
                await asyncio.sleep(0.02)

        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        if agent_id is not None and not _is_uuid(agent_id):
            return JSONResponse({"detail": f"agent id {agent_id!r} is not a UUID"}, status_code=400)

        errors = self._query_errors(request, agent_id is not None, body)
        if parse_error:
            errors.append(parse_error)
        else:
            if self.validate:
                errors.extend(
                    validate_ultravox_request(body, agent=agent_id is not None, strict=self.strict)
                )
            errors.extend(_server_websocket_errors(body))
        if errors:
            return self._rejected(errors)

        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        if scripted.status != 201:
            content = scripted.body
            if content is None:
                content = {"detail": _ERROR_DETAILS.get(scripted.status, "Error.")}
            return JSONResponse(content, status_code=scripted.status, headers=headers)

        with self._lock:
            self.calls_created += 1
            n = self.calls_created
        if scripted.body is not None:
            call = scripted.body
        else:
            call = self._call_json(body, agent_id, n, scripted.omit_join_url)
            socket_medium = _server_websocket_medium(body)
            if socket_medium is not None:
                if "joinUrl" in call:
                    call["joinUrl"] = self._socket_join_url(request, call["callId"])
                with self._lock:
                    self._socket_calls[call["callId"]] = socket_medium
        with self._lock:
            self.created_calls.append(call)
        return JSONResponse(call, status_code=201, headers=headers)

    async def _send_data_message(self, request: Request) -> Response:
        call_id = request.path_params["call_id"]
        body, parse_error = await self._receive(request)
        with self._lock:
            scripted = self._data_script.popleft() if self._data_script else FakeResponse()

        if await _hold(scripted, self._release, self.delay):
            return JSONResponse({"detail": "fake Ultravox shutting down"}, status_code=503)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized

        if parse_error:
            return self._rejected([parse_error])
        if not isinstance(body, dict):
            return self._rejected(["<root>: request body must be a JSON object"])
        kind = body.get("type")
        if not isinstance(kind, str) or kind not in DATA_MESSAGE_TYPES:
            return self._rejected(
                [f"type: {kind!r} is not one of {sorted(DATA_MESSAGE_TYPES)}"]
            )
        field_errors = self._data_message_errors(kind, body)
        if field_errors:
            return self._rejected(field_errors)

        with self._lock:
            ended = call_id in self.ended_calls
        if ended:
            return JSONResponse({"detail": "Call is not active."}, status_code=422)
        if call_id not in self.call_ids:
            return JSONResponse({"detail": "Not found."}, status_code=404)

        if scripted.status >= 300:
            headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
            content = scripted.body
            if content is None:
                content = {"detail": _ERROR_DETAILS.get(scripted.status, "Error.")}
            return JSONResponse(content, status_code=scripted.status, headers=headers)
        with self._lock:
            self.data_messages.append((call_id, body))
            if kind == "hang_up":
                self.ended_calls.add(call_id)
            session = self.sessions.get(call_id) if kind == "hang_up" else None
        if session is not None:  # Ultravox ends the call: its socket closes
            await session._hang_up(1000)
        return Response(status_code=204)

    def _data_message_errors(self, kind: str, body: dict[str, Any]) -> list[str]:
        fields = _DATA_MESSAGE_FIELDS[kind]
        errors = []
        for name, (expected, required) in fields.items():
            if name not in body:
                if required:
                    errors.append(f"{kind}.{name}: required")
            elif not isinstance(body[name], expected) or (expected is str and required and not body[name]):
                errors.append(f"{kind}.{name}: {body[name]!r} is not a valid {name}")
        if "urgency" in body and body["urgency"] not in _URGENCIES:
            errors.append(f"{kind}.urgency: {body['urgency']!r} is not one of {list(_URGENCIES)}")
        if self.strict:
            errors += [f"{kind}.{name}: not a field of {kind}" for name in sorted(set(body) - set(fields) - {"type"})]
        return errors

    def _tool_errors(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["<root>: request body must be a JSON object"]
        errors = []
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 40:
            errors.append(f"name: must be a string of 1 to 40 characters, got {name!r}")
        if self.strict:
            for key in sorted(set(body) - {"name", "definition"} - _TOOL_READ_ONLY):
                errors.append(f"{key}: not a field of Tool")
        if "definition" not in body:
            errors.append("definition: is required")
        elif self.validate:
            errors.extend(_tool_definition_errors(body["definition"], strict=self.strict))
        return errors

    def _name_taken(self, name: str, tool_id: str | None) -> bool:
        with self._lock:
            return any(
                tool["name"] == name and other != tool_id for other, tool in self.tools.items()
            )

    async def _tools(self, request: Request) -> JSONResponse:
        body, parse_error = await self._receive(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        if request.method == "GET":
            search = request.query_params.get("search", "").lower()
            ownership = request.query_params.get("ownership")
            with self._lock:
                tools = [
                    copy.deepcopy(tool)
                    for tool in self.tools.values()
                    if search in tool["name"].lower() and ownership in (None, "private")
                ]
            return JSONResponse(
                {"results": tools, "next": None, "previous": None, "total": len(tools)}
            )

        errors = [parse_error] if parse_error else self._tool_errors(body)
        if errors:
            return self._rejected(errors)
        if self._name_taken(body["name"], None):
            return JSONResponse(
                {"name": ["A tool with this name already exists."]}, status_code=400
            )
        tool = {
            "toolId": str(uuid.uuid4()),
            "name": body["name"],
            "created": _now_iso(),
            "definition": copy.deepcopy(body["definition"]),
            "ownership": "private",
        }
        with self._lock:
            self.tools[tool["toolId"]] = tool
        return JSONResponse(copy.deepcopy(tool), status_code=201)

    async def _tool(self, request: Request) -> JSONResponse:
        tool_id = request.path_params["tool_id"]
        body, parse_error = await self._receive(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        with self._lock:
            tool = self.tools.get(tool_id)
        if tool is None:
            return JSONResponse({"detail": "Not found."}, status_code=404)
        if request.method == "GET":
            return JSONResponse(copy.deepcopy(tool))

        errors = [parse_error] if parse_error else self._tool_errors(body)
        if errors:
            return self._rejected(errors)
        if self._name_taken(body["name"], tool_id):
            return JSONResponse(
                {"name": ["A tool with this name already exists."]}, status_code=400
            )
        with self._lock:
            tool["name"] = body["name"]
            tool["definition"] = copy.deepcopy(body["definition"])
            return JSONResponse(copy.deepcopy(tool))

    async def _account(self, request: Request) -> JSONResponse:
        await self._receive(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        with self._lock:
            live = sum(1 for session in self.sessions.values() if not session.closed.is_set())
        return JSONResponse({"accountId": "00000000-0000-4000-8000-000000000000", "name": self.account_name,
                             "activeCalls": live + self.other_active_calls, "hasActiveSubscription": True,
                             "allowedConcurrentCalls": self.allowed_concurrent_calls})

    async def _known_call(self, request: Request) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        """(the created call the path names, None), or (None, the refusal: 401 or 404)."""
        await self._receive(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return None, unauthorized
        call_id = request.path_params["call_id"]
        with self._lock:
            call = next((dict(call) for call in self.created_calls if call.get("callId") == call_id), None)
        if call is None:
            return None, JSONResponse({"detail": "Not found."}, status_code=404)
        return call, None

    async def _list_calls(self, request: Request) -> JSONResponse:
        """``GET /api/calls``: the created calls, newest first, filtered by ``metadata.KEY=VALUE``."""
        await self._receive(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        wanted = {name[len("metadata."):]: value for name, value in request.query_params.items()
                  if name.startswith("metadata.")}
        with self._lock:
            self.list_requests += 1
            if self.list_status is not None:
                return JSONResponse({"detail": "Scripted failure."}, status_code=self.list_status)
            found = [dict(call) for call in reversed(self.created_calls)
                     if all((call.get("metadata") or {}).get(key) == value for key, value in wanted.items())]
            reports = {call["callId"]: dict(self.call_reports.get(call["callId"]) or {}) for call in found}
        size = int(request.query_params.get("pageSize") or 100)
        results = [{**call, "joined": None, "ended": None, **{k: v for k, v in reports[call["callId"]].items()
                                                            if k != "messages"}} for call in found[:size]]
        return JSONResponse({"results": results, "next": None, "previous": None, "total": len(found)})

    async def _get_call(self, request: Request) -> JSONResponse:
        call, refusal = await self._known_call(request)
        if refusal is not None or call is None:
            return refusal or JSONResponse({"detail": "Not found."}, status_code=404)
        with self._lock:
            report = dict(self.call_reports.get(call["callId"]) or {})
        report.pop("messages", None)
        return JSONResponse({**call, "joined": None, "ended": None, "endReason": None, "summary": None,
                             "shortSummary": None, **report})

    async def _messages(self, request: Request) -> JSONResponse:
        _, refusal = await self._known_call(request)
        if refusal is not None:
            return refusal
        call_id = request.path_params["call_id"]
        try:
            size = max(1, int(request.query_params.get("pageSize", "100")))
            start = int(request.query_params.get("cursor", "0"))
        except ValueError:
            return JSONResponse({"detail": "Invalid cursor or pageSize."}, status_code=400)
        with self._lock:
            messages = list((self.call_reports.get(call_id) or {}).get("messages", []))
        page = messages[start:start + size]
        more = start + size < len(messages)
        following = str(request.url.include_query_params(cursor=start + size, pageSize=size)) if more else None
        return JSONResponse({"results": page, "next": following, "previous": None, "total": len(messages)})

    async def _unknown_path(self, request: Request) -> JSONResponse:
        await self._receive(request)
        return JSONResponse({"detail": "Not found."}, status_code=404)

    # -- serverWebSocket medium (see FakeUltravoxSession) -------------------

    def wait_for_session(
        self, call_id: str | None = None, *, timeout: float = 5.0
    ) -> "FakeUltravoxSession":
        """The session of ``call_id`` (or the first one to connect) once a client has connected."""
        deadline = time.monotonic() + timeout
        with self._sessions_changed:
            while True:
                if call_id is not None:
                    session = self.sessions.get(call_id)
                else:
                    session = next(iter(self.sessions.values()), None)
                if session is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no client connected to the serverWebSocket of {call_id or 'any call'}"
                    )
                self._sessions_changed.wait(remaining)
        if not session.connected.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the serverWebSocket of {session.call_id} was not accepted in time")
        return session

    def _socket_join_url(self, request: Request, call_id: str) -> str:
        base = self.base_url or f"http://{request.url.netloc}"
        return "ws" + base[len("http"):] + f"/calls/{call_id}/server?apiVersion=1"

    async def _server_socket(self, websocket: WebSocket) -> None:
        call_id = websocket.path_params["call_id"]
        with self._sessions_changed:
            medium = self._socket_calls.get(call_id)
            taken = call_id in self.sessions
            session = None
            if medium is not None and not taken:
                session = FakeUltravoxSession(
                    self, call_id, medium, asyncio.get_running_loop(),
                    query=dict(websocket.query_params),
                )
                self.sessions[call_id] = session
                self._sessions_changed.notify_all()
        await websocket.accept()
        if session is None:
            # Join URLs are single-use: a second client is refused, as is an unknown call.
            await websocket.close(code=4409 if taken else 4404)
            return
        await session._run(websocket)

    @staticmethod
    def _call_json(
        body: dict[str, Any], agent_id: str | None, n: int, omit_join_url: bool
    ) -> dict[str, Any]:
        call_id = str(uuid.uuid4())
        call: dict[str, Any] = {"callId": call_id, "created": _now_iso()}
        if not omit_join_url:
            call["joinUrl"] = (
                f"wss://voice.fake-ultravox.test/calls/{call_id}/telephony"
                f"?token=tok-{n}&region=us"
            )
        if agent_id is not None:
            call["agentId"] = agent_id
        for name in ("medium", "metadata", "firstSpeakerSettings"):
            if name in body:
                call[name] = body[name]
        return call


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# FakeUltravox: the serverWebSocket side
# ---------------------------------------------------------------------------


_SOCKET_CALL_TIMEOUT = 5.0  # seconds a test-thread control call waits for the fake's loop


def _server_websocket_medium(body: Any) -> dict[str, Any] | None:
    medium = body.get("medium") if isinstance(body, dict) else None
    if isinstance(medium, dict) and "serverWebSocket" in medium:
        socket_medium = medium["serverWebSocket"]
        return socket_medium if isinstance(socket_medium, dict) else {}
    return None


def _server_websocket_errors(body: Any) -> list[str]:
    """What Ultravox requires of ``medium.serverWebSocket`` beyond the schema's types."""
    medium = body.get("medium") if isinstance(body, dict) else None
    if not isinstance(medium, dict) or "serverWebSocket" not in medium:
        return []
    socket_medium = medium["serverWebSocket"]
    where = "medium/serverWebSocket"
    if not isinstance(socket_medium, dict):
        return [f"{where}: must be an object"]
    errors = []
    for name, required in (
        ("inputSampleRate", True),
        ("outputSampleRate", False),
        ("clientBufferSizeMs", False),
    ):
        if name not in socket_medium:
            if required:
                errors.append(f"{where}/{name}: is required")
            continue
        value = socket_medium[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            errors.append(f"{where}/{name}: must be a positive integer, got {value!r}")
    return errors


class FakeUltravoxSession:
    """Ultravox's side of one ``serverWebSocket`` connection to the fake.

    Recorded (written on the fake's server thread, read from the test thread):
    ``audio_in`` (the binary frames received, concatenated), ``frames_in``,
    ``messages_in`` (text frames decoded as JSON; a frame that is not a JSON
    object is kept as ``{"_invalid": text}``), ``frames_out``, ``connected``,
    ``closed`` and ``close_code`` (the code the client closed with, or the one
    `hang_up` used).

    Behaviour follows the fake's ``media_mode`` (read per frame: ``"echo"``
    sends every binary frame straight back, ``"silent"`` sends nothing,
    ``"converse"`` says the fake's ``answer`` after each thing the caller says,
    counted in ``utterances``) and its ``greeting`` (read at connect). What the
    session says goes as 20 ms frames in real time, one thing after another;
    `Speech` is resampled to the session's output rate, bytes are sent as
    they are. A ``ping`` is answered with ``pong``, as Ultravox does.

    `send_audio`, `send_json` and `hang_up` are called from the test thread:
    each runs on the fake's event loop and returns once done.
    """

    def __init__(
        self,
        fake: FakeUltravox,
        call_id: str,
        medium: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        *,
        query: dict[str, str] | None = None,
    ) -> None:
        self.fake = fake
        self.call_id = call_id
        self.input_sample_rate: int = int(medium.get("inputSampleRate") or 16000)
        self.output_sample_rate: int = int(medium.get("outputSampleRate") or self.input_sample_rate)
        self.client_buffer_size_ms: int | None = medium.get("clientBufferSizeMs")
        self.query: dict[str, str] = query or {}
        self.audio_in = bytearray()
        self.frames_in = 0
        self.frames_out = 0
        self.messages_in: list[dict[str, Any]] = []
        self.utterances = 0  # things the caller said ("converse")
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.close_code: int | None = None
        self.connected_at: float | None = None  # time.monotonic()
        self._loop = loop
        self._changed = threading.Condition()
        self._websocket: WebSocket | None = None
        self._send_lock: asyncio.Lock | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._speaking: asyncio.Lock | None = None
        self._listening = Utterances(self.input_sample_rate)

    @property
    def frame_bytes(self) -> int:
        """Bytes in 20 ms of agent audio (s16le mono at the output sample rate)."""
        return self.output_sample_rate // 50 * 2

    # -- control from the test thread ------------------------------------

    def _call(self, coro: Any, timeout: float) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError("FakeUltravoxSession controls block; call them from another thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send_audio(
        self, pcm: bytes, *, realtime: bool = False, timeout: float = _SOCKET_CALL_TIMEOUT
    ) -> None:
        """Send agent audio: one binary frame, or 20 ms frames in real time (at the fake's `pace`) with ``realtime``."""
        if realtime:
            duration = len(pcm) / (2 * self.output_sample_rate)
            self._call(self._paced(bytes(pcm)), timeout + duration)
        else:
            self._call(self._send(bytes(pcm), strict=True), timeout)

    def send_json(self, message: dict[str, Any], *, timeout: float = _SOCKET_CALL_TIMEOUT) -> None:
        """Send one text frame, e.g. ``{"type": "playback_clear_buffer"}``."""
        self._call(self._send(json.dumps(message), strict=True), timeout)

    def hang_up(self, code: int = 1000, *, timeout: float = _SOCKET_CALL_TIMEOUT) -> None:
        """Close the socket from Ultravox's side and wait until the closing is recorded."""
        self._call(self._hang_up(code), timeout)
        if not self.closed.wait(timeout):
            raise TimeoutError(f"the client did not complete the close of {self.call_id}")

    def wait_for_audio(self, nbytes: int, *, timeout: float = _SOCKET_CALL_TIMEOUT) -> bytes:
        """Block until at least ``nbytes`` of caller audio arrived; return all received so far."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: len(self.audio_in) >= nbytes or self.closed.is_set(), timeout
            ) or len(self.audio_in) < nbytes:
                raise TimeoutError(
                    f"{len(self.audio_in)} of {nbytes} audio bytes arrived on {self.call_id}"
                )
            return bytes(self.audio_in)

    def wait_for_message(
        self, type_: str, *, count: int = 1, timeout: float = _SOCKET_CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Block until ``count`` JSON messages of ``type_`` arrived; return all of that type."""

        def matching() -> list[dict[str, Any]]:
            return [m for m in self.messages_in if m.get("type") == type_]

        with self._changed:
            self._changed.wait_for(
                lambda: len(matching()) >= count or self.closed.is_set(), timeout
            )
            found = matching()
        if len(found) < count:
            raise TimeoutError(f"{len(found)} of {count} {type_!r} messages arrived on {self.call_id}")
        return found

    # -- on the fake's loop -------------------------------------------------

    async def _send(self, data: bytes | str, *, strict: bool = False) -> bool:
        websocket = self._websocket
        if websocket is None or self._closing or self.closed.is_set():
            if strict:
                raise ConnectionError(f"the serverWebSocket of {self.call_id} is not open")
            return False
        assert self._send_lock is not None
        try:
            async with self._send_lock:
                if isinstance(data, bytes):
                    await websocket.send_bytes(data)
                    self.frames_out += 1
                else:
                    await websocket.send_text(data)
        except Exception:
            if strict:
                raise
            return False
        return True

    async def _paced(self, pcm: bytes) -> None:
        """Send ``pcm`` as 20 ms frames on an absolute schedule (no drift), at the fake's pace."""
        size = self.frame_bytes
        interval = 0.02 / self.fake.pace
        start = self._loop.time()
        for k, offset in enumerate(range(0, len(pcm), size)):
            delay = start + k * interval - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await self._send(pcm[offset : offset + size]):
                return

    async def _hang_up(self, code: int) -> None:
        websocket = self._websocket
        if websocket is None or self._closing or self.closed.is_set():
            return
        self._closing = True
        self.close_code = code
        assert self._send_lock is not None
        with contextlib.suppress(Exception):
            async with self._send_lock:
                await websocket.close(code=code)

    async def _say(self, speech: bytes | Speech) -> None:
        """Speak after whatever is being said has been said."""
        pcm = speech.at(self.output_sample_rate) if isinstance(speech, Speech) else bytes(speech)
        assert self._speaking is not None
        async with self._speaking:
            await self._paced(pcm)

    async def _answer_each_utterance(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(0.05)
            if self._listening.finished(self._loop.time()):
                with self._changed:
                    self.utterances += 1
                    self._changed.notify_all()
                if self.fake.answer:
                    self._spawn(self._say(self.fake.answer))

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._send_lock = asyncio.Lock()
        self.connected_at = time.monotonic()
        self.connected.set()
        self._speaking = asyncio.Lock()
        if self.fake.greeting:
            self._spawn(self._say(self.fake.greeting))
        if self.fake.media_mode == "converse":
            self._spawn(self._answer_each_utterance())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    if self.close_code is None:
                        self.close_code = message.get("code", 1000)
                    break
                data, text = message.get("bytes"), message.get("text")
                if data is not None:
                    with self._changed:
                        self.audio_in.extend(data)
                        self.frames_in += 1
                        self._changed.notify_all()
                    if self.fake.media_mode == "echo":
                        await self._send(data)
                    elif self.fake.media_mode == "converse":
                        self._listening.hear(data, self._loop.time())
                elif text is not None:
                    await self._on_text(text)
        except Exception:  # the client vanished mid-receive
            if self.close_code is None:
                self.close_code = 1006
        finally:
            for task in list(self._tasks):
                task.cancel()
            with self._changed:
                self.closed.set()
                self._changed.notify_all()

    async def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            message = {"_invalid": text}
        with self._changed:
            self.messages_in.append(message)
            self._changed.notify_all()
        if message.get("type") == "ping":
            await self._send(json.dumps({"type": "pong", "timestamp": message.get("timestamp")}))
