"""Exotel, faked: its Calls/connect REST API (`FakeExotel`), the request its Voicebot applet sends
to a dynamic URL (`exotel_inbound_params`, with the Basic credentials of the configured URL) and
its bidirectional stream (the dialect `CarrierStream` uses for ``"exotel"``).

Written from Exotel's docs (developer.exotel.com AgentStream, the exotel/Agent-Stream repository),
independently of gateway.carriers.exotel, so the tests check the gateway rather than mirror it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .carrier import (
    LIVE_STATES,
    CarrierDouble,
    Declined,
    Dialled,
    FakeCarrier,
    PickUp,
    PlacedCarrierCall,
    _basic_auth,
    _Invalid,
    _one,
)
from .stream import StreamDialect, _b64

__all__ = ["ExotelDouble", "FakeExotel", "exotel_basic_auth", "exotel_inbound_params"]

# Exotel's StreamUrl limit, and its rule for audio sent back: multiples of 320 bytes.
MAX_STREAM_URL = 600
CHUNK_MULTIPLE = 320
# Call details write times without a zone, in the account's (IST here: Exotel's docs do not say
# which [unverified]).
CALL_TIMES = _dt.timezone(_dt.timedelta(hours=5, minutes=30))
EXOTEL_TIME = "%Y-%m-%d %H:%M:%S"


def exotel_basic_auth(username: str, password: str) -> dict[str, str]:
    """The header Exotel sends for credentials written into the configured URL (user:pass@host)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def _written(number: str) -> str:
    """Indian numbers as Exotel writes them (0 + national number); others as given."""
    return "0" + number[3:] if number.startswith("+91") else number


