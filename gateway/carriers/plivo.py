"""Everything Plivo: V3 webhook signature and Plivo XML."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from plivo import plivoxml
from plivo.utils.signature_v3 import construct_post_url

from .base import Carrier, SignatureRejected, Webhook

# Ultravox's plivo medium speaks 16 kHz linear PCM.
STREAM_CONTENT_TYPE = "audio/x-l16;rate=16000"
_DIGITS = re.compile(r"^[1-9]\d{5,14}$")


class PlivoCarrier(Carrier):
    name = "plivo"
    call_id_param = "CallUUID"

    @property
    def can_verify(self) -> bool:
        return bool(self.settings.plivo.auth_token)

    def normalize_number(self, number: str) -> str:
        # Plivo sends phone numbers as bare digits ("15551230001").
        number = number.strip()
        return "+" + number if _DIGITS.match(number) else number

    def _verify(self, webhook: Webhook) -> None:
        nonce = webhook.headers.get("x-plivo-signature-v3-nonce")
        sent = [
            webhook.headers.get("x-plivo-signature-v3"),
            # signed with the main account's token when the call belongs to a subaccount
            webhook.headers.get("x-plivo-signature-ma-v3"),
        ]
        if not nonce or not any(sent):
            raise SignatureRejected("missing X-Plivo-Signature-V3 or X-Plivo-Signature-V3-Nonce header")
        expected = self.v3_signature(webhook)
        # A header may carry several comma-separated signatures (token rotation).
        candidates = [s.strip().encode() for header in sent if header for s in header.split(",")]
        if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
            raise SignatureRejected("X-Plivo-Signature-V3 does not match this request")

    def v3_signature(self, webhook: Webhook) -> bytes:
        """base64(HMAC-SHA256(auth token, signed URL + "." + nonce)); the URL is built by Plivo's SDK."""
        params = {k: v[0] if len(v) == 1 else list(v) for k, v in webhook.params.items()}
        signed_url = construct_post_url(webhook.url, params)  # webhooks are POSTed forms
        nonce = webhook.headers.get("x-plivo-signature-v3-nonce", "")
        message = signed_url + b"." + nonce.encode()
        digest = hmac.new((self.settings.plivo.auth_token or "").encode(), message, hashlib.sha256).digest()
        return base64.b64encode(digest)

    def connect_xml(self, join_url: str) -> str:
        response = plivoxml.ResponseElement()
        response.add(
            plivoxml.StreamElement(
                join_url, bidirectional=True, keepCallAlive=True, contentType=STREAM_CONTENT_TYPE
            )
        )
        return response.to_string()

    def apology_xml(self, message: str, fallback_number: str | None) -> str:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.SpeakElement(message))
        if fallback_number:
            dial = plivoxml.DialElement()
            dial.add(plivoxml.NumberElement(fallback_number.lstrip("+")))
            response.add(dial)
        response.add(plivoxml.HangupElement())
        return response.to_string()

    def reject_xml(self, message: str) -> str:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.SpeakElement(message))
        response.add(plivoxml.HangupElement())
        return response.to_string()
