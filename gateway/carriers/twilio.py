"""Everything Twilio: webhook signature (X-Twilio-Signature) and TwiML."""

from __future__ import annotations

import base64
import re
import hashlib
import hmac
import json
import secrets
from functools import cached_property
from typing import Any, Mapping
from urllib.parse import urlencode, urlparse

import httpx
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    add_port,
    get_signature_algorithm,
    remove_port,
)
from twilio.twiml.voice_response import VoiceResponse

from ..http import as_websocket_url
from ..settings import CarrierSettings
from .base import (
    MalformedFrame, OutboundDial, sample_rate, SignatureRejected, SimulatedCall, StreamStart,
    Webhook,
)
from .twiml import STATUS_CALLBACK_EVENTS, TwimlCarrier


class TwilioSettings(CarrierSettings):
    account_sid: str | None = None
    auth_token: str | None = None
    # The secret of a Webhooks SharedKey, for webhooks a Webhook Rule has Twilio sign with it
    # (those carry X-Twilio-Webhooks-Signature-Settings; the others stay signed with auth_token).
    webhook_shared_key: str | None = None
    api_base_url: str = "https://api.twilio.com"


NO_SHARED_KEY = ("signed with a Webhooks SharedKey (X-Twilio-Webhooks-Signature-Settings), but "
                 "TWILIO_WEBHOOK_SHARED_KEY is not configured on this gateway")


_HASHES = {HMAC_SHA1: hashlib.sha1, HMAC_SHA256: hashlib.sha256}


def signature_matches(token: bytes, url: str, params: Mapping[str, list[str]], signature: str, algorithm: str) -> bool:
    """RequestValidator.validate's check (twilio-python's request_validator.py), computed once: it
    signs the URL with and without its port (Twilio's back end is inconsistent), each followed by the
    sorted parameter names, each followed by its sorted distinct values; the library builds that
    parameter text anew for each URL, appending to one string. Here it is joined once and only the
    HMAC runs twice. (Its bodySHA256 branch applies to JSON bodies, which Twilio's voice webhooks
    never are.) An algorithm the library does not know fails, as there."""
    hash_function = _HASHES.get(algorithm.upper())
    if hash_function is None:
        return False
    signed_params = "".join(name + value for name in sorted(params) for value in sorted(set(params[name])))
    parsed, sent = urlparse(url), signature.encode()
    matched = False
    for variant in (remove_port(parsed), add_port(parsed)):  # both, in constant time
        digest = hmac.new(token, (variant + signed_params).encode(), hash_function).digest()
        matched |= hmac.compare_digest(base64.b64encode(digest), sent)
    return matched


