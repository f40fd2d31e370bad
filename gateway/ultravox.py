"""Ultravox REST client: one pooled httpx.AsyncClient, a deadline per call, retries that respect it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from .http import RemoteError, RetryPolicy, create_client, post_with_retries
from .settings import UltravoxSettings

class UltravoxError(RemoteError):
    """The call could not be created; `reason` is short and safe to store."""


@dataclass(frozen=True)
class CreatedCall:
    call_id: str
    join_url: str


def create_http_client(settings: UltravoxSettings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The process-wide Ultravox client."""
    return create_client(
        pool_size=settings.pool_size,
        timeout=settings.request_timeout_seconds,
        base_url=settings.base_url,
        headers={"X-API-Key": settings.api_key or "", "Content-Type": "application/json"},
        transport=transport,
    )


class UltravoxClient:
    def __init__(self, http: httpx.AsyncClient, settings: UltravoxSettings, clock=time.monotonic):
        self._http = http
        self._settings = settings
        self._policy = RetryPolicy(settings.max_attempts, settings.request_timeout_seconds, clock)

    async def create_call(
        self, body: dict[str, Any], *, agent_id: str | None, deadline: float, prior_call_id: str | None = None
    ) -> CreatedCall:
        """Create an Ultravox call, retrying 429/503 and connection failures while `deadline` allows.

        `deadline` is a value of the client's monotonic clock. `prior_call_id` continues that call's
        conversation (its settings and messages) in the new call.
        """
        if not self._settings.api_key:
            raise UltravoxError("ULTRAVOX_API_KEY is not configured")
        path = f"/api/agents/{agent_id}/calls" if agent_id else "/api/calls"
        params = {"priorCallId": prior_call_id} if prior_call_id else None
        try:
            response = await post_with_retries(
                self._http, path, service="Ultravox", policy=self._policy, deadline=deadline, json=body, params=params
            )
        except RemoteError as error:
            raise UltravoxError(error.reason) from None
        return _created_call(response)

    async def send_data_message(self, call_id: str, message: dict[str, Any], *, deadline: float) -> None:
        """Inject a message into a live call (204), e.g. to tell the agent what happened meanwhile."""
        try:
            response = await post_with_retries(
                self._http, f"/api/calls/{call_id}/send_data_message", service="Ultravox", policy=self._policy,
                deadline=deadline, json=message,
            )
        except RemoteError as error:
            raise UltravoxError(error.reason) from None
        if response.status_code != 204:
            raise UltravoxError(f"Ultravox answered {response.status_code} to a data message")


def _created_call(response: httpx.Response) -> CreatedCall:
    if response.status_code not in (200, 201):
        detail = response.text[:200].replace("\n", " ")
        raise UltravoxError(f"Ultravox answered {response.status_code}: {detail}")
    try:
        payload = response.json()
    except ValueError:
        raise UltravoxError("Ultravox answered with a body that is not JSON") from None
    join_url = payload.get("joinUrl") if isinstance(payload, dict) else None
    call_id = payload.get("callId") if isinstance(payload, dict) else None
    if not isinstance(join_url, str) or not join_url.startswith(("wss://", "ws://")):
        raise UltravoxError("Ultravox answered without a usable joinUrl")
    return CreatedCall(call_id=str(call_id or ""), join_url=join_url)
