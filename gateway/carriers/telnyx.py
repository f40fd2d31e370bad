"""Everything Telnyx (TeXML): ed25519 webhook signature and TeXML."""

from __future__ import annotations

import base64
import re
import binascii
import json
import time
import uuid
from functools import cached_property
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pydantic import Field, field_validator

from .. import inputs
from ..media.codecs import AudioFormat
from ..settings import CarrierSettings
from .base import (MalformedFrame, OutboundDial, ReplayKey, sample_rate, SignatureRejected, SimulatedCall,
                   StreamStart, Webhook)
from .twiml import STATUS_CALLBACK_EVENTS, TwimlCarrier


class TelnyxSettings(CarrierSettings):
    api_key: str | None = None
    # Outbound TeXML calls: the account id in the Calls URL and the TeXML application that owns them.
    account_sid: str | None = None
    texml_application_id: str | None = None
    public_key: str | None = None  # base64 ed25519 public key from the Telnyx portal
    api_base_url: str = "https://api.telnyx.com"
    timestamp_tolerance_seconds: int = Field(default=300, gt=0)

    @field_validator("public_key")
    @classmethod
    def _ed25519_key(cls, value: str | None) -> str | None:
        if value:
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be the base64 ed25519 public key from the Telnyx portal") from None
            if len(raw) != 32:
                raise ValueError(f"must decode to a 32-byte ed25519 key, got {len(raw)} bytes")
        return value


# Ultravox's telnyx medium expects 16 kHz linear PCM both ways; both codecs must match.
STREAM_CODEC = "L16"
STREAM_SAMPLING_RATE = "16000"