class TwilioCarrier(TwimlCarrier):
    name = "twilio"
    title = "Twilio"
    settings_model = TwilioSettings
    environment = {
        "TWILIO_ACCOUNT_SID": "account_sid",
        "TWILIO_AUTH_TOKEN": "auth_token",
        "TWILIO_WEBHOOK_SHARED_KEY": "webhook_shared_key",
        "TWILIO_API_BASE_URL": "api_base_url",
    }
    verification_keys = ("auth_token",)
    secret_keys = ("auth_token", "webhook_shared_key")
    dial_keys = ("account_sid", "auth_token")
    call_id_param = "CallSid"
    signature_headers = ("x-twilio-signature",)
    call_id_pattern = re.compile(r"CA[0-9a-f]{32}")  # a Call SID: "CA" and 32 hex digits (Twilio's API reference)

    @cached_property
    def _validator(self) -> RequestValidator:
        return RequestValidator(self.config.auth_token or "")

    @cached_property
    def _shared_key_validator(self) -> RequestValidator:
        return RequestValidator(self.config.webhook_shared_key or "")

    def _signed_with(self, headers) -> tuple[RequestValidator | None, str]:
        """The validator and algorithm a request's signature is checked with (None: the key it was
        signed with is not configured). Twilio's docs (Sign webhooks with shared keys) and its SDKs:
        a request carrying X-Twilio-Webhooks-Signature-Settings ("key=<SharedKey id>,algorithm=
        HMAC_SHA256") is signed with that SharedKey's secret and the algorithm it names, over the
        same string (URL + sorted parameters); without it, with the auth token and HMAC-SHA1."""
        settings = headers.get(SIGNATURE_SETTINGS_HEADER.lower())  # headers: lower-cased names
        algorithm = get_signature_algorithm(settings)
        if not settings:
            return self._validator, algorithm
        return (self._shared_key_validator if self.config.webhook_shared_key else None), algorithm

    def rest_credentials(self) -> dict[str, Any]:
        return {"auth": (self.config.account_sid, self.config.auth_token)}

    rest_keys = ("account_sid", "auth_token")

    def account_path(self) -> str:
        return f"/2010-04-01/Accounts/{self.config.account_sid}.json"  # "Fetch an Account resource"

    def describe_account(self, body: Any) -> str:
        return f"account {body.get('friendly_name')!r} ({body.get('status')}, {body.get('type')})"

    @property
    def _calls(self) -> str:
        return f"/2010-04-01/Accounts/{self.config.account_sid}/Calls"

    def _verify(self, webhook: Webhook) -> None:
        signature = webhook.headers.get("x-twilio-signature")
        if not signature:
            raise SignatureRejected("missing X-Twilio-Signature header")
        validator, algorithm = self._signed_with(webhook.headers)
        if validator is None:
            raise SignatureRejected(NO_SHARED_KEY)
        if not signature_matches(validator.token, webhook.url, webhook.params, signature, algorithm):
            secret = ("webhook_shared_key",) if validator is self._shared_key_validator else None
            raise SignatureRejected("X-Twilio-Signature does not match this request",
                                    explanation=self.url_signature_explanation(webhook.url, secret))

    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        form: list[tuple[str, str]] = [
            ("To", dial.to), ("From", dial.from_), ("Url", dial.answer_url), ("Method", "POST"),
            ("StatusCallback", dial.status_url), ("StatusCallbackMethod", "POST"),
            ("Timeout", str(dial.ring_timeout_seconds)),
        ]
        form += [("StatusCallbackEvent", event) for event in STATUS_CALLBACK_EVENTS]
        if dial.machine_detection:
            form += self.detection_params(dial.machine_detection).items()
        response = await self.rest(
            http, "POST", f"{self._calls}.json", deadline=deadline,
            # Encoded here: StatusCallbackEvent repeats, which httpx's `data=` cannot express.
            content=urlencode(form), headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        return response.json().get("sid")

    @property
    def placed_calls_path(self) -> str:
        return f"{self._calls}.json"  # "Read multiple Call resources": queued calls too, newest first

    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        await self.rest(http, "POST", f"{self._calls}/{carrier_call_id}.json", deadline=deadline,
                        data={"Url": url, "Method": "POST"})

    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        await self._set_status(http, carrier_call_id, "completed", deadline=deadline)

    async def cancel(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        # Twilio's Call resource: Status=canceled ends a queued or ringing call (Twilio reports it
        # canceled, unbilled) and leaves one in progress alone; Status=completed ends any call.
        # The update answers with the call resource: answered meanwhile, the call is hung up.
        # (That the answer carries the call's status after the update is our reading [unverified].)
        answered = await self._set_status(http, carrier_call_id, "canceled", deadline=deadline)
        if answered == "in-progress":
            await self.hang_up(http, carrier_call_id, deadline=deadline)

    async def _set_status(self, http: httpx.AsyncClient, carrier_call_id: str, status: str, *,
                          deadline: float) -> str | None:
        """Update the call's Status; its status as Twilio then reports it (None: gone, or not said)."""
        response = await self.rest(http, "POST", f"{self._calls}/{carrier_call_id}.json", deadline=deadline,
                                   gone_ok=True, data={"Status": status})
        if response.status_code in self.gone_statuses:
            return None
        try:
            return response.json().get("status")
        except (ValueError, AttributeError):
            return None

    upgrade_is_signed = True
    # "The url does not support query string parameters" (Twilio's <Stream> docs): the socket's
    # credentials go as <Parameter>s, which Twilio sends in the start message's customParameters.
    stream_url_takes_query = False

    def upgrade_problem(self, url: str, headers) -> str | None:
        """Twilio signs the wss:// URL it connects to with no parameters (twilio-agent-connect-python,
        Twilio's own server library, validates the upgrade so); its https:// spelling is accepted too.
        With no query, the signature proves Twilio but names no call: the token does, in the start
        message. A SharedKey applies as for webhooks; that Webhook Rules cover stream URLs at all is
        not documented [unverified]."""
        signature = headers.get("x-twilio-signature")
        if not signature:
            return "missing X-Twilio-Signature on the media socket"
        if not self.can_verify:
            return "TWILIO_AUTH_TOKEN is not configured on this gateway"
        validator, algorithm = self._signed_with(headers)
        if validator is None:
            return NO_SHARED_KEY
        written = as_websocket_url(url)
        spellings = {written, written.replace("wss://", "https://", 1).replace("ws://", "http://", 1)}
        if not any(validator.validate(spelling, {}, signature, algorithm) for spelling in spellings):
            secret = ("webhook_shared_key",) if validator is self._shared_key_validator else None
            return ("X-Twilio-Signature does not match the media socket URL; "
                    + self.url_signature_explanation(written, secret))
        return None

    # Media Streams: mu-law 8 kHz both ways; numbers arrive as strings.
    media_encoding = "mulaw"
    media_rate = 8000

    def stream_start(self, data: dict, start: dict) -> StreamStart:
        media_format = start.get("mediaFormat") or {}
        stream_id = data.get("streamSid") or start.get("streamSid")
        if not stream_id:
            raise MalformedFrame("start without streamSid")
        return StreamStart(stream_id, start.get("callSid"), str(media_format.get("encoding", "audio/x-mulaw")),
                           sample_rate(media_format.get("sampleRate"), self.media_rate),
                           dict(start.get("customParameters") or {}))

    media_start_encodings = ("audio/x-mulaw",)

    def media_mark(self, stream_id: str, name: str) -> str:
        return json.dumps({"event": "mark", "streamSid": stream_id, "mark": {"name": name}})

    def connect_answer(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        """<Connect><Stream>; `parameters` go as <Parameter>s, which reach the socket in the start message."""
        response = VoiceResponse()
        stream = response.connect().stream(**self.stream_attributes(join_url))
        for name, value in (parameters or {}).items():
            stream.parameter(name=name, value=value)
        return response.to_xml()

    def media_audio(self, stream_id: str, payload: bytes) -> str:
        return json.dumps({"event": "media", "streamSid": stream_id,
                           "media": {"payload": base64.b64encode(payload).decode()}})

    def media_clear(self, stream_id: str) -> str:
        return json.dumps({"event": "clear", "streamSid": stream_id})

    def outgoing_status_params(self, status_url: str) -> dict[str, Any]:
        # Ultravox's documented example spells Twilio's parameters in camelCase.
        return {
            "statusCallback": status_url,
            "statusCallbackMethod": "POST",
            "statusCallbackEvent": STATUS_CALLBACK_EVENTS,
        }

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    stream_id_key = "streamSid"

    def simulated_inbound(self, *, from_: str, to: str) -> SimulatedCall:
        call_id = "CA" + secrets.token_hex(16)
        return SimulatedCall(call_id, {
            "CallSid": call_id, "AccountSid": self.config.account_sid or "AC" + "0" * 32, "From": from_, "To": to,
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01",
        })

    def simulated_signature(self, url, params, body, private_key=None) -> dict[str, str]:
        if not self.config.auth_token:
            raise ValueError("TWILIO_AUTH_TOKEN is needed to sign as Twilio")
        return {"X-Twilio-Signature": self._validator.compute_signature(url, dict(params))}

    def simulated_upgrade_headers(self, url: str) -> dict[str, str]:
        return {"X-Twilio-Signature": self._validator.compute_signature(url, {})}

    def simulated_start(self, stream_id, call_id, parameters) -> list[str]:
        start = {
            "streamSid": stream_id, "callSid": call_id, "accountSid": self.config.account_sid or "",
            "tracks": ["inbound"], "customParameters": dict(parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": self.media_rate, "channels": 1},
        }
        return [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
                json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream_id, "start": start})]

    def simulated_audio(self, stream_id, payload, sequence, timestamp_ms) -> str:
        return json.dumps({"event": "media", "sequenceNumber": str(sequence), "streamSid": stream_id, "media": {
            "track": "inbound", "chunk": str(sequence), "timestamp": str(timestamp_ms),
            "payload": base64.b64encode(payload).decode()}})
