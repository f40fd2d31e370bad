"""Public test helpers: a fake Ultravox REST API, an in-thread ASGI server and
carrier webhook signers.

They let the gateway's own tests, and users testing their own configuration,
run the real app against local fakes without any network access::

    fake = FakeUltravox()
    with fake.serve() as ultravox:
        os.environ["ULTRAVOX_BASE_URL"] = ultravox.url
        ...
        assert fake.schema_errors == []

The schema validation needs the ``test`` extra (``openapi-schema-validator``
and ``pyyaml``); those imports happen lazily so that importing this module
never requires them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as _dt
import email.utils as _email_utils
import importlib.resources
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Iterator
from urllib.parse import parse_qsl as _parse_qsl
from urllib.parse import urlencode as _urlencode
from urllib.parse import urlsplit as _urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

__all__ = [
    "DATA_MESSAGE_TYPES",
    "FakeResponse",
    "FakeUltravox",
    "RecordedRequest",
    "ServerThread",
    "TelnyxSigner",
    "plivo_inbound_form",
    "plivo_v3_headers",
    "telnyx_inbound_form",
    "twilio_inbound_form",
    "twilio_signature",
    "validate_ultravox_request",
]


# ---------------------------------------------------------------------------
# ServerThread
# ---------------------------------------------------------------------------


class _ThreadServer(uvicorn.Server):
    # Signal handlers belong to the main thread and the test runner; this
    # server is stopped through should_exit only.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on its own event loop.

    The listening socket is bound here, before the thread starts, so the port
    is known and reserved up front (no pick-a-port-then-bind race).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 1.0,
        start_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._start_timeout = start_timeout
        self.config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            loop="asyncio",
            # A request that never finishes (a scripted hang) must not block stop().
            timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
        )
        self.server = _ThreadServer(self.config)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        if self._thread is not None or self.server.started:
            raise RuntimeError("a ServerThread can be started only once")
        # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose protocol
        # says TCP, and accepted connections inherit it. With proto 0, Nagle's algorithm held a
        # small message behind a large one for a 40 ms delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, name=f"ServerThread:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError(
                    f"server failed to start (lifespan startup error?): {self._error!r}"
                ) from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("server did not start in time")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])  # type: ignore[list-item]
        except BaseException as exc:  # SystemExit on lifespan startup failure
            self._error = exc

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self.server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            # Skip waiting for connections and let asyncio.run cancel the rest.
            self.server.force_exit = True
            thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
      create, 422 for one in ``ended_calls``.
    * ``GET``/``POST /api/tools`` and ``GET``/``PUT /api/tools/{tool_id}``:
      durable tools, kept in ``tools`` (tool id -> Tool JSON).
    * A call created with ``medium.serverWebSocket`` gets a ``joinUrl`` on the
      fake itself (``ws://127.0.0.1:{port}/calls/{callId}/server?apiVersion=1``);
      the socket behind it plays Ultravox's side of the medium (see
      `FakeUltravoxSession`, ``sessions``, ``media_mode`` and ``greeting``).

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
        self.created_calls: list[dict[str, Any]] = []  # the Call JSON of each 201
        self.data_messages: list[tuple[str, dict[str, Any]]] = []  # (call_id, body)
        self.ended_calls: set[str] = set()  # call ids whose data messages get 422
        self.tools: dict[str, dict[str, Any]] = {}  # tool id -> Tool JSON
        # serverWebSocket medium: see the "serverWebSocket side" section below.
        self.base_url: str | None = None  # http://host:port, set by serve()
        self.sessions: dict[str, FakeUltravoxSession] = {}  # call id -> its socket session
        self.media_mode: str = "echo"  # "echo" or "silent"
        self.greeting: bytes | None = None  # PCM sent (paced) right after a socket connects
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
                Route("/api/tools", self._tools, methods=["GET", "POST"]),
                Route("/api/tools/{tool_id}", self._tool, methods=["GET", "PUT"]),
                Route("/{path:path}", self._unknown_path, methods=_ALL_METHODS),
            ],
            middleware=[Middleware(_ConnectionCounter, fake=self)],
        )

    # -- configuration (called from the test thread) -----------------------

    def script(self, *responses: FakeResponse) -> None:
        """Queue per-request overrides for start-call requests, consumed in arrival order."""
        with self._lock:
            self._script.extend(responses)

    def script_data_messages(self, *responses: FakeResponse) -> None:
        """Queue overrides for ``send_data_message`` requests (a status below 300 means 204)."""
        with self._lock:
            self._data_script.extend(responses)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._data_script.clear()
            self._clients.clear()
            self.requests.clear()
            self.schema_errors.clear()
            self.calls_created = 0
            self.created_calls.clear()
            self.data_messages.clear()
            self.ended_calls.clear()
            self.tools.clear()
            self.delay = 0.0
            self.sessions.clear()
            self._socket_calls.clear()
            self.media_mode = "echo"
            self.greeting = None

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
        return Response(status_code=204)

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
# Carrier signers
# ---------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a form POST to ``url``."""
    from twilio.request_validator import RequestValidator

    return RequestValidator(auth_token).compute_signature(url, params)


