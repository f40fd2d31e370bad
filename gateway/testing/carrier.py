"""What the carrier test doubles share: the `FakeCarrier` base class of the fake REST APIs, what
it records (`CarrierRequest`, `PlacedCarrierCall`, `CallUpdate`) and the helpers that decode and
validate carrier requests; and `CarrierDouble`, everything a test needs to play one carrier.

Each carrier's module (`gateway.testing.twilio`, `gateway.testing.telnyx`, `gateway.testing.plivo`)
names its fake as ``FAKE_API`` and its double as ``DOUBLE``; `double` finds the latter by the
carrier's name, so a new carrier is a new module and no table is edited.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as _dt
import email.utils as _email_utils
import json
import threading
import time
import xml.etree.ElementTree as _ET
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar, Mapping, NamedTuple
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
    "CarrierDouble",
    "CarrierRequest",
    "Conference",
    "Declined",
    "Detection",
    "Dialled",
    "FakeCarrier",
    "PickUp",
    "PlacedCarrierCall",
    "WebhookRequest",
    "XmlDouble",
    "double",
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
    created_at: _dt.datetime = dataclasses.field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))


@dataclasses.dataclass(frozen=True)
class Detection:
    """The answering-machine detection a placed call asked for, as the carrier understood it."""

    report_url: str | None  # asynchronous: where the verdict goes; None: the call's instructions wait for it
    greeting_end: bool = False  # a machine is reported once its greeting has ended


WHO_ANSWERS = ("human", "machine", "fax")


@dataclasses.dataclass
class CallUpdate:
    """A live-call update the fake carrier accepted (redirect, new TwiML/XML, hang-up)."""

    call_id: str  # Twilio CallSid, Telnyx CallSid, Plivo CallUUID
    params: dict[str, Any]  # the update parameters as the carrier understood them
    action: str = "update"  # "update", or "hangup" for Plivo's DELETE
    # How the update ended the call: "completed" (hung up once answered), "canceled" (stopped before
    # it was answered), or None (it did not end it: a redirect, or a cancel of an answered call).
    ended_as: str | None = None


class _Invalid(Exception):
    """A create-call request the carrier would reject; ``code`` is carrier-specific."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


_HTTP_METHODS = ("GET", "POST")
# A call's states in the fake (`FakeCarrier.state`) while it lasts; any other word is how it ended.
LIVE_STATES = ("queued", "ringing", "in-progress")
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


def _twiml_answered_by(who: str, detection: Detection) -> str:
    """AnsweredBy as Twilio (and Telnyx TeXML) write it: with DetectMessageEnd, a machine is
    reported only once its greeting has ended (machine_end_beep), else at once (machine_start)."""
    if who == "machine":
        return "machine_end_beep" if detection.greeting_end else "machine_start"
    return who


def _twiml_detection(params: dict[str, Any]) -> Detection | None:
    """What Twilio's (and TeXML's) create-call parameters ask of answering-machine detection."""
    mode = _one(params, "MachineDetection")
    if mode in (None, "Disable"):
        return None
    asynchronous = str(_one(params, "AsyncAmd")).lower() == "true"
    return Detection(_one(params, "AsyncAmdStatusCallback") if asynchronous else None, mode == "DetectMessageEnd")


def _validate_twiml_detection(params: dict[str, Any]) -> None:
    """The AMD parameters Twilio's and Telnyx's create-call endpoints share."""
    if "AsyncAmd" in params and str(_one(params, "AsyncAmd")).lower() not in ("true", "false"):
        raise _Invalid("AsyncAmd must be true or false")
    method = _one(params, "AsyncAmdStatusCallbackMethod")
    if "AsyncAmdStatusCallbackMethod" in params and str(method).upper() not in _HTTP_METHODS:
        raise _Invalid("AsyncAmdStatusCallbackMethod must be GET or POST")


