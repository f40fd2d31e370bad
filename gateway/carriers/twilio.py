"""Everything Twilio: webhook signature (X-Twilio-Signature) and TwiML."""

from __future__ import annotations

from functools import cached_property

from twilio.request_validator import RequestValidator, get_signature_algorithm

from .base import SignatureRejected, Webhook
from .twiml import TwimlCarrier


class _FormFields(dict):
    """Twilio's validator reads repeated form fields through `getall`, like a Flask MultiDict."""

    def getall(self, name: str) -> list[str]:
        return self[name]


class TwilioCarrier(TwimlCarrier):
    name = "twilio"
    call_id_param = "CallSid"

    @property
    def can_verify(self) -> bool:
        return bool(self.settings.twilio.auth_token)

    @cached_property
    def _validator(self) -> RequestValidator:
        return RequestValidator(self.settings.twilio.auth_token or "")

    def _verify(self, webhook: Webhook) -> None:
        signature = webhook.headers.get("x-twilio-signature")
        if not signature:
            raise SignatureRejected("missing X-Twilio-Signature header")
        # Twilio names the algorithm (HMAC-SHA1 unless told otherwise) in a settings header.
        algorithm = get_signature_algorithm(webhook.headers.get("x-twilio-webhooks-signature-settings"))
        if not self._validator.validate(webhook.url, _FormFields(webhook.params), signature, algorithm):
            raise SignatureRejected("X-Twilio-Signature does not match this request")