class TelnyxSigner:
    """Signs webhook bodies the way Telnyx does (ed25519 over ``"{ts}|{body}"``)."""

    def __init__(self, private_key: Any) -> None:
        self.private_key = private_key

    @classmethod
    def generate(cls) -> "TelnyxSigner":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key_b64(self) -> str:
        """The value to configure as ``TELNYX_PUBLIC_KEY``."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def headers(self, raw_body: bytes | str, timestamp: int | None = None) -> dict[str, str]:
        if isinstance(raw_body, str):
            raw_body = raw_body.encode("utf-8")
        if timestamp is None:
            timestamp = int(time.time())
        signature = self.private_key.sign(f"{timestamp}|".encode("ascii") + raw_body)
        return {
            "telnyx-signature-ed25519": base64.b64encode(signature).decode("ascii"),
            "telnyx-timestamp": str(timestamp),
        }


def plivo_v3_headers(
    auth_token: str,
    url: str,
    params: dict[str, str],
    *,
    method: str = "POST",
    nonce: str | None = None,
) -> dict[str, str]:
    """The V3 signature headers Plivo would send to ``url`` with ``params``."""
    from plivo.utils.signature_v3 import construct_get_url, construct_post_url, get_signature_v3

    if nonce is None:
        nonce = secrets.token_hex(10)
    # construct_get_url updates the dict it is given, so hand it a copy.
    if method.upper() == "GET":
        signed_url = construct_get_url(url, dict(params))
    else:
        signed_url = construct_post_url(url, dict(params))
    signature = get_signature_v3(
        auth_token.encode("utf-8"), signed_url.decode("utf-8"), nonce.encode("utf-8")
    )
    return {
        "X-Plivo-Signature-V3": signature.decode("ascii"),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }


# ---------------------------------------------------------------------------
# Inbound webhook forms
# ---------------------------------------------------------------------------


def twilio_inbound_form(
    call_sid: str | None = None,
    from_: str = "+15551230001",
    to: str = "+15550001111",
    *,
    account_sid: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Parameters of Twilio's voice webhook for a ringing inbound call."""
    form = {
        "CallSid": call_sid or "CA" + secrets.token_hex(16),
        "AccountSid": account_sid or "AC" + secrets.token_hex(16),
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
        "From": from_,
        "To": to,
        "Caller": from_,
        "Called": to,
    }
    form.update(extra)
    return form


