"""Ultravox REST client: one pooled httpx.AsyncClient, a deadline per call, retries that respect it."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from .settings import UltravoxSettings

log = logging.getLogger("gateway.ultravox")

# Statuses that mean "not processed, try again later" (Ultravox sends Retry-After with them).
RETRYABLE_STATUSES = {429, 503}
FIRST_BACKOFF_SECONDS = 0.2
# An attempt with less time than this left would likely time out after Ultravox created the call,
# leaving it without a caller; the apology is better said at once.
MIN_ATTEMPT_SECONDS = 0.5


class UltravoxError(Exception):
    """The call could not be created; `reason` is short and safe to store."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CreatedCall:
    call_id: str
    join_url: str


def create_http_client(settings: UltravoxSettings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The process-wide client: keep-alive connections, never a connection per call.

    The connections are aiohttp's: httpcore's pool (httpx's default transport, 1.0.9) spends time
    quadratic in the number of open connections on every request, which at a pool of 100 costs
    more CPU than everything else the gateway does (see bench/README.md).
    """
    limits = httpx.Limits(max_connections=settings.pool_size, max_keepalive_connections=settings.pool_size)
    return httpx.AsyncClient(
        transport=transport or AiohttpTransport(limits=limits, trust_env=False),
        base_url=settings.base_url,
        headers={"X-API-Key": settings.api_key or "", "Content-Type": "application/json"},
        timeout=httpx.Timeout(settings.request_timeout_seconds),
    )


def request_never_sent(error: httpx.HTTPError) -> bool:
    """True when the request cannot have reached Ultravox, so retrying cannot create a second call.

    httpx_aiohttp maps every aiohttp connection error to ConnectTimeout, also a disconnect after
    the request was written; the aiohttp exception it chains tells the two apart.
    """
    if isinstance(error, httpx.PoolTimeout):
        return True
    if not isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return False
    cause = error.__cause__
    if isinstance(cause, aiohttp.ClientConnectionError):
        return isinstance(cause, aiohttp.ClientConnectorError)
    return True


class UltravoxClient:
    def __init__(self, http: httpx.AsyncClient, settings: UltravoxSettings, clock=time.monotonic):
        self._http = http
        self._settings = settings
        self._clock = clock

    async def create_call(self, body: dict[str, Any], *, agent_id: str | None, deadline: float) -> CreatedCall:
        """Create an Ultravox call, retrying 429/503 and connection failures while `deadline` allows.

        `deadline` is a value of the client's monotonic clock.
        """
        if not self._settings.api_key:
            raise UltravoxError("ULTRAVOX_API_KEY is not configured")
        path = f"/api/agents/{agent_id}/calls" if agent_id else "/api/calls"
        backoff = FIRST_BACKOFF_SECONDS
        last_problem = "no attempt made"
        for attempt in range(1, self._settings.max_attempts + 1):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            wait = None
            try:
                # httpx's timeout bounds each phase (connect, write, read); this bounds the whole attempt.
                async with asyncio.timeout(min(remaining, self._settings.request_timeout_seconds)):
                    response = await self._http.post(path, json=body)
            except TimeoutError:
                raise UltravoxError("Ultravox did not answer in time") from None
            except httpx.HTTPError as error:
                if not request_never_sent(error):
                    # The request may have been processed: retrying could create a second call.
                    raise UltravoxError(f"request to Ultravox failed ({type(error).__name__})") from None
                last_problem = f"cannot reach Ultravox ({type(error).__name__})"
                wait = backoff
                backoff *= 2
            else:
                if response.status_code in RETRYABLE_STATUSES:
                    last_problem = f"Ultravox answered {response.status_code}"
                    wait = retry_after_seconds(response.headers.get("retry-after"))
                    if wait is None:
                        wait = backoff
                        backoff *= 2
                else:
                    return _created_call(response)
            if attempt == self._settings.max_attempts:
                break
            if self._clock() + wait + MIN_ATTEMPT_SECONDS >= deadline:
                last_problem += f"; retrying after {wait:.2f}s would miss the deadline"
                break
            log.info("ultravox attempt %d failed (%s); retrying in %.2fs", attempt, last_problem, wait)
            await asyncio.sleep(wait)
        raise UltravoxError(last_problem)


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


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
