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
import importlib.resources
import json
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Iterator

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