def telnyx_inbound_form(
    call_sid: str | None = None,
    from_: str = "+15551230001",
    to: str = "+15550001111",
    *,
    account_sid: str | None = None,
    connection_id: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Parameters of a Telnyx TeXML voice webhook for a ringing inbound call."""
    form = {
        # TeXML's CallSid is the call_control_id, which looks like "v3:<token>".
        "CallSid": call_sid or "v3:" + secrets.token_urlsafe(24),
        "AccountSid": account_sid or str(uuid.uuid4()),
        "ConnectionId": connection_id or str(secrets.randbelow(9 * 10**18) + 10**18),
        "CallStatus": "ringing",
        "Direction": "inbound",
        "From": from_,
        "To": to,
    }
    form.update(extra)
    return form


def plivo_inbound_form(
    call_uuid: str | None = None,
    from_: str = "15551230001",
    to: str = "15550001111",
    **extra: str,
) -> dict[str, str]:
    """Parameters Plivo posts to an ``answer_url`` for a ringing inbound call.

    Plivo sends numbers as bare digits, so a leading "+" is stripped.
    """
    form = {
        "CallUUID": call_uuid or str(uuid.uuid4()),
        "From": from_.lstrip("+"),
        "To": to.lstrip("+"),
        "CallStatus": "ringing",
        "Direction": "inbound",
        "Event": "StartApp",
    }
    form.update(extra)
    return form


# ---------------------------------------------------------------------------
# Fake carrier REST APIs
# ---------------------------------------------------------------------------


__all__ += [
    "CallUpdate",
    "CarrierRequest",
    "FakeCarrier",
    "FakePlivo",
    "FakeTelnyx",
    "FakeTwilio",
    "PlacedCarrierCall",
]


@dataclasses.dataclass
class CarrierRequest:
    """One request a fake carrier received, whatever its path or outcome."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    # Decoded by content type: JSON object, or form fields (a field sent more
    # than once, like Twilio's StatusCallbackEvent, becomes a list).
    form_or_json: dict[str, Any]
    received_at: float  # time.monotonic()


@dataclasses.dataclass
class PlacedCarrierCall:
    """A call the fake carrier accepted, with the callback URLs the gateway gave it."""

    call_id: str  # Twilio CallSid, Telnyx CallSid (call_control_id), Plivo request_uuid
    to: str
    from_: str
    answer_url: str | None
    status_url: str | None
    params: dict[str, Any]  # the create-call parameters as the carrier understood them
    call_uuid: str | None = None  # Plivo only: the CallUUID, which differs from request_uuid


@dataclasses.dataclass
class CallUpdate:
    """A live-call update the fake carrier accepted (redirect, new TwiML/XML, hang-up)."""

    call_id: str  # Twilio CallSid, Telnyx CallSid, Plivo CallUUID
    params: dict[str, Any]  # the update parameters as the carrier understood them
    action: str = "update"  # "update", or "hangup" for Plivo's DELETE


class _Invalid(Exception):
    """A create-call request the carrier would reject; ``code`` is carrier-specific."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


_HTTP_METHODS = ("GET", "POST")
_STATUS_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})


def _decode_form(raw: bytes) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in _parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
        if name in fields:
            previous = fields[name]
            fields[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            fields[name] = value
    return fields


def _decode_body(raw: bytes, content_type: str) -> dict[str, Any]:
    """What was sent, decoded by its declared content type (for the record only)."""
    if not raw:
        return {}
    if "json" in content_type:
        try:
            body = json.loads(raw)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}
    return _decode_form(raw)


def _one(params: dict[str, Any], name: str) -> Any:
    value = params.get(name)
    return value[0] if isinstance(value, list) and value else value


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())


def _basic_auth(request: Request) -> tuple[str, str] | None:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _rfc2822_now() -> str:
    return _email_utils.format_datetime(_dt.datetime.now(_dt.timezone.utc))


def _validate_texml_update(params: dict[str, Any], markup: str) -> None:
    """The rules Twilio's and Telnyx's update-call endpoints share (``markup``: Twiml or Texml)."""
    status = _one(params, "Status")
    if status is not None and status not in ("completed", "canceled"):
        raise _Invalid(f"Status must be completed or canceled, got {status!r}")
    for name in ("Method", "FallbackMethod", "StatusCallbackMethod"):
        if name in params and str(_one(params, name)).upper() not in _HTTP_METHODS:
            raise _Invalid(f"{name} must be GET or POST")
    given = [name for name in ("Url", markup, "Status") if _one(params, name)]
    if not given:
        raise _Invalid(f"one of Url, {markup} or Status is required")
    if "Url" in given and markup in given:
        # The fake refuses the ambiguity rather than guess which one the carrier obeys.
        raise _Invalid(f"Url and {markup} are mutually exclusive")


class FakeCarrier:
    """Shared machinery of the fake carrier REST APIs.

    Subclasses state the create-call route, how the carrier authenticates,
    validates and answers, and what its callbacks look like. The n-th
    create-call request consumes the n-th `FakeResponse` queued with `script`
    (a scripted status below 300 means success, answered with the carrier's own
    success status); a 401 or a validation error takes precedence over the
    scripted status, as in `FakeUltravox`. Every request, to any path, is
    recorded in ``requests``; unknown paths answer 404.

    Live-call updates (the ``update_path`` endpoint) are accepted for the
    calls the fake placed and for the ids tests add to ``live_calls``; others
    answer 404. Accepted updates are kept in ``updates``; `script_updates`
    queues their overrides separately from `script`.

    Callbacks (`callback`, `answer`, `send_status`) sign the URL the gateway
    handed over but are delivered to ``deliver_to`` (the gateway's loopback
    base URL): the ``public_url`` prefix of the target is swapped for it.
    Without ``public_url`` the target's scheme and host are swapped.
    `form_for` gives the identity fields of a call leg for such callbacks.
    """

    create_path: str = ""  # Starlette route template of the create-call endpoint
    create_status: int = 201  # the carrier's status for a created call
    body_kind: str = "form"  # what the carrier parses: "form" or "json"
    invalid_status: int = 400  # status for a request the carrier rejects as malformed
    update_path: str = ""  # Starlette route template of the live-call update endpoint
    update_status: int = 200  # the carrier's status for an accepted update
    update_fields: frozenset[str] = frozenset()  # the parameters the update endpoint takes

    def __init__(
        self,
        *,
        public_url: str | None = None,
        deliver_to: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.public_url = public_url
        self.deliver_to = deliver_to
        self.timeout = timeout
        self.base_url: str | None = None
        self.requests: list[CarrierRequest] = []
        self.calls: list[PlacedCarrierCall] = []
        self.updates: list[CallUpdate] = []
        self.live_calls: set[str] = set()  # ids of calls the fake did not place (e.g. inbound)
        self._script: deque[FakeResponse] = deque()
        self._update_script: deque[FakeResponse] = deque()
        self._sequence: dict[str, int] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._client: httpx.Client | None = None
        self.app = Starlette(
            routes=[
                Route(self.create_path, self._create_call, methods=["POST"]),
                *self._update_routes(),
                Route("/{path:path}", self._unknown_path, methods=_ALL_METHODS),
            ]
        )

    def _update_routes(self) -> list[Route]:
        if not self.update_path:
            return []
        return [Route(self.update_path, self._update_call, methods=["POST"])]

    # -- configuration (called from the test thread) -----------------------

    def script(self, *responses: FakeResponse) -> None:
        """Queue per-request overrides, consumed by create-call requests in arrival order."""
        with self._lock:
            self._script.extend(responses)

    def script_updates(self, *responses: FakeResponse) -> None:
        """Queue overrides for live-call update requests, consumed in arrival order."""
        with self._lock:
            self._update_script.extend(responses)

    def reset(self) -> None:
        """Forget requests, calls, updates, live calls and scripts; keep credentials and URLs."""
        with self._lock:
            self._script.clear()
            self._update_script.clear()
            self.requests.clear()
            self.calls.clear()
            self.updates.clear()
            self.live_calls.clear()
            self._sequence.clear()

    def serve(self, **kwargs: Any) -> ServerThread:
        """Start the fake on a free local port and set ``base_url``; use as a context manager."""
        self._release.clear()
        server = _FakeServerThread(self, **kwargs).start()  # type: ignore[arg-type]
        self.base_url = server.url
        return server

    def close(self) -> None:
        """Close the HTTP client used for callbacks (reopened on next use)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- request handling (runs on the server thread) -----------------------

    def _record(self, request: Request, raw: bytes) -> None:
        with self._lock:
            self.requests.append(
                CarrierRequest(
                    method=request.method,
                    path=request.url.path,
                    headers=dict(request.headers),
                    form_or_json=_decode_body(raw, request.headers.get("content-type", "")),
                    received_at=time.monotonic(),
                )
            )

    async def _unknown_path(self, request: Request) -> JSONResponse:
        self._record(request, await request.body())
        return JSONResponse(
            self._error_body(404, f"no such resource: {request.url.path}"), status_code=404
        )

    def _parse(self, request: Request, raw: bytes) -> dict[str, Any]:
        # Parse the way the carrier does, regardless of what the client declared:
        # a JSON body sent to Twilio simply lacks every form field.
        content_type = request.headers.get("content-type", "")
        if self.body_kind == "json":
            if "json" not in content_type:
                raise _Invalid(f"expected a JSON body, got content-type {content_type!r}")
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                raise _Invalid(f"invalid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise _Invalid("the request body must be a JSON object")
            return body
        if "application/x-www-form-urlencoded" not in content_type:
            return {}
        return _decode_form(raw)

    async def _create_call(self, request: Request) -> JSONResponse:
        raw = await request.body()
        self._record(request, raw)
        with self._lock:
            scripted = self._script.popleft() if self._script else FakeResponse()

        if await _hold(scripted, self._release):
            return JSONResponse(self._error_body(503, "fake carrier shutting down"), status_code=503)

        if not self._authorized(request):
            return JSONResponse(self._error_body(401, "Authentication failed"), status_code=401)
        try:
            params = self._parse(request, raw)
            self._validate(params)
        except _Invalid as invalid:
            return JSONResponse(
                self._error_body(self.invalid_status, invalid.message, invalid.code),
                status_code=self.invalid_status,
            )

        failure = self._scripted_failure(scripted)
        if failure is not None:
            return failure

        call = self._place(params)
        with self._lock:
            self.calls.append(call)
            self._sequence[call.call_id] = 0
        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        content = scripted.body if scripted.body is not None else self._created_body(call)
        return JSONResponse(content, status_code=self.create_status, headers=headers)

    def _scripted_failure(self, scripted: FakeResponse) -> JSONResponse | None:
        if scripted.status < 300:
            return None
        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        content = scripted.body
        if content is None:
            content = self._error_body(scripted.status, _ERROR_DETAILS.get(scripted.status, "Error."))
        return JSONResponse(content, status_code=scripted.status, headers=headers)

    # -- live-call updates ----------------------------------------------------

    def _live_id(self, call: PlacedCarrierCall) -> str:
        """The id a placed call is addressed by once live (Plivo: its CallUUID)."""
        return call.call_id

    def _placed(self, call_id: str) -> PlacedCarrierCall | None:
        with self._lock:
            for call in self.calls:
                if self._live_id(call) == call_id:
                    return call
        return None

    def _leg(self, call_id: str) -> PlacedCarrierCall | None:
        """The placed call ``form_for`` describes for ``call_id``, if any."""
        return self._placed(call_id)

    def is_live(self, call_id: str) -> bool:
        """Whether the update endpoint knows ``call_id`` (placed here, or in ``live_calls``)."""
        with self._lock:
            if call_id in self.live_calls:
                return True
        return self._placed(call_id) is not None

    def _parse_update(self, request: Request, raw: bytes) -> dict[str, Any]:
        return self._parse(request, raw)

    async def _update_call(self, request: Request) -> JSONResponse:
        raw = await request.body()
        self._record(request, raw)
        with self._lock:
            scripted = self._update_script.popleft() if self._update_script else FakeResponse()

        if await _hold(scripted, self._release):
            return JSONResponse(self._error_body(503, "fake carrier shutting down"), status_code=503)
        if not self._authorized(request):
            return JSONResponse(self._error_body(401, "Authentication failed"), status_code=401)
        call_id = request.path_params["call_id"]
        if not self.is_live(call_id):
            return self._not_found(request)
        try:
            params = self._parse_update(request, raw)
            unknown = sorted(set(params) - self.update_fields)
            if unknown:
                raise _Invalid(f"unknown parameters {unknown}; this endpoint takes {sorted(self.update_fields)}")
            self._validate_update(params)
        except _Invalid as invalid:
            return JSONResponse(
                self._error_body(self.invalid_status, invalid.message, invalid.code),
                status_code=self.invalid_status,
            )

        failure = self._scripted_failure(scripted)
        if failure is not None:
            return failure
        params = {name: _one(params, name) for name in params}
        with self._lock:
            self.updates.append(CallUpdate(call_id, params))
        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        content = scripted.body if scripted.body is not None else self._updated_body(call_id, params)
        return JSONResponse(content, status_code=self.update_status, headers=headers)

    def _not_found(self, request: Request) -> JSONResponse:
        return JSONResponse(
            self._error_body(404, f"The requested resource {request.url.path} was not found"),
            status_code=404,
        )

    def _validate_update(self, params: dict[str, Any]) -> None:
        """Raise `_Invalid` for an update the carrier would reject."""

    def _updated_body(self, call_id: str, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # -- carrier specifics (overridden) -------------------------------------

    def _authorized(self, request: Request) -> bool:
        raise NotImplementedError

    def _validate(self, params: dict[str, Any]) -> None:
        """Raise `_Invalid` for a request the carrier would reject."""

    def _place(self, params: dict[str, Any]) -> PlacedCarrierCall:
        raise NotImplementedError

    def _created_body(self, call: PlacedCarrierCall) -> dict[str, Any]:
        raise NotImplementedError

    def _error_body(self, status: int, message: str, code: int | None = None) -> dict[str, Any]:
        return {"error": message}

    def _answer_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        raise NotImplementedError

    def _status_callback(self, call: PlacedCarrierCall, status: str) -> tuple[str | None, dict[str, str]]:
        """The URL and form of the status callback for ``status``."""
        raise NotImplementedError

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        raise NotImplementedError

    def _common_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        raise NotImplementedError

    def _unplaced_form(self, call_id: str) -> dict[str, str]:
        """Identity fields of a leg the fake did not place (an inbound call)."""
        raise NotImplementedError

    # -- acting as the carrier calling the gateway back ----------------------

    def form_for(self, call_id: str, **fields: Any) -> dict[str, str]:
        """The carrier's identity fields for the call leg ``call_id``, updated with ``fields``.

        A leg the fake placed gets its own numbers and direction; any other id
        (an inbound call, a leg a ``<Dial>`` placed) is described as an inbound
        call. ``CallStatus`` defaults to "in-progress". Feed the result to
        `callback`.
        """
        call = self._leg(call_id)
        form = self._common_form(call) if call is not None else self._unplaced_form(call_id)
        form["CallStatus"] = "in-progress"
        form.update({name: str(value) for name, value in fields.items()})
        return form

    def callback(self, url: str, form: dict[str, Any]) -> httpx.Response:
        """POST ``form`` to the gateway ``url`` as the carrier would: signed over ``url``.

        The request is delivered to ``deliver_to`` (see the class docs). Use it
        to play the carrier fetching a redirect URL, or posting a ``<Dial>``
        or ``<Gather>`` action or a conference status callback.
        """
        form = {name: str(value) for name, value in form.items()}
        signed, target = self._delivery_target(url)
        raw = _urlencode(form).encode("ascii")
        headers = {"content-type": "application/x-www-form-urlencoded"}
        headers.update(self._signature_headers(signed, form, raw))
        return self._http().post(target, content=raw, headers=headers)

    def answer(self, call: PlacedCarrierCall, **extra: Any) -> httpx.Response:
        """POST the carrier's answer webhook for ``call`` to its answer URL, signed."""
        if not call.answer_url:
            raise ValueError(f"call {call.call_id} has no answer URL")
        return self.callback(call.answer_url, {**self._answer_form(call), **extra})

    def send_status(self, call: PlacedCarrierCall, status: str, **extra: Any) -> httpx.Response:
        """POST a status callback for ``call`` the way the carrier does, signed."""
        url, form = self._status_callback(call, status)
        if not url:
            raise ValueError(f"call {call.call_id} has no callback URL for status {status!r}")
        return self.callback(url, {**form, **extra})

    def _next_sequence(self, call: PlacedCarrierCall) -> str:
        with self._lock:
            n = self._sequence.get(call.call_id, 0)
            self._sequence[call.call_id] = n + 1
        return str(n)

    def _delivery_target(self, url: str) -> tuple[str, str]:
        """(URL to sign, URL to send to)."""
        # A fragment never reaches the server (carriers read connection options
        # from it), so it is neither signed nor sent.
        signed = url.split("#", 1)[0]
        if self.deliver_to is None:
            return signed, signed
        if self.public_url:
            prefix = self.public_url.rstrip("/")
        else:
            parts = _urlsplit(signed)
            prefix = f"{parts.scheme}://{parts.netloc}"
        rest = signed[len(prefix):]
        if not signed.startswith(prefix) or rest[:1] not in ("", "/", "?"):
            raise ValueError(f"{signed!r} does not start with public_url {prefix!r}")
        return signed, self.deliver_to.rstrip("/") + rest

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                # trust_env=False: a proxy from the environment must not see loopback traffic.
                self._client = httpx.Client(timeout=self.timeout, trust_env=False)
            return self._client


class FakeTwilio(FakeCarrier):
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (form, HTTP Basic)."""

    create_path = "/2010-04-01/Accounts/{account_sid}/Calls.json"
    update_path = "/2010-04-01/Accounts/{account_sid}/Calls/{call_id}.json"
    update_fields = frozenset(
        {
            "Url",
            "Method",
            "Twiml",
            "Status",
            "FallbackUrl",
            "FallbackMethod",
            "StatusCallback",
            "StatusCallbackMethod",
            "TimeLimit",
        }
    )

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "twilio-test-auth-token",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.account_sid = account_sid
        self.auth_token = auth_token

    def _authorized(self, request: Request) -> bool:
        # The path's account must be the one whose credentials are presented.
        return (
            _basic_auth(request) == (self.account_sid, self.auth_token)
            and request.path_params.get("account_sid") == self.account_sid
        )

    def _validate(self, params: dict[str, Any]) -> None:
        if not _one(params, "To"):
            raise _Invalid("No 'To' number is specified", 21201)
        if not _one(params, "From"):
            raise _Invalid("No 'From' number is specified", 21213)
        # Twilio takes the call's instructions from one of these.
        if not any(_one(params, name) for name in ("Url", "Twiml", "ApplicationSid")):
            raise _Invalid("Url parameter is required", 21205)
        for name in ("Method", "StatusCallbackMethod"):
            if name in params and str(_one(params, name)).upper() not in _HTTP_METHODS:
                raise _Invalid(f"{name} must be GET or POST")
        events = params.get("StatusCallbackEvent", [])
        for event in events if isinstance(events, list) else [events]:
            if event not in _STATUS_EVENTS:
                raise _Invalid(f"StatusCallbackEvent {event!r} is not one of {sorted(_STATUS_EVENTS)}")
        if "Timeout" in params and not _is_int(_one(params, "Timeout")):
            raise _Invalid("Timeout must be an integer")
        if "MachineDetection" in params and _one(params, "MachineDetection") not in (
            "Enable",
            "DetectMessageEnd",
        ):
            raise _Invalid("MachineDetection must be Enable or DetectMessageEnd")

    def _place(self, params: dict[str, Any]) -> PlacedCarrierCall:
        understood = {name: _one(params, name) for name in params}
        if "StatusCallbackEvent" in params:
            events = params["StatusCallbackEvent"]
            understood["StatusCallbackEvent"] = events if isinstance(events, list) else [events]
        return PlacedCarrierCall(
            call_id="CA" + secrets.token_hex(16),
            to=understood["To"],
            from_=understood["From"],
            answer_url=understood.get("Url"),
            status_url=understood.get("StatusCallback"),
            params=understood,
        )

    def _created_body(self, call: PlacedCarrierCall) -> dict[str, Any]:
        return {
            "sid": call.call_id,
            "account_sid": self.account_sid,
            "status": "queued",
            "to": call.to,
            "from": call.from_,
            "direction": "outbound-api",
            "api_version": "2010-04-01",
        }

    def _error_body(self, status: int, message: str, code: int | None = None) -> dict[str, Any]:
        code = code or {401: 20003, 404: 20404, 429: 20429}.get(status, status)
        return {
            "code": code,
            "message": "Authenticate" if status == 401 else message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }

    def _common_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {
            "CallSid": call.call_id,
            "AccountSid": self.account_sid,
            "From": call.from_,
            "To": call.to,
            "Caller": call.from_,
            "Called": call.to,
            "Direction": "outbound-api",
            "ApiVersion": "2010-04-01",
        }

    def _answer_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {**self._common_form(call), "CallStatus": "in-progress"}

    def _status_callback(self, call: PlacedCarrierCall, status: str) -> tuple[str | None, dict[str, str]]:
        form = {
            **self._common_form(call),
            "CallStatus": status,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": self._next_sequence(call),
            "Timestamp": _rfc2822_now(),
        }
        if status in ("completed", "busy", "failed", "no-answer", "canceled"):
            form["CallDuration"] = "0"  # Twilio reports a duration on final events
        return call.status_url, form

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return {"X-Twilio-Signature": twilio_signature(self.auth_token, url, form)}

    def _validate_update(self, params: dict[str, Any]) -> None:
        _validate_texml_update(params, "Twiml")
        if "TimeLimit" in params and not _is_int(_one(params, "TimeLimit")):
            raise _Invalid("TimeLimit must be an integer")

    def _updated_body(self, call_id: str, params: dict[str, Any]) -> dict[str, Any]:
        call = self._placed(call_id)
        return {
            "sid": call_id,
            "account_sid": self.account_sid,
            "status": params.get("Status", "in-progress"),
            "to": call.to if call else None,
            "from": call.from_ if call else None,
            "direction": "outbound-api" if call else "inbound",
            "api_version": "2010-04-01",
        }

    def _unplaced_form(self, call_id: str) -> dict[str, str]:
        return twilio_inbound_form(call_id, account_sid=self.account_sid)

    def form_for(self, call_id: str, **fields: Any) -> dict[str, str]:
        form = super().form_for(call_id, **fields)
        # Twilio repeats the numbers as Caller and Called.
        for number, alias in (("From", "Caller"), ("To", "Called")):
            if number in fields and alias not in fields:
                form[alias] = form[number]
        return form


class FakeTelnyx(FakeCarrier):
    """Telnyx TeXML's ``POST /v2/texml/Accounts/{account_sid}/Calls`` (JSON, Bearer key).

    The real endpoint answers only ``from``, ``to`` and ``status``; the fake
    still mints a call_control_id ("v3:…") that its callbacks carry as CallSid.
    """

    create_path = "/v2/texml/Accounts/{account_sid}/Calls"
    create_status = 200
    body_kind = "json"
    invalid_status = 422
    update_path = "/v2/texml/Accounts/{account_sid}/Calls/{call_id}"
    update_fields = frozenset(
        {
            "Url",
            "Method",
            "Texml",
            "Status",
            "FallbackUrl",
            "FallbackMethod",
            "StatusCallback",
            "StatusCallbackMethod",
        }
    )

    def __init__(
        self,
        api_key: str = "test-telnyx-key",
        signer: TelnyxSigner | None = None,
        account_sid: str = "f5586561-8ff0-4291-a0ac-84fe544797bd",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key
        self.signer = signer or TelnyxSigner.generate()
        self.account_sid = account_sid

    def _authorized(self, request: Request) -> bool:
        return (
            request.headers.get("authorization") == f"Bearer {self.api_key}"
            and request.path_params.get("account_sid") == self.account_sid
        )

    def _validate(self, params: dict[str, Any]) -> None:
        for name in ("ApplicationSid", "To", "From"):
            if not isinstance(params.get(name), str) or not params[name]:
                raise _Invalid(f"{name} is required")
        for name in ("UrlMethod", "StatusCallbackMethod"):
            if name in params and str(params[name]).upper() not in _HTTP_METHODS:
                raise _Invalid(f"{name} must be GET or POST")
        if "StatusCallbackEvent" in params:
            events = params["StatusCallbackEvent"]
            # Telnyx wants one space-separated string, not a list.
            if not isinstance(events, str) or not set(events.split()) <= _STATUS_EVENTS:
                raise _Invalid(
                    "StatusCallbackEvent must be a space-separated string of "
                    f"{sorted(_STATUS_EVENTS)}, got {events!r}"
                )
        if "Timeout" in params:
            timeout = params["Timeout"]
            if not _is_int(timeout) or not 5 <= int(timeout) <= 120:
                raise _Invalid(f"Timeout must be an integer from 5 to 120, got {timeout!r}")
        if "MachineDetection" in params and params["MachineDetection"] not in (
            "Enable",
            "Disable",
            "DetectMessageEnd",
        ):
            raise _Invalid("MachineDetection must be Enable, Disable or DetectMessageEnd")

    def _place(self, params: dict[str, Any]) -> PlacedCarrierCall:
        return PlacedCarrierCall(
            call_id="v3:" + secrets.token_urlsafe(24),
            to=params["To"],
            from_=params["From"],
            answer_url=params.get("Url"),
            status_url=params.get("StatusCallback"),
            params=dict(params),
        )

    def _created_body(self, call: PlacedCarrierCall) -> dict[str, Any]:
        return {"from": call.from_, "to": call.to, "status": "queued"}

    def _error_body(self, status: int, message: str, code: int | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"title": _ERROR_DETAILS.get(status, "Error"), "detail": message}
        if status == 401:
            error = {"code": "10009", "title": "Authentication failed", "detail": message}
        elif status == 404:
            error = {"code": "10005", "title": "Resource not found", "detail": message}
        return {"errors": [error]}

    def _parse_update(self, request: Request, raw: bytes) -> dict[str, Any]:
        # Telnyx documents this endpoint with a form body and its SDKs send JSON;
        # either way the keys must be CamelCase (update_fields catches others).
        if "application/x-www-form-urlencoded" in request.headers.get("content-type", ""):
            return _decode_form(raw)
        return self._parse(request, raw)

    def _validate_update(self, params: dict[str, Any]) -> None:
        _validate_texml_update(params, "Texml")

    def _updated_body(self, call_id: str, params: dict[str, Any]) -> dict[str, Any]:
        call = self._placed(call_id)
        return {
            "account_sid": self.account_sid,
            "sid": call_id,
            "status": params.get("Status", "in-progress"),
            "from": call.from_ if call else None,
            "to": call.to if call else None,
            "direction": "outbound-api" if call else "inbound",
            "uri": f"/v2/texml/Accounts/{self.account_sid}/Calls/{call_id}.json",
        }

    def _unplaced_form(self, call_id: str) -> dict[str, str]:
        form = telnyx_inbound_form(call_id, account_sid=self.account_sid)
        del form["ConnectionId"]  # unknown here; pass ConnectionId=... to form_for
        return form

    def _common_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {
            "CallSid": call.call_id,
            "AccountSid": self.account_sid,
            "From": call.from_,
            "To": call.to,
            "Direction": "outbound-api",
            # The TeXML application (ApplicationSid) is the call's connection.
            "ConnectionId": call.params["ApplicationSid"],
        }

    def _answer_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {**self._common_form(call), "CallStatus": "in-progress"}

    def _status_callback(self, call: PlacedCarrierCall, status: str) -> tuple[str | None, dict[str, str]]:
        return call.status_url, {
            **self._common_form(call),
            "CallStatus": status,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": self._next_sequence(call),
            "Timestamp": _rfc2822_now(),
        }

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return self.signer.headers(raw)


class FakePlivo(FakeCarrier):
    """Plivo's ``POST /v1/Account/{auth_id}/Call/`` (JSON, HTTP Basic).

    ``PlacedCarrierCall.call_id`` is the ``request_uuid`` the API returns;
    callbacks also carry a CallUUID the fake mints (``call.call_uuid``).
    """

    create_path = "/v1/Account/{auth_id}/Call/"
    body_kind = "json"
    update_path = "/v1/Account/{auth_id}/Call/{call_id}/"
    update_status = 202
    update_fields = frozenset({"legs", "aleg_url", "aleg_method", "bleg_url", "bleg_method", "blegs"})

    # Plivo's hangup_url gets these CallStatus values.
    FINAL_STATUSES = ("completed", "busy", "failed", "timeout", "no-answer", "cancel")
    _HANGUP_CAUSES = {
        "completed": "NORMAL_CLEARING",
        "busy": "USER_BUSY",
        "failed": "CALL_REJECTED",
        "timeout": "NO_ANSWER",
        "no-answer": "NO_ANSWER",
        "cancel": "ORIGINATOR_CANCEL",
    }

    def __init__(
        self,
        auth_id: str = "MA" + "0" * 18,
        auth_token: str = "plivo-test-auth-token",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.auth_id = auth_id
        self.auth_token = auth_token

    def _authorized(self, request: Request) -> bool:
        return (
            _basic_auth(request) == (self.auth_id, self.auth_token)
            and request.path_params.get("auth_id") == self.auth_id
        )

    def _validate(self, params: dict[str, Any]) -> None:
        for name in ("from", "to", "answer_url"):
            if not isinstance(params.get(name), str) or not params[name]:
                raise _Invalid(f"{name} is required")
        for name in ("answer_method", "ring_method", "hangup_method"):
            if name in params and str(params[name]).upper() not in _HTTP_METHODS:
                raise _Invalid(f"{name} must be GET or POST")
        if "ring_timeout" in params and not _is_int(params["ring_timeout"]):
            raise _Invalid("ring_timeout must be an integer")
        if "machine_detection" in params and params["machine_detection"] not in ("true", "hangup"):
            raise _Invalid("machine_detection must be 'true' or 'hangup'")

    def _place(self, params: dict[str, Any]) -> PlacedCarrierCall:
        return PlacedCarrierCall(
            call_id=str(uuid.uuid4()),
            to=params["to"],
            from_=params["from"],
            answer_url=params["answer_url"],
            status_url=params.get("hangup_url"),
            params=dict(params),
            call_uuid=str(uuid.uuid4()),
        )

    def _created_body(self, call: PlacedCarrierCall) -> dict[str, Any]:
        return {"api_id": str(uuid.uuid4()), "message": "call fired", "request_uuid": call.call_id}

    def _error_body(self, status: int, message: str, code: int | None = None) -> dict[str, Any]:
        return {"api_id": str(uuid.uuid4()), "error": message}

    def _common_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        # Plivo reports numbers as bare digits.
        return {
            "CallUUID": call.call_uuid or "",
            "ALegUUID": call.call_uuid or "",
            "ALegRequestUUID": call.call_id,
            "RequestUUID": call.call_id,
            "From": call.from_.lstrip("+"),
            "To": call.to.lstrip("+"),
            "Direction": "outbound",
        }

    def _answer_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {**self._common_form(call), "CallStatus": "in-progress", "Event": "StartApp"}

    def _status_callback(self, call: PlacedCarrierCall, status: str) -> tuple[str | None, dict[str, str]]:
        if status == "ringing":
            return call.params.get("ring_url"), {
                **self._common_form(call),
                "CallStatus": "ringing",
                "Event": "Ring",
            }
        if status in self.FINAL_STATUSES:
            return call.status_url, {
                **self._common_form(call),
                "CallStatus": status,
                "Event": "Hangup",
                "HangupCause": self._HANGUP_CAUSES[status],
                "Duration": "0",
                "BillDuration": "0",
            }
        raise ValueError(
            f"Plivo sends no callback for status {status!r}; use 'ringing' or one of "
            f"{self.FINAL_STATUSES} (answer() covers in-progress)"
        )

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return plivo_v3_headers(self.auth_token, url, form)

    # A live Plivo call is addressed by its CallUUID, not the request_uuid.
    def _live_id(self, call: PlacedCarrierCall) -> str:
        return call.call_uuid or ""

    def _leg(self, call_id: str) -> PlacedCarrierCall | None:
        with self._lock:
            for call in self.calls:
                if call_id in (call.call_uuid, call.call_id):
                    return call
        return None

    def _update_routes(self) -> list[Route]:
        return [Route(self.update_path, self._update_or_hangup, methods=["POST", "DELETE"])]

    async def _update_or_hangup(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._update_call(request)
        # DELETE hangs the call up.
        self._record(request, await request.body())
        with self._lock:
            scripted = self._update_script.popleft() if self._update_script else FakeResponse()
        if await _hold(scripted, self._release):
            return JSONResponse(self._error_body(503, "fake carrier shutting down"), status_code=503)
        if not self._authorized(request):
            return JSONResponse(self._error_body(401, "Authentication failed"), status_code=401)
        call_id = request.path_params["call_id"]
        if not self.is_live(call_id):
            return self._not_found(request)
        failure = self._scripted_failure(scripted)
        if failure is not None:
            return failure
        with self._lock:
            self.updates.append(CallUpdate(call_id, {}, action="hangup"))
        return Response(status_code=204)

    def _not_found(self, request: Request) -> JSONResponse:
        return JSONResponse({"api_id": str(uuid.uuid4()), "error": "not found"}, status_code=404)

    def _validate_update(self, params: dict[str, Any]) -> None:
        legs = params.get("legs")
        if legs not in ("aleg", "bleg", "both"):
            raise _Invalid(f"legs must be aleg, bleg or both, got {legs!r}")
        for leg in ("aleg", "bleg"):
            if legs in (leg, "both") and not (
                isinstance(params.get(f"{leg}_url"), str) and params[f"{leg}_url"]
            ):
                raise _Invalid(f"{leg}_url is required when legs is {legs}")
            method = f"{leg}_method"
            if method in params and str(params[method]).upper() not in _HTTP_METHODS:
                raise _Invalid(f"{method} must be GET or POST")

    def _updated_body(self, call_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"api_id": str(uuid.uuid4()), "message": "call transferred"}

    def _unplaced_form(self, call_id: str) -> dict[str, str]:
        form = plivo_inbound_form(call_id)
        del form["Event"]  # not an identity field; pass Event=... to form_for
        return form

    def form_for(self, call_id: str, **fields: Any) -> dict[str, str]:
        form = super().form_for(call_id, **fields)
        for name in ("From", "To"):  # Plivo reports numbers as bare digits
            form[name] = form[name].lstrip("+")
        return form


# ---------------------------------------------------------------------------
# FakeUltravox: the serverWebSocket side
# ---------------------------------------------------------------------------

__all__ += ["FakeUltravoxSession"]

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
    sends every binary frame straight back, ``"silent"`` sends nothing) and
    its ``greeting`` (read at connect: PCM sent as 20 ms frames in real time).
    A ``ping`` is answered with ``pong``, as Ultravox does.

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
        """Send agent audio: one binary frame, or 20 ms frames in real time with ``realtime``."""
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
        """Send ``pcm`` as 20 ms frames on an absolute schedule (no drift)."""
        size = self.frame_bytes
        start = self._loop.time()
        for k, offset in enumerate(range(0, len(pcm), size)):
            delay = start + k * 0.02 - self._loop.time()
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

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._send_lock = asyncio.Lock()
        self.connected_at = time.monotonic()
        self.connected.set()
        greeting = self.fake.greeting
        if greeting:
            self._spawn(self._paced(bytes(greeting)))
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
