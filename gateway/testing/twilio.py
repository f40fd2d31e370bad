"""Twilio, faked: its REST API (`FakeTwilio`), its webhook signature (`twilio_signature`),
its inbound voice webhook (`twilio_inbound_form`), its Media Streams (`twilio_stream_headers`
and the stream dialect `CarrierStream` uses for ``"twilio"``) and the double the tests play
Twilio with (`TwilioDouble`).
"""

from __future__ import annotations

import dataclasses
import email.utils
import secrets
from typing import Any

import httpx
from starlette.requests import Request

from .carrier import (
    _HTTP_METHODS,
    _STATUS_EVENTS,
    _TWIML_VERBS,
    CallUpdate,
    Detection,
    FakeCarrier,
    PlacedCarrierCall,
    XmlDouble,
    _basic_auth,
    _Invalid,
    _is_int,
    _one,
    _rfc2822_now,
    _twiml_answered_by,
    _twiml_detection,
    _validate_texml_update,
    _validate_twiml_detection,
)
from .stream import StreamDialect, _b64, audioop

__all__ = ["FakeTwilio", "SharedKeySigning", "TwilioDouble", "twilio_inbound_form", "twilio_signature",
           "twilio_stream_headers"]


# ---------------------------------------------------------------------------
# Webhook signature
# ---------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: dict[str, str], algorithm: str | None = None) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a form POST to ``url`` (``algorithm``:
    HMAC_SHA1 by default, or HMAC_SHA256; ``auth_token``: or a SharedKey's secret)."""
    from twilio.request_validator import RequestValidator

    return RequestValidator(auth_token).compute_signature(url, params, algorithm)


@dataclasses.dataclass(frozen=True)
class SharedKeySigning:
    """Twilio signing a URL's webhooks with a Webhooks SharedKey (a Webhook Rule's Setting) instead
    of the auth token: the secret and the algorithm it hashes with, named in a settings header."""

    secret: str
    algorithm: str = "HMAC_SHA256"
    key_id: str = "webhooks_sharedkey_01" + "0" * 24

    def headers(self, url: str, params: dict[str, str]) -> dict[str, str]:
        return {
            "X-Twilio-Signature": twilio_signature(self.secret, url, params, self.algorithm),
            "X-Twilio-Webhooks-Signature-Settings": f"key={self.key_id},algorithm={self.algorithm}",
        }


# ---------------------------------------------------------------------------
# Inbound webhook form
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


# ---------------------------------------------------------------------------
# Fake REST API
# ---------------------------------------------------------------------------


