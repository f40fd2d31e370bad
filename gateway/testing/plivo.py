"""Plivo, faked: its REST API (`FakePlivo`), its V3 webhook signature (`plivo_v3_headers`),
its answer webhook for an inbound call (`plivo_inbound_form`), its audio streams (the stream
dialect `CarrierStream` uses for ``"plivo"``) and the double the tests play Plivo with
(`PlivoDouble`).
"""

from __future__ import annotations

import datetime as _dt
import secrets
import string
import time
import uuid
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .carrier import (
    _HTTP_METHODS,
    CallUpdate,
    Detection,
    LIVE_STATES,
    FakeCarrier,
    PlacedCarrierCall,
    XmlDouble,
    _basic_auth,
    _Invalid,
    _is_int,
)
from .stream import StreamDialect, _b64, audioop
from .ultravox import FakeResponse, _hold

__all__ = ["FakePlivo", "PlivoDouble", "plivo_inbound_form", "plivo_v3_headers"]


# ---------------------------------------------------------------------------
# Webhook signature
# ---------------------------------------------------------------------------


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
# Inbound webhook form
# ---------------------------------------------------------------------------


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
# Fake REST API
# ---------------------------------------------------------------------------


class FakePlivo(FakeCarrier):
    """Plivo's ``POST /v1/Account/{auth_id}/Call/`` (JSON, HTTP Basic).

    ``PlacedCarrierCall.call_id`` is the ``request_uuid`` the API returns;
    callbacks also carry a CallUUID the fake mints (``call.call_uuid``).
    """

    create_path = "/v1/Account/{auth_id}/Call/"
    body_kind = "json"
    update_path = "/v1/Account/{auth_id}/Call/{call_id}/"
    account_path = "/v1/Account/{auth_id}/"  # "Retrieve account details"
    update_status = 202
    update_fields = frozenset({"legs", "aleg_url", "aleg_method", "bleg_url", "bleg_method", "blegs"})
    # GET: "Retrieve all queued calls" (?status=queued: request_uuids, no filters), "Retrieve all
    # live calls" (?status=live: CallUUIDs; call_direction, from_number, to_number) or, without a
    # status, "Retrieve details of all calls" (the records of ended calls, filtered likewise and by
    # end_time). GET of one call (update_path) retrieves it the same three ways.
    list_path = create_path
    MAX_LIMIT = 20  # "The maximum number of results that you can fetch with a single API call is 20"
    # The record of an ended call, by how it ended: hangup cause code and name (Plivo's list of
    # hangup causes; the callee-side codes are [unverified]).
    _ENDED_CAUSES = {
        "completed": (4000, "Normal Hangup", "Callee"),
        "busy": (3010, "Busy Line", "Callee"),
        "no-answer": (3000, "No Answer", "Callee"),
        "timeout": (3000, "No Answer", "Callee"),
        "failed": (2010, "Destination Out Of Service", "Carrier"),
        "cancel": (1000, "Canceled", "API Request"),
        "canceled": (1000, "Canceled", "API Request"),
    }

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
        if "machine_detection_method" in params and str(params["machine_detection_method"]).upper() not in _HTTP_METHODS:
            raise _Invalid("machine_detection_method must be GET or POST")

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

    def _account_body(self) -> dict[str, Any]:
        return {"api_id": str(uuid.uuid4()), "auth_id": self.auth_id, "name": "Fake Plivo account",
                "account_type": "standard", "cash_credits": "10.00"}

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

    def detection(self, call: PlacedCarrierCall) -> Detection | None:
        if call.params.get("machine_detection") not in ("true", "hangup"):
            return None
        return Detection(call.params.get("machine_detection_url"))  # Plivo tells no end of a greeting

    def _tell_detection(self, call: PlacedCarrierCall, detection: Detection, who: str) -> httpx.Response | None:
        """With machine_detection_url: a machine (a fax too: Plivo tells no fax) is reported there,
        Machine=true, the XML running meanwhile; a person is never reported (Plivo's asynchronous
        machine detection page). Without one the XML waits: a person's answer_url is fetched after
        the analysis; a machine, with machine_detection=hangup, is hung up by Plivo and its
        hangup_url says Machine=true (Plivo support: the types of machine detection)."""
        if detection.report_url is not None:
            if who == "human":
                return None
            return self.callback(detection.report_url, {
                **self._common_form(call), "Machine": "true", "IfMachine": "continue",
                "Event": "MachineDetection", "CallStatus": "in-progress",
            })
        if who == "human":
            return self.answer(call)
        if call.params.get("machine_detection") == "hangup":
            self.set_state(self._live_id(call), "completed")  # Plivo hangs the machine up itself
            return self.send_status(call, "completed", Machine="true")
        return self.answer(call, Machine="true")

    # -- the call lists ------------------------------------------------------

    async def _list_calls(self, request: Request) -> JSONResponse:
        if (refused := await self._recorded_unless_unauthorized(request)) is not None:
            return refused
        query = request.query_params
        try:
            limit = int(query.get("limit", self.MAX_LIMIT))
            offset = int(query.get("offset", 0))
        except ValueError:
            return JSONResponse(self._error_body(400, "limit and offset must be integers"), status_code=400)
        if not 0 < limit <= self.MAX_LIMIT or offset < 0:
            return JSONResponse(self._error_body(400, f"limit must be 1 to {self.MAX_LIMIT}"), status_code=400)
        status = query.get("status")
        with self._lock:
            calls = list(reversed(self.calls))  # newest first
        if status == "queued":
            ids = [call.call_id for call in calls if self.state(self._live_id(call)) == "queued"]
            return JSONResponse({"api_id": str(uuid.uuid4()), "calls": ids[offset:offset + limit]})
        calls = [call for call in calls if self._filtered_in(call, query)]
        if status == "live":
            ids = [call.call_uuid or "" for call in calls if self.state(self._live_id(call)) in ("ringing", "in-progress")]
            return JSONResponse({"api_id": str(uuid.uuid4()), "calls": ids[offset:offset + limit]})
        if status is not None:
            return JSONResponse(self._error_body(400, "status must be live or queued"), status_code=400)
        since = _utc_or_none(query.get("end_time__gte"))
        ended = [call for call in calls if self.state(self._live_id(call)) not in LIVE_STATES
                 and (since is None or (self.ended_at(self._live_id(call)) or since) >= since)]
        page = ended[offset:offset + limit]
        more = offset + limit < len(ended)
        path = f"/v1/Account/{self.auth_id}/Call/"
        return JSONResponse({
            "api_id": str(uuid.uuid4()),
            "meta": {"limit": limit, "offset": offset, "total_count": len(ended), "previous": None,
                     "next": f"{path}?limit={limit}&offset={offset + limit}" if more else None},
            "objects": [self._call_record(call) for call in page],
        })

    @staticmethod
    def _filtered_in(call: PlacedCarrierCall, query: Any) -> bool:
        """The live list's and the call records' filters: direction, and numbers by exact value or prefix."""
        if query.get("call_direction") not in (None, "outbound"):
            return False
        for name, number in (("from_number", call.from_), ("to_number", call.to)):
            wanted = query.get(name)
            if wanted is not None and not number.lstrip("+").startswith(wanted.lstrip("+")):
                return False
        return True

    def _call_record(self, call: PlacedCarrierCall) -> dict[str, Any]:
        """"Retrieve a call": the record of an ended call, times in the account's zone with their offset."""
        state = self.state(self._live_id(call)) or "completed"
        code, cause, source = self._ENDED_CAUSES.get(state, (4000, "Normal Hangup", "Callee"))
        ended = self.ended_at(self._live_id(call)) or call.created_at
        answered = state == "completed"
        duration = max(int((ended - call.created_at).total_seconds()), 0)
        return {
            "answer_time": _plivo_time(call.created_at) if answered else None,
            "api_id": str(uuid.uuid4()), "bill_duration": duration if answered else 0,
            "billed_duration": 60 if answered else 0, "call_direction": "outbound", "call_duration": duration,
            "call_uuid": call.call_uuid, "end_time": _plivo_time(ended), "from_number": "+" + call.from_.lstrip("+"),
            "hangup_cause_code": code, "hangup_cause_name": cause, "hangup_source": source,
            "initiation_time": _plivo_time(call.created_at), "parent_call_uuid": None,
            "resource_uri": f"/v1/Account/{self.auth_id}/Call/{call.call_uuid}/", "to_number": call.to.lstrip("+"),
            "total_amount": "0.00850" if answered else "0.00000", "total_rate": "0.00850",
        }

    async def _retrieve(self, request: Request) -> JSONResponse:
        if (refused := await self._recorded_unless_unauthorized(request)) is not None:
            return refused
        call_id = request.path_params["call_id"]
        status = request.query_params.get("status")
        with self._lock:
            placed = list(self.calls)
        for call in placed:
            state = self.state(self._live_id(call))
            if status == "queued" and call.call_id == call_id and state == "queued":
                return JSONResponse({"api_id": str(uuid.uuid4()), "call_status": "queued", "direction": "outbound",
                                     "from": call.from_.lstrip("+"), "request_uuid": call.call_id,
                                     "to": call.to.lstrip("+"), "caller_name": ""})
            if status == "live" and call.call_uuid == call_id and state in ("ringing", "in-progress"):
                # As Plivo's own example writes them: "from" with its "+", "to" without.
                return JSONResponse({"api_id": str(uuid.uuid4()), "call_status": state, "call_uuid": call.call_uuid,
                                     "caller_name": "", "direction": "outbound", "from": "+" + call.from_.lstrip("+"),
                                     "request_uuid": call.call_id, "to": call.to.lstrip("+"),
                                     "session_start": call.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")})
            if status is None and call.call_uuid == call_id and state not in LIVE_STATES:
                return JSONResponse(self._call_record(call))
        return self._not_found(request)

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
        return [Route(self.update_path, self._update_or_hangup, methods=["GET", "POST", "DELETE"])]

    async def _update_or_hangup(self, request: Request) -> Response:
        if request.method == "GET":
            return await self._retrieve(request)
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
        ended_as = self._end(call_id, "completed")  # Plivo's DELETE also cancels a call not answered yet
        with self._lock:
            self.updates.append(CallUpdate(call_id, {}, action="hangup", ended_as=ended_as))
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


def _plivo_time(moment: _dt.datetime) -> str:
    """A call record's time: "2015-07-26 15:44:49+05:30" (here in UTC)."""
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat(sep=" ")


def _utc_or_none(text: str | None) -> _dt.datetime | None:
    """A filter's time, "YYYY-MM-DD HH:MM[:ss[.uuuuuu]]" in UTC."""
    if not text:
        return None
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


# ---------------------------------------------------------------------------
# Media stream
# ---------------------------------------------------------------------------


class _Plivo(StreamDialect):
    name = "plivo"
    rate = 16000
    audio_events = frozenset({"playAudio"})
    clear_events = frozenset({"clearAudio"})
    mark_events = frozenset({"checkpoint"})
    clear_acks_marks = False  # cleared checkpoints are never answered
    mark_ack_event = "playedStream"
    clear_ack_event = "clearedAudio"
    content_types = {"audio/x-l16": (8000, 16000), "audio/x-mulaw": (8000,)}

    def new_account_id(self) -> str:
        alphabet = string.ascii_uppercase + string.digits
        return "MA" + "".join(secrets.choice(alphabet) for _ in range(18))

    def prepare(self, s, custom):
        # Plivo hands the stream's extra headers back on every message, as "k=v;k=v".
        s.state["extra_headers"] = ";".join(f"{k}={v}" for k, v in custom.items())

    def seq(self, n: int) -> Any:
        return n  # Plivo's sequence numbers and chunks are numbers; its timestamp a string

    def encode(self, pcm16: bytes) -> bytes:
        return pcm16  # audio/x-l16 is little-endian

    def opening(self, s, custom, extra):
        start = {
            "callId": s.call_id,
            "streamId": s.stream_id,
            "accountId": s.account_id,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000},
        }
        message: dict[str, Any] = {"event": "start", "sequenceNumber": s._next_seq(), "start": start}
        if custom:
            start["customParameters"] = dict(custom)
        message.update(self._extra(s))
        start.update(extra)
        return [message]

    def _extra(self, s) -> dict[str, Any]:
        extra_headers = s.state.get("extra_headers")
        return {"extra_headers": extra_headers} if extra_headers else {}

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "media": {
                "track": "inbound",
                "timestamp": str(int(time.time() * 1000)),
                "chunk": chunk,
                "payload": _b64(payload),
            },
            **self._extra(s),
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "dtmf": {"digit": digit, "track": "inbound"},
            **self._extra(s),
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "stop": {"callId": s.call_id, "streamId": s.stream_id, "reason": "Stream ended"},
        }

    def mark_ack(self, s, name):
        return {
            "event": self.mark_ack_event,
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "name": name,
        }

    def clear_ack(self, s):
        return {"sequenceNumber": s._next_seq(), "event": self.clear_ack_event, "streamId": s.stream_id}

    def mark_name(self, message):
        return message.get("name")

    def check(self, s, message):
        if message.get("event") == "checkpoint" and not isinstance(message.get("name"), str):
            return ["checkpoint: name missing"]
        return []

    def decode(self, s, message):
        media = message.get("media")
        if not isinstance(media, dict):
            return b"", ["playAudio: media missing"]
        content_type, rate = media.get("contentType"), media.get("sampleRate")
        if rate not in self.content_types.get(content_type, ()):
            return b"", [f"playAudio: unsupported contentType/sampleRate {content_type!r}/{rate!r}"]
        raw, error = self.payload(message)
        if raw is None:
            return b"", [f"playAudio: {error}"]
        errors = []
        first = s.state.setdefault("agent_format", (content_type, rate))
        if first != (content_type, rate):
            errors.append(f"playAudio: switched format from {first} to {(content_type, rate)}")
            s.state["agent_format"] = (content_type, rate)
        if (content_type, rate) != ("audio/x-l16", self.rate):
            errors.append(
                f"playAudio: {content_type};rate={rate} differs from the stream's "
                f"audio/x-l16;rate={self.rate}"
            )
        if content_type == "audio/x-mulaw":
            pcm = audioop.ulaw2lin(raw, 2)
        else:
            if len(raw) % 2:
                errors.append(f"playAudio: L16 payload of odd length {len(raw)}")
                raw = raw[:-1]
            pcm = raw
        if rate != self.rate:
            pcm, s.state["resample"] = audioop.ratecv(pcm, 2, 1, rate, self.rate, s.state.get("resample"))
        return pcm, errors


