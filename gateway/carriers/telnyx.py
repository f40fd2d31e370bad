"""Everything Telnyx (TeXML): ed25519 webhook signature and TeXML."""

from __future__ import annotations

import base64
import binascii
import json
import time
from functools import cached_property
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..http import RemoteError, RetryPolicy, post_with_retries
from .base import MalformedFrame, OutboundDial, SignatureRejected, StreamStart, Webhook
from .twiml import STATUS_CALLBACK_EVENTS, TwimlCarrier

# Telnyx's 429 (code 90103, dials per second) means "not processed"; nothing else is retried.
REST_POLICY = RetryPolicy(max_attempts=3, attempt_timeout=10.0)

# Ultravox's telnyx medium expects 16 kHz linear PCM both ways; both codecs must match.
STREAM_CODEC = "L16"
STREAM_SAMPLING_RATE = "16000"


class TelnyxCarrier(TwimlCarrier):
    name = "telnyx"
    call_id_param = "CallSid"  # TeXML's CallSid is the call_control_id

    def __init__(self, settings, clock=time.time):
        super().__init__(settings)
        self._clock = clock

    @property
    def can_verify(self) -> bool:
        return bool(self.settings.telnyx.public_key)

    @cached_property
    def _public_key(self) -> Ed25519PublicKey:
        # Base64 of the 32 raw key bytes, checked when the settings were loaded.
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.settings.telnyx.public_key or ""))

    def _verify(self, webhook: Webhook) -> None:
        signature_b64 = webhook.headers.get("telnyx-signature-ed25519")
        timestamp = webhook.headers.get("telnyx-timestamp")
        if not signature_b64 or not timestamp:
            raise SignatureRejected("missing telnyx-signature-ed25519 or telnyx-timestamp header")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise SignatureRejected("telnyx-timestamp is not a Unix timestamp") from None
        if abs(self._clock() - sent_at) > self.settings.telnyx.timestamp_tolerance_seconds:
            raise SignatureRejected("telnyx-timestamp is outside the accepted window (stale or replayed)")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureRejected("telnyx-signature-ed25519 is not base64") from None
        try:
            # Signed bytes are exactly "{timestamp}|{raw body}", before any parsing.
            self._public_key.verify(signature, timestamp.encode() + b"|" + webhook.body)
        except InvalidSignature:
            raise SignatureRejected("telnyx-signature-ed25519 does not match this request") from None

    @property
    def can_dial(self) -> bool:
        telnyx = self.settings.telnyx
        return bool(telnyx.api_key and telnyx.account_sid and telnyx.texml_application_id)

    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        telnyx = self.settings.telnyx
        body = {
            "ApplicationSid": telnyx.texml_application_id,
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
            body["MachineDetection"] = "Enable"
        response = await post_with_retries(
            http, f"{telnyx.api_base_url}/v2/texml/Accounts/{telnyx.account_sid}/Calls",
            service="Telnyx", policy=REST_POLICY, deadline=deadline,
            json=body, headers={"Authorization": f"Bearer {telnyx.api_key}"},
        )
        if not 200 <= response.status_code < 300:
            raise RemoteError(f"Telnyx answered {response.status_code}: {response.text[:200]}")
        # The account-scoped endpoint answers without a call id; callbacks bring CallSid.
        payload = response.json()
        return payload.get("call_sid") or payload.get("sid") if isinstance(payload, dict) else None

    async def _update_call(
        self, http: httpx.AsyncClient, carrier_call_id: str, params: dict[str, str], *, deadline: float
    ) -> httpx.Response:
        """POST to the live TeXML call (new TeXML to fetch, or a status)."""
        telnyx = self.settings.telnyx
        return await post_with_retries(
            http, f"{telnyx.api_base_url}/v2/texml/Accounts/{telnyx.account_sid}/Calls/{carrier_call_id}",
            service="Telnyx", policy=REST_POLICY, deadline=deadline,
            json=params, headers={"Authorization": f"Bearer {telnyx.api_key}"},
        )

    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        response = await self._update_call(http, carrier_call_id, {"Url": url, "Method": "POST"}, deadline=deadline)
        if response.status_code == 404:
            raise RemoteError("Telnyx no longer has this call (it ended)")
        if not 200 <= response.status_code < 300:
            raise RemoteError(f"Telnyx answered {response.status_code}: {response.text[:200]}")

    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        response = await self._update_call(http, carrier_call_id, {"Status": "completed"}, deadline=deadline)
        if not (200 <= response.status_code < 300 or response.status_code in (404, 422)):  # already ended
            raise RemoteError(f"Telnyx answered {response.status_code}: {response.text[:200]}")

    # Media streaming: we ask for L16 at 16 kHz both ways; RTP's L16 is big-endian (network order).
    media_encoding = "l16-be"
    media_rate = int(STREAM_SAMPLING_RATE)

    def stream_start(self, data: dict, start: dict) -> StreamStart:
        media_format = start.get("media_format") or {}
        stream_id = data.get("stream_id")  # top level, not inside start
        if not stream_id:
            raise MalformedFrame("start without stream_id")
        return StreamStart(stream_id, start.get("call_control_id"), str(media_format.get("encoding", STREAM_CODEC)),
                           int(media_format.get("sample_rate") or self.media_rate),
                           dict(start.get("custom_parameters") or {}))

    media_start_encodings = ("l16",)

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
