"""Telnyx, faked: its TeXML REST API (`FakeTelnyx`), its webhook signature (`TelnyxSigner`),
its inbound TeXML webhook (`telnyx_inbound_form`), its media streaming (the stream dialect
`CarrierStream` uses for ``"telnyx"``) and the double the tests play Telnyx with (`TelnyxDouble`).
"""

from __future__ import annotations

import base64
import email.utils
import secrets
import time
import uuid
from typing import Any

import httpx
import numpy as np
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
    _decode_form,
    _Invalid,
    _is_int,
    _rfc2822_now,
    _twiml_answered_by,
    _twiml_detection,
    _validate_texml_update,
    _validate_twiml_detection,
)
from .stream import StreamDialect, _b64, audioop
from .ultravox import _ERROR_DETAILS

__all__ = ["FakeTelnyx", "TelnyxDouble", "TelnyxSigner", "telnyx_inbound_form"]


# ---------------------------------------------------------------------------
# Webhook signature
# ---------------------------------------------------------------------------


class TelnyxSigner:
    """Signs webhook bodies the way Telnyx does (ed25519 over ``"{ts}|{body}"``)."""

    def __init__(self, private_key: Any) -> None:
        self.private_key = private_key

    @classmethod
    def generate(cls) -> "TelnyxSigner":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def private_key_b64(self) -> str:
        """The raw private key, base64 (what ``gateway simulate --private-key`` takes)."""
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode("ascii")

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


# ---------------------------------------------------------------------------
# Inbound webhook form
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Fake REST API
# ---------------------------------------------------------------------------


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
    list_path = create_path  # TeXML's "Fetch multiple call resources" (GET), To and From filters
    account_path = "/v2/balance"  # "Get user balance details": Telnyx's own first authentication check
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
        if "AsyncAmd" in params and not isinstance(params["AsyncAmd"], bool):
            raise _Invalid("AsyncAmd must be a boolean")  # the JSON body's type (the SDK's call_calls_params)
        _validate_twiml_detection(params)

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

    def _listed_body(self, calls: list[PlacedCarrierCall]) -> dict[str, Any]:
        path = f"/v2/texml/Accounts/{self.account_sid}/Calls.json"
        listed = []
        for call in calls:
            ended = self.ended_at(self._live_id(call))
            listed.append({
                "account_sid": self.account_sid, "answered_by": None, "caller_name": call.from_,
                "date_created": email.utils.format_datetime(call.created_at),  # "Thu, 15 Jun 2023 09:56:45 +0000"
                "date_updated": email.utils.format_datetime(ended or call.created_at),
                "direction": "outbound", "duration": "0",
                "end_time": email.utils.format_datetime(ended) if ended else None,
                "from": call.from_, "from_formatted": call.from_, "price": None, "price_unit": None,
                "sid": call.call_id, "start_time": email.utils.format_datetime(call.created_at),
                # A call not dialled yet: as its create answer says [unverified: the list documents no "queued"].
                "status": self.state(self._live_id(call)) or "queued",
                "to": call.to, "to_formatted": call.to, "uri": f"/v2/texml/Accounts/{self.account_sid}/Calls/{call.call_id}.json",
            })
        return {"calls": listed, "end": max(len(listed) - 1, 0), "first_page_uri": f"{path}?Page=0&PageSize=50",
                "next_page_uri": None, "page": 0, "page_size": len(listed), "start": 0, "uri": f"{path}?Page=0&PageSize=50"}

    def _account_authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"  # no account in the path

    def _account_body(self) -> dict[str, Any]:
        return {"data": {"record_type": "balance", "balance": "100.00", "pending": "0.00", "credit_limit": "0.00",
                         "available_credit": "100.00", "currency": "USD"}}

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
            "status": self.state(call_id),  # after the update (a cancel may have left it going)
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

    def detection(self, call: PlacedCarrierCall) -> Detection | None:
        return _twiml_detection(call.params)

    def _tell_detection(self, call: PlacedCarrierCall, detection: Detection, who: str) -> httpx.Response | None:
        """Asynchronous (AsyncAmd): AnsweredBy to AsyncAmdStatusCallback (TexmlCallAmdWebhook), the
        TeXML running meanwhile. Synchronous: the TeXML waits; AnsweredBy comes in a status callback,
        and a person's TeXML is fetched after it (Telnyx's TeXML answering-machine guide)."""
        answered_by = _twiml_answered_by(who, detection)
        if detection.report_url is not None:
            return self.callback(detection.report_url, {
                "AccountSid": self.account_sid, "AnsweredBy": answered_by, "CallSid": call.call_id,
                "CallSidLegacy": call.call_id, "ConnectionId": call.params["ApplicationSid"],
                "MachineDetectionDuration": "2500",
            })
        told = self.send_status(call, "in-progress", AnsweredBy=answered_by)
        return self.answer(call) if who == "human" else told