# ---------------------------------------------------------------------------
# The double
# ---------------------------------------------------------------------------


class PlivoDouble(XmlDouble):
    """Plivo for the tests: an auth ID and token, Plivo XML answers, V3-signed form webhooks."""

    name = "plivo"
    call_id_param = "CallUUID"
    own_number = "+15550004444"
    dial_status_param = "DialStatus"
    stream_attributes = {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "contentType": "audio/x-l16;rate=16000",
    }
    verb_words = {
        "Speak": "say",
        "Play": "play",
        "Wait": "wait",
        "Dial": "dial",
        "Stream": "connect",
        "Conference": "conference",
        "GetDigits": "gather",
        "Hangup": "hangup",
        "Redirect": "redirect",
    }
    stream_path = "Stream"
    stream_url_attribute = None  # <Stream>wss://…</Stream>
    dial_targets = ("Number", "User")
    conference_path = "Conference"
    conference_wait_attribute = "waitSound"
    gather_path = "GetDigits"

    def __init__(self, auth_id: str = "MA" + "0" * 18, auth_token: str = "plivo-test-auth-token") -> None:
        self.auth_id = auth_id
        self.auth_token = auth_token

    def environ(self, api_base_url: str) -> dict[str, str]:
        return {
            "PLIVO_AUTH_ID": self.auth_id,
            "PLIVO_AUTH_TOKEN": self.auth_token,
            "PLIVO_API_BASE_URL": api_base_url,
        }

    def fake_api(self, **kwargs: Any) -> FakePlivo:
        return FakePlivo(self.auth_id, self.auth_token, **kwargs)

    def for_session(self) -> "PlivoDouble":
        alphabet = string.ascii_uppercase + string.digits
        return PlivoDouble("MA" + "".join(secrets.choice(alphabet) for _ in range(18)), secrets.token_urlsafe(30))

    def inbound_form(self, *, to: str, from_: str = "+15551230001", **fields: str) -> dict[str, str]:
        return plivo_inbound_form(from_=from_, to=to, **fields)

    def sign(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return plivo_v3_headers(self.auth_token, url, form)

    def status_fields(self, status: str, duration: int | None = None) -> dict[str, str]:
        fields = {"CallStatus": status}
        if duration is not None:
            fields["Duration"] = str(duration)
        return fields

    def _number(self, spelled: str) -> str:
        return "+" + spelled if spelled.isdigit() else spelled  # Plivo XML writes bare digits

    def redirect_url(self, update: CallUpdate) -> str | None:
        return update.params.get("aleg_url")


# ---------------------------------------------------------------------------
# Found by the carrier's name: gateway.testing.<carrier>.STREAM_DIALECT, .FAKE_API and .DOUBLE
# ---------------------------------------------------------------------------


STREAM_DIALECT = _Plivo()
FAKE_API = FakePlivo
DOUBLE = PlivoDouble()