def exotel_inbound_params(call_sid: str | None = None, from_: str = "+919876543210", to: str = "+918047491899",
                          **extra: str) -> dict[str, str]:
    """The query of Exotel's request to a Voicebot applet's dynamic URL (as its Connect applet's)."""
    params = {
        "CallSid": call_sid or secrets.token_hex(16),
        "CallFrom": _written(from_),
        "CallTo": _written(to),
        "Direction": "incoming",
        "Created": _dt.datetime.now(_dt.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S"),
        "CustomField": "",
    }
    params.update(extra)
    return params


def _same_number(wanted: str | None, number: str) -> bool:
    """A filter's number (E.164, as Exotel documents its filters, or as Exotel writes numbers) is
    `number`; no filter matches any."""
    if wanted is None:
        return True
    return {wanted, _written(wanted)} & {number, _written(number)} != set()


def _created_range(text: str | None) -> tuple[_dt.datetime | None, _dt.datetime | None]:
    """DateCreated's "gte:…;lte:…" (times in the account's zone) as aware datetimes."""
    earliest = latest = None
    for part in (text or "").split(";") if text else []:
        operator, _, moment = part.partition(":")
        parsed = _dt.datetime.strptime(moment, EXOTEL_TIME).replace(tzinfo=CALL_TIMES)
        if operator == "gte":
            earliest = parsed
        elif operator == "lte":
            latest = parsed
        else:
            raise ValueError(f"DateCreated takes gte and lte, not {operator!r}")
    return earliest, latest


class FakeExotel(FakeCarrier):
    """Exotel's ``POST /v1/Accounts/{sid}/Calls/connect.json`` (form, HTTP Basic key:token).

    A placed call's ``params["StreamUrl"]`` is where Exotel streams once the callee answers;
    `stream_url(call)` gives it. Status callbacks are form POSTs with CallSid, Status, EventType.
    Exotel has no live-call update API: nothing answers an update.
    """

    create_path = "/v1/Accounts/{account_sid}/Calls/connect.json"
    account_path = "/v1/Accounts/{account_sid}/ActiveStreams"  # Exotel's Active Stream Monitoring
    # Bulk Call Details: "will not provide ongoing calls' details", so ended calls only; filtered by
    # From (the number called first: the callee), PhoneNumber (the ExoPhone), Direction and
    # DateCreated ("gte:2019-01-01 00:00:00;lte:2019-01-31 23:59:59"), newest first, PageSize up to 100.
    list_path = "/v1/Accounts/{account_sid}/Calls.json"
    create_status = 200
    body_kind = "form"
    EVENTS = frozenset({"ringing", "answered", "terminal"})
    FINAL_STATUSES = ("completed", "busy", "no-answer", "failed")

    def __init__(self, account_sid: str = "exotel-test-account", api_key: str = "exotel-key",
                 api_token: str = "exotel-token", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.account_sid = account_sid
        self.api_key = api_key
        self.api_token = api_token

    def _authorized(self, request: Request) -> bool:
        return (_basic_auth(request) == (self.api_key, self.api_token)
                and request.path_params.get("account_sid") == self.account_sid)

    def _validate(self, params: dict[str, Any]) -> None:
        for name in ("From", "CallerId", "StreamUrl"):
            if not _one(params, name):
                raise _Invalid(f"{name} is required", 34001)
        stream_url = str(_one(params, "StreamUrl"))
        if not stream_url.startswith(("ws://", "wss://")) or len(stream_url) >= MAX_STREAM_URL:
            raise _Invalid(f"StreamUrl must be a ws(s) URL under {MAX_STREAM_URL} characters", 34002)
        if _one(params, "StreamType") != "bidirectional":
            raise _Invalid("StreamType must be bidirectional for a voice bot", 34003)
        events = params.get("StatusCallbackEvents[]", [])
        events = events if isinstance(events, list) else [events]
        if set(events) - self.EVENTS:
            raise _Invalid(f"StatusCallbackEvents[] takes {sorted(self.EVENTS)}", 34004)
        for name in ("From", "CallerId"):
            if not str(_one(params, name)).lstrip("+").isdigit():
                raise _Invalid(f"{name} must be a phone number", 34005)

    def _place(self, params: dict[str, Any]) -> PlacedCarrierCall:
        return PlacedCarrierCall(
            call_id=secrets.token_hex(16),
            to=str(_one(params, "From")),  # Exotel's From is the number called
            from_=str(_one(params, "CallerId")),
            answer_url=None,
            status_url=_one(params, "StatusCallback"),
            params=dict(params),
        )

    def _created_body(self, call: PlacedCarrierCall) -> dict[str, Any]:
        return {"Call": {
            "Sid": call.call_id, "Status": "in-progress", "From": call.to, "PhoneNumberSid": call.from_,
            "Direction": "outbound-api", "DateCreated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "RecordingUrl": None,
        }}

    def _error_body(self, status: int, message: str, code: int | None = None) -> dict[str, Any]:
        return {"RestException": {"Status": status, "Message": message, "Code": code}}

    async def _list_calls(self, request: Request) -> JSONResponse:
        if (refused := await self._recorded_unless_unauthorized(request)) is not None:
            return refused
        query = request.query_params
        try:
            page_size = int(query.get("PageSize", 50))
            earliest, latest = _created_range(query.get("DateCreated"))
        except ValueError as error:
            return JSONResponse(self._error_body(400, str(error)), status_code=400)
        if not 0 < page_size <= 100:
            return JSONResponse(self._error_body(400, "PageSize must be 1 to 100"), status_code=400)
        with self._lock:
            calls = list(self.calls)
        listed = [call for call in calls if self.state(call.call_id) not in LIVE_STATES
                  and _same_number(query.get("From"), call.to) and _same_number(query.get("PhoneNumber"), call.from_)
                  and query.get("Direction") in (None, "outbound-api")
                  and (earliest is None or call.created_at >= earliest) and (latest is None or call.created_at <= latest)]
        listed.sort(key=lambda call: call.created_at, reverse=query.get("SortBy") != "DateCreated:asc")
        path = f"/v1/Accounts/{self.account_sid}/Calls.json"
        return JSONResponse({
            "Metadata": {"Total": len(listed), "PageSize": page_size, "FirstPageUri": path, "PrevPageUri": None,
                         "NextPageUri": None},
            "Calls": [self._call_details(call) for call in listed[:page_size]],
        })

    def _call_details(self, call: PlacedCarrierCall) -> dict[str, Any]:
        ended = self.ended_at(call.call_id) or call.created_at
        return {
            "Sid": call.call_id, "ParentCallSid": None, "AccountSid": self.account_sid,
            "DateCreated": call.created_at.astimezone(CALL_TIMES).strftime(EXOTEL_TIME),
            "DateUpdated": ended.astimezone(CALL_TIMES).strftime(EXOTEL_TIME),
            "To": _written(call.from_), "From": _written(call.to), "PhoneNumberSid": _written(call.from_),
            "Status": self.state(call.call_id), "StartTime": call.created_at.astimezone(CALL_TIMES).strftime(EXOTEL_TIME),
            "EndTime": ended.astimezone(CALL_TIMES).strftime(EXOTEL_TIME), "Duration": "0", "Price": "0.000",
            "Direction": "outbound-api", "AnsweredBy": None, "RecordingUrl": None,
        }

    def _account_body(self) -> dict[str, Any]:
        live = sum(1 for call in self.calls if self.is_live(call.call_id))
        return {"status": "success", "active_streams": live, "max_allowed_streams": 10, "account_sid": self.account_sid}

    def _common_form(self, call: PlacedCarrierCall) -> dict[str, str]:
        return {"CallSid": call.call_id, "From": call.to, "To": call.from_, "Direction": "outbound-api"}

    def _unplaced_form(self, call_id: str) -> dict[str, str]:
        return {"CallSid": call_id, "Direction": "incoming"}

    def _status_callback(self, call: PlacedCarrierCall, status: str) -> tuple[str | None, dict[str, str]]:
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        form = {**self._common_form(call), "DateUpdated": now}
        if status == "ringing":
            return call.status_url, {**form, "EventType": "ringing", "Status": "ringing"}
        if status in ("answered", "in-progress"):
            return call.status_url, {**form, "EventType": "answered", "Status": "in-progress"}
        if status in self.FINAL_STATUSES:
            return call.status_url, {**form, "EventType": "terminal", "Status": status,
                                     "ConversationDuration": "0", "RecordingUrl": ""}
        raise ValueError(f"Exotel reports ringing, answered or one of {self.FINAL_STATUSES}, not {status!r}")

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return {}  # Exotel signs nothing

    @staticmethod
    def stream_url(call: PlacedCarrierCall) -> str:
        """Where Exotel streams the call's audio once the callee answers."""
        return str(_one(call.params, "StreamUrl"))


# ---------------------------------------------------------------------------
# The bidirectional stream (Voicebot applet / Calls/connect)
# ---------------------------------------------------------------------------


class _Exotel(StreamDialect):
    name = "exotel"
    rate = 8000
    # Exotel's docs say nothing of marks pending at a clear; played as Twilio's protocol, which
    # Exotel's follows, does: the clear returns them.
    clear_acks_marks = True

    def seq(self, n: int) -> Any:
        return n

    def encode(self, pcm16: bytes) -> bytes:
        return pcm16  # 16-bit little-endian PCM

    def opening(self, s, custom, extra):
        start = {
            "stream_sid": s.stream_id, "call_sid": s.call_id, "account_sid": s.account_id,
            "from": "09876543210", "to": "08047491899", "custom_parameters": dict(custom),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(self.rate), "bit_rate": "16"},
        }
        start.update(extra)
        return [{"event": "connected"},
                {"event": "start", "sequence_number": s._next_seq(), "stream_sid": s.stream_id, "start": start}]

    def media(self, s, payload, chunk, position_ms):
        return {"event": "media", "sequence_number": s._next_seq(), "stream_sid": s.stream_id,
                "media": {"chunk": chunk, "timestamp": str(position_ms), "payload": _b64(payload)}}

    def dtmf(self, s, digit):
        return {"event": "dtmf", "sequence_number": s._next_seq(), "stream_sid": s.stream_id,
                "dtmf": {"digit": digit, "duration": "200"}}

    def stop(self, s):
        return {"event": "stop", "sequence_number": s._next_seq(), "stream_sid": s.stream_id,
                "stop": {"call_sid": s.call_id, "account_sid": s.account_id, "reason": "callended"}}

    def mark_ack(self, s, name):
        return {"event": "mark", "sequence_number": s._next_seq(), "stream_sid": s.stream_id, "mark": {"name": name}}

    def check(self, s, message):
        if message.get("stream_sid") != s.stream_id:
            return [f"{message.get('event')}: stream_sid missing or wrong"]
        return []

    def decode(self, s, message):
        errors = self.check(s, message)
        raw, error = self.payload(message)
        if raw is None:
            return b"", errors + [f"media: {error}"]
        if len(raw) % CHUNK_MULTIPLE:
            errors.append(f"media: {len(raw)} bytes is not a multiple of {CHUNK_MULTIPLE} (Exotel plays a gap)")
        return raw, errors


# ---------------------------------------------------------------------------
# The double: Exotel as the tests play it
# ---------------------------------------------------------------------------


class ExotelDouble(CarrierDouble):
    """Exotel for the tests: Basic credentials in the Voicebot URL, JSON answers, GET webhooks,
    Calls/connect dialling straight into the stream."""

    name = "exotel"
    call_id_param = "CallSid"
    own_number = "+918047491899"  # an ExoPhone
    webhook_method = "GET"
    signs_url = False  # Basic credentials prove the sender, not the request
    signs_form = False
    unauthenticated_status = 401
    answer_media_types = ("application/json",)
    declined_status = 503  # the Voicebot applet fails and the flow's next applet runs
    hangs_up_through_api = False  # closing the stream ends the call

    def __init__(self, account_sid: str = "exotel-test-account", api_key: str = "exotel-test-key",
                 api_token: str = "exotel-test-token", webhook_username: str = "exotel-hook",
                 webhook_password: str = "exotel-hook-password") -> None:
        self.account_sid, self.api_key, self.api_token = account_sid, api_key, api_token
        self.webhook_username, self.webhook_password = webhook_username, webhook_password

    def environ(self, api_base_url: str) -> dict[str, str]:
        return {
            "EXOTEL_ACCOUNT_SID": self.account_sid,
            "EXOTEL_API_KEY": self.api_key,
            "EXOTEL_API_TOKEN": self.api_token,
            "EXOTEL_API_BASE_URL": api_base_url,
            "EXOTEL_WEBHOOK_USERNAME": self.webhook_username,
            "EXOTEL_WEBHOOK_PASSWORD": self.webhook_password,
        }

    def fake_api(self, **kwargs: Any) -> FakeExotel:
        return FakeExotel(self.account_sid, self.api_key, self.api_token, **kwargs)

    def for_session(self) -> "ExotelDouble":
        return ExotelDouble("demo" + secrets.token_hex(6), secrets.token_hex(20), secrets.token_hex(20),
                            "exotel-" + secrets.token_hex(4), secrets.token_urlsafe(24))

    def inbound_form(self, *, to: str, from_: str = "+15551230001", **fields: str) -> dict[str, str]:
        return exotel_inbound_params(from_=from_, to=to, **fields)

    def sign(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return exotel_basic_auth(self.webhook_username, self.webhook_password)

    def status_fields(self, status: str, duration: int | None = None) -> dict[str, str]:
        fields = {"Status": status, "EventType": "terminal" if status in FakeExotel.FINAL_STATUSES else status}
        if duration is not None:
            fields["ConversationDuration"] = str(duration)
        return fields

    def connected_url(self, answer_text: str) -> tuple[str, dict[str, str]]:
        answer = json.loads(answer_text)
        if not isinstance(answer.get("url"), str) or not answer["url"]:
            raise ValueError(f"the answer names no stream URL: {answer_text}")
        return answer["url"], {key: value for key, value in answer.items() if key != "url"}

    def spoken(self, answer_text: str) -> list[str]:
        return []  # Exotel's dynamic URL cannot make the call speak

    def verbs(self, answer_text: str) -> list[str]:
        return ["connect"] if "url" in json.loads(answer_text) else []

    def dialled(self, answer_text: str) -> Dialled:
        raise ValueError("an Exotel answer dials nobody")

    def declined(self, answer_text: str) -> Declined:
        answer = json.loads(answer_text)
        if "url" in answer or not isinstance(answer.get("error"), str):
            raise ValueError(f"not an apology or a rejection (no url, an error): {answer_text}")
        return Declined(answer["error"], answer.get("fallback_number"))

    def pick_up(self, fake: FakeCarrier, placed: PlacedCarrierCall, **fields: Any) -> PickUp:
        """The callee answers: Exotel reports it and streams to the URL it was given at dial time."""
        fake.send_status(placed, "answered", **fields)
        return PickUp(self, None, FakeExotel.stream_url(placed))


# ---------------------------------------------------------------------------
# Found by the carrier's name: gateway.testing.<carrier>.STREAM_DIALECT, .FAKE_API and .DOUBLE
# ---------------------------------------------------------------------------


STREAM_DIALECT = _Exotel()
FAKE_API = FakeExotel
DOUBLE = ExotelDouble()