# ---------------------------------------------------------------------------
# Media stream
# ---------------------------------------------------------------------------


def _swap16(pcm: bytes) -> bytes:
    """Swap the bytes of each 16-bit sample (s16le <-> s16be)."""
    return np.frombuffer(pcm, dtype="<i2").astype(">i2").tobytes()


class _Telnyx(StreamDialect):
    name = "telnyx"
    rate = 16000
    min_chunk_ms = 20  # "RTP media chunks sent back to Telnyx can contain 20 milliseconds to 30 seconds"
    # When it cannot transcode to the codec asked for, Telnyx streams the call's own (its media
    # streaming docs): G.711 at 8 kHz. The agent's audio is then expected in it too [our reading].
    fallback_codecs = {"PCMU": 8000, "PCMA": 8000}
    _g711 = {"PCMU": (audioop.lin2ulaw, audioop.ulaw2lin), "PCMA": (audioop.lin2alaw, audioop.alaw2lin)}

    def new_session_id(self) -> str:
        return str(uuid.uuid4())

    def encode(self, pcm16: bytes) -> bytes:
        return _swap16(pcm16)  # L16 is network byte order

    def encode_for(self, s, pcm16: bytes) -> bytes:
        return self._g711[s.codec][0](pcm16, 2) if s.codec else self.encode(pcm16)

    def opening(self, s, custom, extra):
        start = {
            "user_id": s.account_id,
            "call_control_id": s.call_id,
            "call_session_id": s.session_id,
            "from": "+15551230001",
            "to": "+15550001111",
            "tags": [],
            "client_state": "",
            "media_format": {"encoding": s.codec or "L16", "sample_rate": s.rate, "channels": 1},
        }
        if custom:
            start["custom_parameters"] = dict(custom)
        start.update(extra)
        return [
            {"event": "connected", "version": "1.0.0"},
            {"event": "start", "sequence_number": s._next_seq(), "start": start, "stream_id": s.stream_id},
        ]

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequence_number": s._next_seq(),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(position_ms),
                "payload": _b64(payload),
            },
            "stream_id": s.stream_id,
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "sequence_number": s._next_seq(),
            "stream_id": s.stream_id,
            "dtmf": {"digit": digit},
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequence_number": s._next_seq(),
            "stop": {"user_id": s.account_id, "call_control_id": s.call_id},
            "stream_id": s.stream_id,
        }

    def mark_ack(self, s, name):
        return {
            "event": "mark",
            "sequence_number": s._next_seq(),
            "stream_id": s.stream_id,
            "mark": {"name": name},
        }

    def check(self, s, message):
        if message.get("event") == "mark" and not isinstance(self.mark_name(message), str):
            return ["mark: mark.name missing"]
        return []

    def decode(self, s, message):
        raw, error = self.payload(message)
        if raw is None:
            return b"", [f"media: {error}"]
        errors = []
        if s.codec:
            if len(raw) < s.rate * self.min_chunk_ms // 1000:
                errors.append(f"media: {len(raw)} {s.codec} samples is shorter than {self.min_chunk_ms} ms")
            return self._g711[s.codec][1](raw, 2), errors
        if len(raw) % 2:
            errors.append(f"media: L16 payload of odd length {len(raw)}")
            raw = raw[:-1]
        if len(raw) < self.rate * self.min_chunk_ms // 1000 * 2:
            errors.append(f"media: {len(raw) // 2} samples is shorter than {self.min_chunk_ms} ms")
        return _swap16(raw), errors


