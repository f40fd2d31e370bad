"""What the fake carrier REST APIs share: the `FakeCarrier` base class, what it records
(`CarrierRequest`, `PlacedCarrierCall`, `CallUpdate`) and the helpers that decode and
validate carrier requests.

Each carrier's fake is a subclass in the carrier's own module (`gateway.testing.twilio`,
`gateway.testing.telnyx`, `gateway.testing.plivo`), named there as ``FAKE_API``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import email.utils as _email_utils
import json
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qsl as _parse_qsl
from urllib.parse import urlencode as _urlencode
from urllib.parse import urlsplit as _urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .server import ServerThread
from .ultravox import _ALL_METHODS, _ERROR_DETAILS, FakeResponse, _FakeServerThread, _hold

__all__ = [
    "CallUpdate",
    "CarrierRequest",
    "FakeCarrier",
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