class TelnyxCarrier(TwimlCarrier):
    name = "telnyx"
    title = "Telnyx"
    settings_model = TelnyxSettings
    environment = {
        "TELNYX_API_KEY": "api_key",
        "TELNYX_PUBLIC_KEY": "public_key",
        "TELNYX_API_BASE_URL": "api_base_url",
    }
    verification_keys = ("public_key",)
    secret_keys = ("api_key",)  # the public key is public
    dial_keys = ("api_key", "account_sid", "texml_application_id")
    call_id_param = "CallSid"  # TeXML's CallSid is the call_control_id
    signature_headers = ("telnyx-signature-ed25519",)
    # TeXML's CallSid is the call_control_id: "v3:" and URL-safe base64 in Telnyx's examples (54
    # characters after it); no documented length, so bounded.
    call_id_pattern = re.compile(r"(v[0-9]+:)?[A-Za-z0-9_-]{1,128}")
    # 422: the call is no longer active.
    gone_statuses = (404, 422)
    # TeXML's AMD (its SDK's call_calls_params): Twilio's parameters, AsyncAmd a JSON boolean. Its
    # synchronous mode reports AnsweredBy in the status callback (the TeXML waits for it), its
    # asynchronous mode to AsyncAmdStatusCallback (its answering-machine guide and callback reference).
    async_amd = True

    def __init__(self, settings, clock=time.time):
        super().__init__(settings)
        self._clock = clock

    @cached_property
    def _public_key(self) -> Ed25519PublicKey:
        # Base64 of the 32 raw key bytes, checked when the settings were loaded.
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.config.public_key or ""))

    def rest_credentials(self) -> dict[str, Any]:
        return {"headers": {"Authorization": f"Bearer {self.config.api_key}"}}

    rest_keys = ("api_key",)

    def account_path(self) -> str:
        # "Get user balance details": read-only, what Telnyx's docs suggest as a first authentication check.
        return "/v2/balance"

    def describe_account(self, body: Any) -> str:
        data = body.get("data") or {}
        return f"balance {data.get('balance')} {data.get('currency')}"

    @property
    def _calls(self) -> str:
        return f"/v2/texml/Accounts/{self.config.account_sid}/Calls"

    @property
    def placed_calls_path(self) -> str:
        return self._calls  # TeXML's "Fetch multiple call resources"

    # That call list "is eventually consistent" (Telnyx's API reference) and says no more: a dial
    # is taken as never placed only once it has been missing from it for this long [unverified].
    lists_placed_calls_within = 120.0

    def _verify(self, webhook: Webhook) -> None:
        signature_b64 = webhook.headers.get("telnyx-signature-ed25519")
        timestamp = webhook.headers.get("telnyx-timestamp")
        if not signature_b64 or not timestamp:
            raise SignatureRejected("missing telnyx-signature-ed25519 or telnyx-timestamp header")
        try:
            sent_at = inputs.unix_seconds(timestamp, name="telnyx-timestamp")
        except inputs.InvalidInput:
            raise SignatureRejected("telnyx-timestamp is not a Unix timestamp") from None
        skew = self._clock() - sent_at
        if abs(skew) > self.config.timestamp_tolerance_seconds:
            raise SignatureRejected(
                "telnyx-timestamp is outside the accepted window (stale or replayed)",
                explanation=f"it is {skew:+.0f} s from this machine's clock, over [telnyx] timestamp_tolerance_seconds "
                f"({self.config.timestamp_tolerance_seconds}). Most likely cause: this machine's clock is wrong (is "
                "NTP running?); otherwise the request was replayed")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureRejected("telnyx-signature-ed25519 is not base64") from None
        try:
            # Signed bytes are exactly "{timestamp}|{raw body}", before any parsing.
            self._public_key.verify(signature, timestamp.encode() + b"|" + webhook.body)
        except InvalidSignature:
            raise SignatureRejected(
                "telnyx-signature-ed25519 does not match this request",
                explanation="checked over telnyx-timestamp|body with TELNYX_PUBLIC_KEY ([telnyx] public_key); Telnyx "
                "signs no URL, so GATEWAY_PUBLIC_URL plays no part. Most likely cause: that is not the public key of "
                "the Telnyx account sending it (Mission Control portal: Keys & Credentials, Public Key); otherwise "
                "a proxy changed the body on the way") from None

    def replay_key(self, webhook: Webhook) -> ReplayKey | None:
        # Signed over timestamp|body and accepted within the tolerance either side of now: the pair
        # is remembered until a replay of it would be refused as stale anyway. The URL is part of
        # the key: the signature does not cover it, and two callbacks of one call (its status and a
        # dial action, say) may carry the same body in the same second.
        timestamp = webhook.headers.get("telnyx-timestamp")
        signature = webhook.headers.get("telnyx-signature-ed25519")
        if not timestamp or not signature:
            return None
        return ReplayKey(f"{webhook.url}|{timestamp}|{signature}",
                         window_seconds=2.0 * self.config.timestamp_tolerance_seconds)

    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        body = {
            "ApplicationSid": self.config.texml_application_id,
            "To": dial.to,
            "From": dial.from_,
            "Url": dial.answer_url,
            "UrlMethod": "POST",
            "StatusCallback": dial.status_url,
            "StatusCallbackMethod": "POST",
            "StatusCallbackEvent": " ".join(STATUS_CALLBACK_EVENTS),
            "Timeout": dial.ring_timeout_seconds,
        }
        if dial.machine_detection:
            body.update(self.detection_params(dial.machine_detection))
        response = await self.rest(http, "POST", self._calls, deadline=deadline, json=body)
        # The account-scoped endpoint answers without a call id; callbacks bring CallSid.
        payload = response.json()
        return payload.get("call_sid") or payload.get("sid") if isinstance(payload, dict) else None

    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        await self.rest(http, "POST", f"{self._calls}/{carrier_call_id}", deadline=deadline,
                        json={"Url": url, "Method": "POST"})

    # Telnyx's update-call docs know one Status, completed, which "ends the call": also the cancel of
    # a call still ringing (the base's cancel). That Telnyx then reports it canceled is [unverified].
    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        await self.rest(http, "POST", f"{self._calls}/{carrier_call_id}", deadline=deadline, gone_ok=True,
                        json={"Status": "completed"})

    # Media streaming: we ask for L16 at 16 kHz both ways; RTP's L16 is big-endian (network order).
    media_encoding = "l16-be"
    media_rate = int(STREAM_SAMPLING_RATE)

    def stream_start(self, data: dict, start: dict) -> StreamStart:
        media_format = start.get("media_format") or {}
        stream_id = data.get("stream_id")  # top level, not inside start
        if not stream_id:
            raise MalformedFrame("start without stream_id")
        return StreamStart(stream_id, start.get("call_control_id"), str(media_format.get("encoding", STREAM_CODEC)),
                           sample_rate(media_format.get("sample_rate"), self.media_rate),
                           dict(start.get("custom_parameters") or {}))

    media_start_encodings = ("l16",)
    # "RTP media chunks sent back to Telnyx can contain 20 milliseconds to 30 seconds" (its media
    # streaming docs): audio goes in whole 20 ms frames.
    media_chunk_ms = 20
    # Telnyx streams the call's own codec when it cannot transcode to what was asked for (its media
    # streaming docs): G.711 at 8 kHz, relayed resampled to the 16 kHz the Ultravox call speaks.
    # That the audio sent back must then be in that codec too is our reading [unverified].
    fallback_encodings = {"pcmu": "mulaw", "pcma": "alaw"}

    def stream_format(self, start: StreamStart) -> AudioFormat | None:
        fallback = self.fallback_encodings.get(start.encoding.lower())
        if fallback is not None and start.rate == 8000:
            return AudioFormat(fallback, 8000)
        return super().stream_format(start)

    def media_mark(self, stream_id: str, name: str) -> str:
        return json.dumps({"event": "mark", "mark": {"name": name}})

    def media_audio(self, stream_id: str, payload: bytes) -> str:
        return json.dumps({"event": "media", "media": {"payload": base64.b64encode(payload).decode()}})

    def media_clear(self, stream_id: str) -> str:
        return json.dumps({"event": "clear"})

    def outgoing_status_params(self, status_url: str) -> dict[str, Any]:
        return {
            "StatusCallback": status_url,
            "StatusCallbackMethod": "POST",
            "StatusCallbackEvent": " ".join(STATUS_CALLBACK_EVENTS),
        }

    def stream_attributes(self, join_url: str) -> dict[str, Any]:
        return {
            "url": join_url,
            "bidirectional_mode": "rtp",
            "codec": STREAM_CODEC,
            "bidirectional_codec": STREAM_CODEC,
            "bidirectional_sampling_rate": STREAM_SAMPLING_RATE,
        }

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    stream_id_key = "stream_id"

    def simulated_inbound(self, *, from_: str, to: str) -> SimulatedCall:
        call_id = f"v3:{uuid.uuid4().hex}"
        return SimulatedCall(call_id, {
            "CallSid": call_id, "AccountSid": self.config.account_sid or str(uuid.uuid4()), "From": from_, "To": to,
            "CallStatus": "ringing", "Direction": "inbound",
        })

    def simulated_signature(self, url, params, body, private_key=None) -> dict[str, str]:
        if not private_key:
            raise ValueError("Telnyx signs with its private key: pass the one matching TELNYX_PUBLIC_KEY (--private-key)")
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
        timestamp = str(int(self._clock()))
        signature = key.sign(timestamp.encode() + b"|" + body)
        return {"telnyx-signature-ed25519": base64.b64encode(signature).decode(), "telnyx-timestamp": timestamp}

    def simulated_start(self, stream_id, call_id, parameters) -> list[str]:
        start = {"call_control_id": call_id, "custom_parameters": dict(parameters),
                 "media_format": {"encoding": STREAM_CODEC, "sample_rate": self.media_rate, "channels": 1}}
        return [json.dumps({"event": "connected", "version": "1.0.0"}),
                json.dumps({"event": "start", "sequence_number": "1", "stream_id": stream_id, "start": start})]

    def simulated_audio(self, stream_id, payload, sequence, timestamp_ms) -> str:
        return json.dumps({"event": "media", "sequence_number": str(sequence), "stream_id": stream_id, "media": {
            "track": "inbound", "chunk": str(sequence), "timestamp": str(timestamp_ms),
            "payload": base64.b64encode(payload).decode()}})
