"""Secrets the gateway checks that are not a carrier's: API keys and Ultravox webhook signatures."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

from . import inputs


def api_key_id(key: str) -> str:
    """A stable, non-secret name for a key, stored with the calls it placed."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def match_api_key(authorization: str | None, keys: list[str]) -> str | None:
    """The key behind `Authorization: Bearer KEY` if it is one of `keys`, compared in constant time."""
    if not authorization or not keys:
        return None
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    for key in keys:  # no early exit: every key is compared, matching or not
        if hmac.compare_digest(presented.strip().encode(), key.encode()):
            found = key
    return found


def tool_secret_matches(presented: str | None, secret: str | None) -> bool:
    return bool(presented and secret) and hmac.compare_digest((presented or "").encode(), (secret or "").encode())


def callback_token(key: str, call_id: str) -> str:
    """A token for URLs the gateway hands to carriers, naming one call.

    Twilio and Plivo sign the URL they call, Telnyx does not: without this, a Telnyx-signed body
    could be replayed against another call's URL.
    """
    return hmac.new(key.encode(), f"callback:{call_id}".encode(), hashlib.sha256).hexdigest()[:32]


def valid_callback_token(key: str, call_id: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(callback_token(key, call_id), token or "")


def media_token(key: str, carrier: str, call_id: str, expires_at: int) -> str:
    """A short-lived token for one call's media socket (`call_id`: the gateway's record), "{expiry}.{signature}"."""
    mac = hmac.new(key.encode(), f"media:{carrier}:{call_id}:{expires_at}".encode(), hashlib.sha256)
    return f"{expires_at}.{mac.hexdigest()[:32]}"


def media_token_problem(key: str, carrier: str, call_id: str, token: str | None, now: float) -> str | None:
    """Why `token` does not open this call's media socket, or None when it does."""
    text, _, _ = (token or "").partition(".")
    try:
        expires = inputs.unix_seconds(text, name="media token expiry")
    except inputs.InvalidInput:
        return "missing or malformed media token"
    # Both sides ASCII (compare_digest refuses to compare other text).
    if not (token or "").isascii() or not hmac.compare_digest(media_token(key, carrier, call_id, expires), token or ""):
        return "media token does not match this call"
    if now > expires:
        return "media token has expired"
    return None


class WebhookRejected(Exception):
    pass


def verify_ultravox_webhook(
    secret: str, body: bytes, timestamp: str | None, signatures: str | None, *, tolerance_seconds: float,
    now: dt.datetime | None = None,
) -> None:
    """Ultravox signs hex(HMAC-SHA256(secret, body + timestamp)); one header may carry several."""
    if not timestamp or not signatures:
        raise WebhookRejected("missing X-Ultravox-Webhook-Timestamp or X-Ultravox-Webhook-Signature")
    try:
        sent_at = inputs.timestamp(timestamp, name="X-Ultravox-Webhook-Timestamp")
    except inputs.InvalidInput:
        raise WebhookRejected("X-Ultravox-Webhook-Timestamp is not an ISO-8601 time") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if abs((now - sent_at).total_seconds()) > tolerance_seconds:
        raise WebhookRejected("X-Ultravox-Webhook-Timestamp is outside the accepted window (stale or replayed)")
    expected = sign_ultravox_webhook(secret, body, timestamp)
    if not any(hmac.compare_digest(expected, candidate.strip()) for candidate in signatures.split(",")):
        raise WebhookRejected("X-Ultravox-Webhook-Signature does not match this request")


def sign_ultravox_webhook(secret: str, body: bytes, timestamp: str) -> str:
    return hmac.new(secret.encode(), body + timestamp.encode(), hashlib.sha256).hexdigest()