class FakeTwilio(FakeCarrier):
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (form, HTTP Basic)."""

    create_path = "/2010-04-01/Accounts/{account_sid}/Calls.json"
    update_path = "/2010-04-01/Accounts/{account_sid}/Calls/{call_id}.json"
    account_path = "/2010-04-01/Accounts/{account_sid}.json"  # Twilio's "Fetch an Account resource"
    list_path = create_path  # "Read multiple Call resources" (GET), To and From filters
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
        # Set by a test: the callbacks are signed with a Webhooks SharedKey, not the auth token.
        self.shared_key: SharedKeySigning | None = None

    def reset(self) -> None:
        super().reset()
        self.shared_key = None

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
        _validate_twiml_detection(params)

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

    def _account_body(self) -> dict[str, Any]:
        return {"sid": self.account_sid, "friendly_name": "Fake Twilio account", "status": "active", "type": "Full"}

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

    def _listed_body(self, calls: list[PlacedCarrierCall]) -> dict[str, Any]:
        return {"calls": [{**self._created_body(call), "status": self.state(self._live_id(call)) or "queued",
                           "date_created": email.utils.format_datetime(call.created_at, usegmt=True)}
                          for call in calls], "page": 0, "page_size": 50}

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

    def detection(self, call: PlacedCarrierCall) -> Detection | None:
        return _twiml_detection(call.params)

    def _tell_detection(self, call: PlacedCarrierCall, detection: Detection, who: str) -> httpx.Response | None:
        """Asynchronous (AsyncAmd): AnsweredBy to AsyncAmdStatusCallback, the call going on meanwhile.
        Synchronous: the answer webhook waits for the verdict and carries AnsweredBy (Twilio's
        answering-machine detection docs)."""
        answered_by = _twiml_answered_by(who, detection)
        if detection.report_url is None:
            return self.answer(call, AnsweredBy=answered_by)
        return self.callback(detection.report_url, {
            "CallSid": call.call_id, "AccountSid": self.account_sid, "AnsweredBy": answered_by,
            "MachineDetectionDuration": "2100",
        })

    def _signature_headers(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        if self.shared_key is not None:
            return self.shared_key.headers(url, form)
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
            "status": self.state(call_id),  # after the update (a cancel may have left it going)
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


# ---------------------------------------------------------------------------
# Media stream
# ---------------------------------------------------------------------------


def twilio_stream_headers(auth_token: str, url: str) -> dict[str, str]:
    """The ``X-Twilio-Signature`` header Twilio sends when it opens a media stream.

    Twilio signs the ``wss://`` URL it connects to (the TwiML's, which takes no
    query string) with no POST parameters.
    """
    from twilio.request_validator import RequestValidator

    return {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(url, {})}


class _Twilio(StreamDialect):
    name = "twilio"
    rate = 8000
    lossless = False  # mu-law
    url_takes_query = False  # "The url does not support query string parameters" (<Stream> docs)

    def new_stream_id(self) -> str:
        return "MZ" + secrets.token_hex(16)

    def new_account_id(self) -> str:
        return "AC" + secrets.token_hex(16)

    def encode(self, pcm16: bytes) -> bytes:
        return audioop.lin2ulaw(pcm16, 2)

    def opening(self, s, custom, extra):
        start = {
            "accountSid": s.account_id,
            "streamSid": s.stream_id,
            "callSid": s.call_id,
            "tracks": ["inbound"],
            "customParameters": dict(custom),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            **extra,
        }
        return [
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            {"event": "start", "sequenceNumber": s._next_seq(), "start": start, "streamSid": s.stream_id},
        ]

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequenceNumber": s._next_seq(),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(position_ms),
                "payload": _b64(payload),
            },
            "streamSid": s.stream_id,
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "streamSid": s.stream_id,
            "sequenceNumber": s._next_seq(),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequenceNumber": s._next_seq(),
            "stop": {"accountSid": s.account_id, "callSid": s.call_id},
            "streamSid": s.stream_id,
        }

    def mark_ack(self, s, name):
        return {
            "event": "mark",
            "sequenceNumber": s._next_seq(),
            "streamSid": s.stream_id,
            "mark": {"name": name},
        }

    def _stream_errors(self, s, message):
        if message.get("streamSid") != s.stream_id:
            return [f"{message.get('event')}: streamSid {message.get('streamSid')!r} is not {s.stream_id!r}"]
        return []

    def check(self, s, message):
        errors = self._stream_errors(s, message)
        if message.get("event") == "mark" and not isinstance(self.mark_name(message), str):
            errors.append("mark: mark.name missing")
        return errors

    def decode(self, s, message):
        errors = self._stream_errors(s, message)
        raw, error = self.payload(message)
        if raw is None:
            return b"", errors + [f"media: {error}"]
        return audioop.ulaw2lin(raw, 2), errors


# ---------------------------------------------------------------------------
# The double
# ---------------------------------------------------------------------------


class TwilioDouble(XmlDouble):
    """Twilio for the tests: an account SID and auth token, TwiML answers, signed form webhooks."""

    name = "twilio"
    call_id_param = "CallSid"
    own_number = "+15550001111"
    dial_status_param = "DialCallStatus"
    verb_words = _TWIML_VERBS

    def __init__(self, account_sid: str = "AC" + "0" * 32, auth_token: str = "twilio-test-auth-token") -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token

    def environ(self, api_base_url: str) -> dict[str, str]:
        return {
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "TWILIO_API_BASE_URL": api_base_url,
        }

    def fake_api(self, **kwargs: Any) -> FakeTwilio:
        return FakeTwilio(self.account_sid, self.auth_token, **kwargs)

    def for_session(self) -> "TwilioDouble":
        return TwilioDouble("AC" + secrets.token_hex(16), secrets.token_hex(16))

    def inbound_form(self, *, to: str, from_: str = "+15551230001", **fields: str) -> dict[str, str]:
        return twilio_inbound_form(from_=from_, to=to, account_sid=self.account_sid, **fields)

    def sign(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return {"X-Twilio-Signature": twilio_signature(self.auth_token, url, form)}

    def status_fields(self, status: str, duration: int | None = None) -> dict[str, str]:
        fields = {"CallStatus": status}
        if duration is not None:
            fields["CallDuration"] = str(duration)
        return fields

    def stream_headers(self, url: str) -> dict[str, str]:
        return twilio_stream_headers(self.auth_token, url)

    def redirect_url(self, update: CallUpdate) -> str | None:
        return update.params.get("Url")


# ---------------------------------------------------------------------------
# Found by the carrier's name: gateway.testing.<carrier>.STREAM_DIALECT, .FAKE_API and .DOUBLE
# ---------------------------------------------------------------------------


STREAM_DIALECT = _Twilio()
FAKE_API = FakeTwilio
DOUBLE = TwilioDouble()