# ---------------------------------------------------------------------------
# The double
# ---------------------------------------------------------------------------


class TelnyxDouble(XmlDouble):
    """Telnyx for the tests: an API key, an ed25519 signer, a TeXML application, TeXML answers."""

    name = "telnyx"
    call_id_param = "CallSid"  # TeXML's CallSid is the call_control_id
    own_number = "+15550003333"
    signs_url = False  # ed25519 over "{timestamp}|{body}" only
    dial_status_param = "DialCallStatus"
    verb_words = _TWIML_VERBS
    stream_attributes = {
        "bidirectionalMode": "rtp",
        "codec": "L16",
        "bidirectionalCodec": "L16",
        "bidirectionalSamplingRate": "16000",
    }

    def __init__(
        self,
        api_key: str = "test-telnyx-key",
        account_sid: str = "0b2f3c4d-1111-4222-8333-444455556666",
        texml_application_id: str = "1234567890",
        signer: TelnyxSigner | None = None,
    ) -> None:
        self.api_key = api_key
        self.account_sid = account_sid
        self.texml_application_id = texml_application_id
        self._signer = signer

    @property
    def signer(self) -> TelnyxSigner:
        """The key pair Telnyx signs with (generated on first use)."""
        if self._signer is None:
            self._signer = TelnyxSigner.generate()
        return self._signer

    def environ(self, api_base_url: str) -> dict[str, str]:
        return {
            "TELNYX_API_KEY": self.api_key,
            "TELNYX_PUBLIC_KEY": self.signer.public_key_b64,
            "TELNYX_API_BASE_URL": api_base_url,
        }

    def config_toml(self) -> str:
        return (
            f"\n[telnyx]\naccount_sid = \"{self.account_sid}\"\n"
            f"texml_application_id = \"{self.texml_application_id}\"\n"
        )

    def fake_api(self, **kwargs: Any) -> FakeTelnyx:
        return FakeTelnyx(self.api_key, self.signer, self.account_sid, **kwargs)

    def simulate_arguments(self) -> list[str]:
        return ["--private-key", self.signer.private_key_b64]

    def for_session(self) -> "TelnyxDouble":
        return TelnyxDouble("KEY" + secrets.token_hex(16).upper(), str(uuid.uuid4()),
                            str(secrets.randbelow(10**18)), TelnyxSigner.generate())

    def inbound_form(self, *, to: str, from_: str = "+15551230001", **fields: str) -> dict[str, str]:
        return telnyx_inbound_form(from_=from_, to=to, account_sid=self.account_sid, **fields)

    def sign(self, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
        return self.signer.headers(raw)

    def status_fields(self, status: str, duration: int | None = None) -> dict[str, str]:
        fields = {"CallStatus": status}
        if duration is not None:
            fields["CallDuration"] = str(duration)
        return fields

    def redirect_url(self, update: CallUpdate) -> str | None:
        return update.params.get("Url")


# ---------------------------------------------------------------------------
# Found by the carrier's name: gateway.testing.<carrier>.STREAM_DIALECT, .FAKE_API and .DOUBLE
# ---------------------------------------------------------------------------


STREAM_DIALECT = _Telnyx()
FAKE_API = FakeTelnyx
DOUBLE = TelnyxDouble()
