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
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = [
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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
_validators: dict[tuple[bool, bool], Any] = {}  # (agent, strict) -> validator


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


def _validator(agent: bool, strict: bool) -> Any:
    key = (agent, strict)
    with _schema_lock:
        if key not in _validators:
            from openapi_schema_validator import OAS30WriteValidator
            from referencing import Registry
            from referencing.jsonschema import DRAFT4

            doc = _load_schema_doc()
            if strict:
                doc = copy.deepcopy(doc)
                for schema in doc["components"]["schemas"].values():
                    _close_objects(schema)
            # OpenAPI 3.0 schemas are draft-4 flavoured; register the whole
            # document so "#/components/schemas/..." refs resolve inside it.
            registry = Registry().with_resource(_SCHEMA_URI, DRAFT4.create_resource(doc))
            root = {"$ref": f"{_SCHEMA_URI}#/components/schemas/{_SCHEMA_NAMES[agent]}"}
            _validators[key] = OAS30WriteValidator(
                root,
                registry=registry,
                format_checker=OAS30WriteValidator.FORMAT_CHECKER,
            )
        return _validators[key]


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
    validator = _validator(agent, strict)
    errors = sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
    messages = [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors
    ]
    if strict:
        messages.extend(_extra_rules(body))
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
_ERROR_DETAILS = {
    429: "Request was throttled.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


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


class FakeUltravox:
    """A fake of Ultravox's ``POST /api/calls`` and ``POST /api/agents/{id}/calls``.

    Requests are checked for ``X-API-Key`` and validated against the OpenAPI
    schema (unless ``validate=False``); every request is recorded. The n-th
    request (whatever its outcome) consumes the n-th `FakeResponse` queued with
    `script`; a 401 or 400 takes precedence over the scripted status.
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
        self._clients: set[tuple[Any, ...]] = set()
        self.requests: list[RecordedRequest] = []
        self.schema_errors: list[str] = []
        self.calls_created = 0
        self.app = Starlette(
            routes=[
                Route("/api/calls", self._start_call, methods=["POST"]),
                Route("/api/agents/{agent_id}/calls", self._start_call, methods=["POST"]),
            ],
            middleware=[Middleware(_ConnectionCounter, fake=self)],
        )

    # -- configuration (called from the test thread) -----------------------

    def script(self, *responses: FakeResponse) -> None:
        """Queue per-request overrides, consumed in arrival order."""
        with self._lock:
            self._script.extend(responses)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._clients.clear()
            self.requests.clear()
            self.schema_errors.clear()
            self.calls_created = 0
            self.delay = 0.0

    @property
    def connections_seen(self) -> int:
        with self._lock:
            return len(self._clients)

    def serve(self, **kwargs: Any) -> ServerThread:
        """Start the fake on a free local port; use the result as a context manager."""
        self._release.clear()
        return _FakeServerThread(self, **kwargs).start()

    # -- request handling (runs on the server thread) -----------------------

    async def _start_call(self, request: Request) -> JSONResponse:
        agent_id = request.path_params.get("agent_id")
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
                )
            )
            scripted = self._script.popleft() if self._script else FakeResponse()

        await asyncio.sleep(self.delay + scripted.delay)
        if scripted.hang:
            # Polls so that stopping the server can release the request.
            deadline = time.monotonic() + _HANG_SECONDS
            while not self._release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return JSONResponse({"detail": "fake Ultravox shutting down"}, status_code=503)

        if request.headers.get("x-api-key") != self.api_key:
            return JSONResponse(
                {"detail": "Authentication credentials were not provided or are invalid."},
                status_code=401,
            )
        if agent_id is not None and not _is_uuid(agent_id):
            return JSONResponse({"detail": f"agent id {agent_id!r} is not a UUID"}, status_code=400)

        if parse_error:
            errors = [parse_error]
        elif self.validate:
            errors = validate_ultravox_request(body, agent=agent_id is not None, strict=self.strict)
        else:
            errors = []
        if errors:
            with self._lock:
                self.schema_errors.extend(errors)
            return JSONResponse({"detail": "; ".join(errors)}, status_code=400)

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
            return JSONResponse(scripted.body, status_code=201, headers=headers)
        return JSONResponse(
            self._call_json(body, agent_id, n, scripted.omit_join_url),
            status_code=201,
            headers=headers,
        )

    @staticmethod
    def _call_json(
        body: dict[str, Any], agent_id: str | None, n: int, omit_join_url: bool
    ) -> dict[str, Any]:
        call_id = str(uuid.uuid4())
        call: dict[str, Any] = {
            "callId": call_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        }
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


class _Invalid(Exception):
    """A create-call request the carrier would reject; ``code`` is carrier-specific."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


_HTTP_METHODS = ("GET", "POST")
_STATUS_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


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


class FakeCarrier:
    """Shared machinery of the fake carrier REST APIs.

    Subclasses state the create-call route, how the carrier authenticates,
    validates and answers, and what its callbacks look like. The n-th
    create-call request consumes the n-th `FakeResponse` queued with `script`
    (a scripted status below 300 means success, answered with the carrier's own
    success status); a 401 or a validation error takes precedence over the
    scripted status, as in `FakeUltravox`. Every request, to any path, is
    recorded in ``requests``; unknown paths answer 404.

    Callbacks (`answer`, `send_status`) sign the URL the gateway handed over
    but are delivered to ``deliver_to`` (the gateway's loopback base URL): the
    ``public_url`` prefix of the target is swapped for it. Without
    ``public_url`` the target's scheme and host are swapped.
    """

    create_path: str = ""  # Starlette route template of the create-call endpoint
    create_status: int = 201  # the carrier's status for a created call
    body_kind: str = "form"  # what the carrier parses: "form" or "json"
    invalid_status: int = 400  # status for a request the carrier rejects as malformed

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
        self._script: deque[FakeResponse] = deque()
        self._sequence: dict[str, int] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._client: httpx.Client | None = None
        self.app = Starlette(
            routes=[
                Route(self.create_path, self._create_call, methods=["POST"]),
                Route("/{path:path}", self._unknown_path, methods=_ALL_METHODS),
            ]
        )

    # -- configuration (called from the test thread) -----------------------

    def script(self, *responses: FakeResponse) -> None:
        """Queue per-request overrides, consumed by create-call requests in arrival order."""
        with self._lock:
            self._script.extend(responses)

    def reset(self) -> None:
        """Forget requests, calls and the script; keep credentials and URLs."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.calls.clear()
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

        await asyncio.sleep(scripted.delay)
        if scripted.hang:
            # Polls so that stopping the server can release the request.
            deadline = time.monotonic() + _HANG_SECONDS
            while not self._release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
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

        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        if scripted.status >= 300:
            content = scripted.body
            if content is None:
                content = self._error_body(
                    scripted.status, _ERROR_DETAILS.get(scripted.status, "Error.")
                )
            return JSONResponse(content, status_code=scripted.status, headers=headers)

        call = self._place(params)
        with self._lock:
            self.calls.append(call)
            self._sequence[call.call_id] = 0
        content = scripted.body if scripted.body is not None else self._created_body(call)
        return JSONResponse(content, status_code=self.create_status, headers=headers)

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

    # -- acting as the carrier calling the gateway back ----------------------

    def answer(self, call: PlacedCarrierCall, **extra: Any) -> httpx.Response:
        """POST the carrier's answer webhook for ``call`` to its answer URL, signed."""
        if not call.answer_url:
            raise ValueError(f"call {call.call_id} has no answer URL")
        return self._deliver(call.answer_url, {**self._answer_form(call), **extra})

    def send_status(self, call: PlacedCarrierCall, status: str, **extra: Any) -> httpx.Response:
        """POST a status callback for ``call`` the way the carrier does, signed."""
        url, form = self._status_callback(call, status)
        if not url:
            raise ValueError(f"call {call.call_id} has no callback URL for status {status!r}")
        return self._deliver(url, {**form, **extra})

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

    def _deliver(self, url: str, form: dict[str, Any]) -> httpx.Response:
        form = {name: str(value) for name, value in form.items()}
        signed, target = self._delivery_target(url)
        raw = _urlencode(form).encode("ascii")
        headers = {"content-type": "application/x-www-form-urlencoded"}
        headers.update(self._signature_headers(signed, form, raw))
        return self._http().post(target, content=raw, headers=headers)

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                # trust_env=False: a proxy from the environment must not see loopback traffic.
                self._client = httpx.Client(timeout=self.timeout, trust_env=False)
            return self._client


class FakeTwilio(FakeCarrier):
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (form, HTTP Basic)."""

    create_path = "/2010-04-01/Accounts/{account_sid}/Calls.json"

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


class FakeTelnyx(FakeCarrier):
    """Telnyx TeXML's ``POST /v2/texml/Accounts/{account_sid}/Calls`` (JSON, Bearer key).

    The real endpoint answers only ``from``, ``to`` and ``status``; the fake
    still mints a call_control_id ("v3:…") that its callbacks carry as CallSid.
    """

    create_path = "/v2/texml/Accounts/{account_sid}/Calls"
    create_status = 200
    body_kind = "json"
    invalid_status = 422

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
        return {"errors": [error]}

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