# TwiML's (and TeXML's) verbs in the neutral words of `CarrierDouble.verbs`.
_TWIML_VERBS = {
    "Say": "say",
    "Play": "play",
    "Pause": "wait",
    "Dial": "dial",
    "Connect": "connect",
    "Gather": "gather",
    "Hangup": "hangup",
    "Redirect": "redirect",
}


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
    calls the fake placed and for the ids tests add to ``live_calls``, until
    the call ends; others answer 404. Accepted updates are kept in
    ``updates``; `script_updates` queues their overrides separately from
    `script`.

    Each call has a `state`: a placed call is "queued", "ringing" once a
    ringing status was sent, "in-progress" once answered (`answer`, or an
    answered status); a call in ``live_calls`` is "in-progress". A hang-up
    (an update asking for ``Status``, Plivo's DELETE) ends it as the carrier
    would: "completed" once answered, "canceled" before; ``Status=canceled``
    leaves an answered call alone (Twilio's rule). A final status sent with
    `send_status` ends it too.

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
    account_path: str = ""  # route template of the account read `gateway check --online` makes
    list_path: str = ""  # route template of the GET that lists placed calls (filtered by To and From)

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
        self.held_requests = 0  # create-call requests that reached a FakeResponse(hold=…)
        self._states: dict[str, str] = {}  # live id -> state (see the class docs)
        self._ended_at: dict[str, _dt.datetime] = {}  # live id -> when it reached a state past LIVE_STATES
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
                *([Route(self.account_path, self._account, methods=["GET"])] if self.account_path else []),
                *([Route(self.list_path, self._list_calls, methods=["GET"])] if self.list_path else []),
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
            self.held_requests = 0
            self._states.clear()
            self._ended_at.clear()
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
        if scripted.hold is not None:  # answered as scripted once set, whether the client waited or not
            with self._lock:
                self.held_requests += 1
            while not scripted.hold.is_set() and not self._release.is_set():
                await asyncio.sleep(0.02)

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
            self._set(self._live_id(call), "queued")
        headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else None
        content = scripted.body if scripted.body is not None else self._created_body(call)
        return JSONResponse(content, status_code=self.create_status, headers=headers)

    async def _account(self, request: Request) -> JSONResponse:
        self._record(request, await request.body())
        if not self._account_authorized(request):
            return JSONResponse(self._error_body(401, "Authentication failed"), status_code=401)
        return JSONResponse(self._account_body())

    async def _recorded_unless_unauthorized(self, request: Request) -> JSONResponse | None:
        """Record a REST request; the 401 to answer when its credentials are not the account's."""
        self._record(request, await request.body())
        if not self._authorized(request):
            return JSONResponse(self._error_body(401, "Authentication failed"), status_code=401)
        return None

    async def _list_calls(self, request: Request) -> JSONResponse:
        if (refused := await self._recorded_unless_unauthorized(request)) is not None:
            return refused
        to, from_ = request.query_params.get("To"), request.query_params.get("From")
        with self._lock:
            calls = [call for call in reversed(self.calls)
                     if (to is None or call.to == to) and (from_ is None or call.from_ == from_)]
        return JSONResponse(self._listed_body(calls))

    def _listed_body(self, calls: list[PlacedCarrierCall]) -> dict[str, Any]:
        raise NotImplementedError

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

    def live_id(self, call: PlacedCarrierCall) -> str:
        """The id the carrier's callbacks, media stream and call control use for the placed ``call``."""
        return self._live_id(call)

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
        """Whether the update endpoint knows ``call_id`` (placed here, or in ``live_calls``) and it has not ended."""
        return self.state(call_id) in LIVE_STATES

    def state(self, call_id: str) -> str | None:
        """The call's state (see the class docs); None for a call the fake does not know."""
        with self._lock:
            if call_id in self._states:
                return self._states[call_id]
            if call_id in self.live_calls:
                return "in-progress"
        return None

    def set_state(self, call_id: str, state: str) -> None:
        """Put the call in ``state`` without telling the gateway (e.g. answered unbeknown to it)."""
        with self._lock:
            self._set(call_id, state)

    def _set(self, call_id: str, state: str) -> None:
        # Under the lock.
        self._states[call_id] = state
        if state not in LIVE_STATES:
            self._ended_at.setdefault(call_id, _dt.datetime.now(_dt.timezone.utc))

    def ended_at(self, call_id: str) -> _dt.datetime | None:
        """When the call ended (None: it has not, or the fake does not know it)."""
        with self._lock:
            return self._ended_at.get(call_id)

    def _end(self, call_id: str, asked: str) -> str | None:
        """A hang-up asking for ``asked`` ("completed": end the call; "canceled": stop it if not
        answered yet); how it ended the call, or None."""
        with self._lock:
            answered = self._states.get(call_id, "in-progress" if call_id in self.live_calls else None) == "in-progress"
            if asked == "canceled" and answered:
                return None
            ended = "completed" if answered else "canceled"
            self._set(call_id, ended)
            return ended

    def _reported(self, call: PlacedCarrierCall, status: str) -> None:
        """The fake told the gateway ``call`` is now ``status`` (its own word, or the neutral ones)."""
        state = {"ringing": "ringing", "answered": "in-progress", "in-progress": "in-progress"}.get(status, status)
        if status in ("initiated", "queued"):
            state = "queued"
        with self._lock:
            self._set(self._live_id(call), state)

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
        asked = params.get("Status")  # the TwiML dialect's hang-up (Twilio, Telnyx)
        ended_as = self._end(call_id, asked) if asked else None
        with self._lock:
            self.updates.append(CallUpdate(call_id, params, ended_as=ended_as))
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

    def _account_authorized(self, request: Request) -> bool:
        return self._authorized(request)

    def _account_body(self) -> dict[str, Any]:
        """What the carrier answers at ``account_path``."""
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
        self._reported(call, "in-progress")
        return self.callback(call.answer_url, {**self._answer_form(call), **extra})

    def detection(self, call: PlacedCarrierCall) -> Detection | None:
        """The answering-machine detection ``call`` asked for (None: none)."""
        return None

    def answered_by(self, call: PlacedCarrierCall, who: str) -> httpx.Response | None:
        """``who`` ("human", "machine" or "fax") picked ``call`` up, and the carrier's detection
        tells the gateway as it does for the detection the call asked for (each fake says how:
        its report URL, the answer webhook, a status callback). Returns the gateway's answer to the
        last request that makes (None: the carrier tells nothing, as Plivo for a person)."""
        if who not in WHO_ANSWERS:
            raise ValueError(f"who must be one of {WHO_ANSWERS}, got {who!r}")
        detection = self.detection(call)
        if detection is None:
            raise ValueError(f"call {call.call_id} asked for no answering-machine detection")
        return self._tell_detection(call, detection, who)

    def _tell_detection(self, call: PlacedCarrierCall, detection: Detection, who: str) -> httpx.Response | None:
        raise NotImplementedError(f"{type(self).__name__} detects no answering machines")

    def send_status(self, call: PlacedCarrierCall, status: str, **extra: Any) -> httpx.Response:
        """POST a status callback for ``call`` the way the carrier does, signed."""
        url, form = self._status_callback(call, status)
        if not url:
            raise ValueError(f"call {call.call_id} has no callback URL for status {status!r}")
        self._reported(call, status)
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


# ---------------------------------------------------------------------------
# Carrier doubles: one per carrier module, found by the carrier's name
# ---------------------------------------------------------------------------


class WebhookRequest(NamedTuple):
    """An HTTP request a carrier sends the gateway (`CarrierDouble.inbound_request`)."""

    method: str  # "POST" or "GET"
    headers: dict[str, str]  # content type and signature headers
    body: bytes  # empty for a GET
    query: str  # the query string to request (without "?")


class Dialled(NamedTuple):
    """The dial instruction of an answer (`CarrierDouble.dialled`)."""

    number: str  # E.164 (or a SIP URI), whatever the carrier's spelling
    action: str | None  # the URL that hears how the dial ended
    timeout: int | None  # seconds the phone rings


class Declined(NamedTuple):
    """An answer that connects nothing: the gateway's apology or rejection (`CarrierDouble.declined`)."""

    message: str  # what the caller is to hear
    dials: str | None  # the number the call goes on to (E.164), if any


class Conference(NamedTuple):
    """The conference an answer joins (`CarrierDouble.conference`)."""

    name: str
    starts: bool | None  # this leg entering starts the conference (None: not said)
    ends: bool | None  # this leg leaving ends it (None: not said)
    wait_url: str | None  # what others hear until it starts
    action: str | None  # the URL that hears when this leg leaves it


@dataclasses.dataclass(frozen=True)
class PickUp:
    """What the callee answering a call the gateway placed led to (`CarrierDouble.pick_up`).

    For a carrier with an answer URL, ``answer`` is the gateway's answer to the answer webhook
    and ``stream_url`` is the stream it connects to; for a carrier that dials into the stream
    (``dials_into_stream``) there is no answer and ``stream_url`` is the one given at dial time.
    """

    double: "CarrierDouble"
    answer: httpx.Response | None
    dialled_stream_url: str | None = None

    @property
    def stream_url(self) -> str:
        """Where the carrier streams the call's audio now; ValueError if the answer connects nothing."""
        if self.answer is None:
            if not self.dialled_stream_url:
                raise ValueError("the call was neither answered with a stream nor dialled into one")
            return self.dialled_stream_url
        return self.double.connected_url(self.answer.text)[0]

    @property
    def stream_parameters(self) -> dict[str, str]:
        """The parameters the stream starts with (Twilio's <Parameter>s)."""
        return self.double.stream_parameters(self.answer.text) if self.answer is not None else {}


class CarrierDouble(ABC):
    """Everything a test needs to play one carrier against the gateway, in the carrier's own words.

    One instance per carrier module, ``gateway.testing.<carrier>.DOUBLE``, found by `double`.
    It holds (or generates) the test credentials, configures the gateway for them, builds and
    signs the carrier's webhooks, reads the gateway's answers, and makes the fake REST API and
    media stream speak for the carrier. Members marked "(transfers)" are needed only by carriers
    that can move a live call (``can_transfer``).
    """

    name: ClassVar[str]  # the carrier's name in gateway.carriers.CARRIERS, its URLs and its config section
    call_id_param: ClassVar[str]  # the inbound webhook's call-id field
    own_number: ClassVar[str]  # an E.164 number the test config lists for it under [outbound.numbers]
    webhook_method: ClassVar[str] = "POST"  # "POST": the form is a urlencoded body; "GET": it is the query
    callback_method: ClassVar[str] = "POST"  # the same, for its callbacks (status, answer, transfer steps)
    signs_url: ClassVar[bool] = True  # its webhook signature covers the URL
    signs_form: ClassVar[bool] = True  # its webhook signature covers the fields: a changed field is refused
    unauthenticated_status: ClassVar[int] = 403  # the gateway's status for a webhook failing its check
    answer_media_types: ClassVar[tuple[str, ...]] = ("text/xml", "application/xml")  # its answers' Content-Types
    declined_status: ClassVar[int] = 200  # the status of an answer that connects nothing (see `declined`)
    stream_attributes: ClassVar[Mapping[str, str]] = {}  # what its connect answer's stream carries besides the URL
    hangs_up_through_api: ClassVar[bool] = True  # the gateway ends its calls by REST (False: by closing the stream)
    dial_status_param: ClassVar[str | None] = None  # (transfers) the dial action callback's outcome field
    digits_param: ClassVar[str] = "Digits"  # (transfers) the field with the keys pressed at a prompt

    # -- configuring the gateway ----------------------------------------------------------

    @abstractmethod
    def environ(self, api_base_url: str) -> dict[str, str]:
        """The environment variables configuring the gateway with these credentials and this REST API."""

    def config_toml(self) -> str:
        """TOML the carrier needs beyond the environment ("" if none)."""
        return ""

    @abstractmethod
    def fake_api(self, **kwargs: Any) -> FakeCarrier:
        """A new fake REST API of the carrier with these credentials (``kwargs`` go to `FakeCarrier`)."""

    def for_session(self) -> "CarrierDouble":
        """A double of the same carrier with credentials made up now (``gateway demo``'s); a carrier
        whose double does not say keeps its fixed test credentials."""
        return self

    def simulate_arguments(self) -> list[str]:
        """What ``gateway simulate`` needs beyond the configuration to sign as this carrier."""
        return []

    # -- the media stream ---------------------------------------------------------------

    @property
    def stream_rate(self) -> int:
        """Hz of its bridge-mode media stream."""
        return self._stream_dialect().rate

    @property
    def stream_url_takes_query(self) -> bool:
        """Whether its stream URLs may carry a query (else the socket's credentials are stream parameters)."""
        return self._stream_dialect().url_takes_query

    @property
    def stream_lossless(self) -> bool:
        """Whether its media stream carries linear PCM (audio crosses it bit-exact)."""
        return self._stream_dialect().lossless

    def stream_headers(self, url: str) -> dict[str, str] | None:
        """The headers the carrier sends opening the media socket written as ``url`` (None: nothing special)."""
        return None

    def _stream_dialect(self):
        from .stream import _stream_dialect

        return _stream_dialect(self.name)

    # -- webhooks the carrier sends ----------------------------------------------------------

    @abstractmethod
    def inbound_form(self, *, to: str, from_: str = "+15551230001", **fields: str) -> dict[str, str]:
        """The fields of the carrier's webhook for a ringing inbound call from ``from_`` to ``to``."""

    @abstractmethod
    def sign(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        """The signature headers the carrier sends with ``form`` (``raw``: the body) to ``url``."""

    def inbound_request(
        self, public_url: str, path: str, form: dict[str, str], *, body: bytes | None = None, signed: bool = True
    ) -> WebhookRequest:
        """The request the carrier sends to ``path`` (may hold a query) of a gateway at ``public_url``.

        ``body`` replaces the encoded form as the body (POST carriers); ``signed=False`` leaves
        the signature out.
        """
        path, _, query = path.partition("?")
        method = self.webhook_method if path.endswith("/inbound") else self.callback_method
        if method == "GET":
            query = "&".join(part for part in (query, _urlencode(form)) if part)
            raw, headers = b"", {}
        else:
            raw = body if body is not None else _urlencode(form).encode("ascii")
            headers = {"content-type": "application/x-www-form-urlencoded"}
        if signed:
            url = public_url.rstrip("/") + path + (f"?{query}" if query else "")
            headers.update(self.sign(url, form, raw))
        return WebhookRequest(method, headers, raw, query)

    @abstractmethod
    def status_fields(self, status: str, duration: int | None = None) -> dict[str, str]:
        """The fields of a status callback reporting ``status`` (the carrier's word) and ``duration`` s."""

    # -- the gateway's answers ----------------------------------------------------------

    @abstractmethod
    def connected_url(self, answer_text: str) -> tuple[str, dict[str, str]]:
        """The stream URL an answer connects the call to, and the stream's other attributes."""

    def stream_parameters(self, answer_text: str) -> dict[str, str]:
        """The parameters an answer gives its stream, which the carrier sends in the start message."""
        return {}

    @abstractmethod
    def spoken(self, answer_text: str) -> list[str]:
        """The texts an answer speaks, in order."""

    @abstractmethod
    def verbs(self, answer_text: str) -> list[str]:
        """An answer's instructions in neutral words: say, play, wait, dial, connect, conference, gather, hangup."""

    @abstractmethod
    def dialled(self, answer_text: str) -> Dialled:
        """The number an answer dials, with its action URL and ring timeout."""

    @abstractmethod
    def declined(self, answer_text: str) -> Declined:
        """The message (and fallback number) of an apology or rejection; ValueError for another answer."""

    # -- outbound calls ---------------------------------------------------------------

    def pick_up(self, fake: FakeCarrier, placed: PlacedCarrierCall, **fields: Any) -> PickUp:
        """The callee answering ``placed``: here the fake posts the answer webhook (``fields`` added)."""
        return PickUp(self, fake.answer(placed, **fields))

    # -- transfers (carriers that can_transfer) -----------------------------------------------

    def redirect_url(self, update: CallUpdate) -> str | None:
        """(transfers) The URL a live-call update told the call to fetch next, if any."""
        raise NotImplementedError(f"{self.name} cannot move a live call")

    def conference(self, answer_text: str) -> Conference:
        """(transfers) The conference an answer joins."""
        raise NotImplementedError(f"{self.name} has no conferences")

    def gather(self, answer_text: str) -> tuple[str, str]:
        """(transfers) The prompt of an answer asking for a key press, and the URL the keys go to."""
        raise NotImplementedError(f"{self.name} asks for no key presses")


class XmlDouble(CarrierDouble):
    """A carrier answering in XML under ``<Response>`` (TwiML, TeXML, Plivo XML): where things sit."""

    verb_words: ClassVar[Mapping[str, str]] = {}  # XML element -> neutral verb (others: lower-cased)
    stream_path: ClassVar[str] = "Connect/Stream"  # the stream element of a connect answer
    stream_url_attribute: ClassVar[str | None] = "url"  # None: the URL is the element's text
    dial_targets: ClassVar[tuple[str, ...]] = ("Number", "Sip")  # elements of a dial naming whom it rings
    conference_path: ClassVar[str] = "Dial/Conference"
    conference_wait_attribute: ClassVar[str] = "waitUrl"
    gather_path: ClassVar[str] = "Gather"

    @staticmethod
    def _root(answer_text: str) -> _ET.Element:
        root = _ET.fromstring(answer_text)
        if root.tag != "Response":
            raise ValueError(f"not an XML answer: {answer_text}")
        return root

    def _find(self, answer_text: str, path: str) -> _ET.Element:
        element = self._root(answer_text).find(path)
        if element is None:
            raise ValueError(f"no {path} in the answer: {answer_text}")
        return element

    def stream_parameters(self, answer_text: str) -> dict[str, str]:
        stream = self._find(answer_text, self.stream_path)
        return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}

    def connected_url(self, answer_text: str) -> tuple[str, dict[str, str]]:
        stream = self._find(answer_text, self.stream_path)
        attributes = dict(stream.attrib)
        url = stream.text if self.stream_url_attribute is None else attributes.pop(self.stream_url_attribute, None)
        if not url:
            raise ValueError(f"the stream of the answer names no URL: {answer_text}")
        return url.strip(), attributes

    def spoken(self, answer_text: str) -> list[str]:
        return [el.text or "" for el in self._root(answer_text) if self.verb_words.get(el.tag) == "say"]

    def verbs(self, answer_text: str) -> list[str]:
        return [self.verb_words.get(el.tag, el.tag.lower()) for el in self._root(answer_text)]

    def _number(self, spelled: str) -> str:
        """E.164 (or the SIP URI) for a number as the carrier's XML spells it."""
        return spelled

    def dialled(self, answer_text: str) -> Dialled:
        dial = self._find(answer_text, "Dial")
        target = next((dial.findtext(tag) for tag in self.dial_targets if dial.find(tag) is not None), None)
        target = (target if target is not None else dial.text or "").strip()
        if not target:
            raise ValueError(f"the dial rings nobody: {answer_text}")
        timeout = dial.get("timeout")
        return Dialled(self._number(target), dial.get("action"), int(timeout) if timeout else None)

    def declined(self, answer_text: str) -> Declined:
        # Say the message, maybe dial a person, and hang up: nothing else.
        verbs = self.verbs(answer_text)
        if verbs not in (["say", "hangup"], ["say", "dial", "hangup"]):
            raise ValueError(f"not an apology or a rejection (say, perhaps dial, hang up): {answer_text}")
        (message,) = self.spoken(answer_text)
        return Declined(message, self.dialled(answer_text).number if "dial" in verbs else None)

    def conference(self, answer_text: str) -> Conference:
        element = self._find(answer_text, self.conference_path)
        # The action sits on the outermost element of the path (TwiML: the <Dial> around it).
        holder = self._find(answer_text, self.conference_path.split("/")[0])

        def flag(name: str) -> bool | None:
            value = element.get(name)
            return None if value is None else value.lower() == "true"

        return Conference(
            (element.text or "").strip(),
            flag("startConferenceOnEnter"),
            flag("endConferenceOnExit"),
            element.get(self.conference_wait_attribute),
            holder.get("action"),
        )

    def gather(self, answer_text: str) -> tuple[str, str]:
        element = self._find(answer_text, self.gather_path)
        action = element.get("action")
        if not action:
            raise ValueError(f"the key-press prompt has no action URL: {answer_text}")
        return "".join(element.itertext()), action


def double(name: str) -> CarrierDouble:
    """The test double of carrier ``name``: ``gateway.testing.<name>.DOUBLE``; ValueError if none."""
    from .stream import carrier_member

    return carrier_member(name, "DOUBLE", CarrierDouble)
