"""Outgoing HTTP: the shared client factory and the retry rules every remote API call follows."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

log = logging.getLogger("gateway.http")

# Statuses that mean "not processed, try again later" (sent with Retry-After).
RETRYABLE_STATUSES = {429, 503}
FIRST_BACKOFF_SECONDS = 0.2
# An attempt with less time than this left would likely time out after the server acted,
# so the caller would act as if it had not; better to give up at once.
MIN_ATTEMPT_SECONDS = 0.5


class RemoteError(Exception):
    """A remote API call failed; `reason` is short and safe to store. `over_capacity`: the service's
    last answer was 429/503 (it did not act), with its Retry-After in seconds when it gave one."""

    def __init__(self, reason: str, *, over_capacity: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.over_capacity = over_capacity
        self.retry_after = retry_after


@dataclass
class RetryPolicy:
    max_attempts: int
    attempt_timeout: float
    clock: Callable[[], float] = field(default=time.monotonic)


async def post_with_retries(
    http: httpx.AsyncClient, url: str, *, service: str, policy: RetryPolicy, deadline: float, **request: Any
) -> httpx.Response:
    return await request_with_retries(http, "POST", url, service=service, policy=policy, deadline=deadline, **request)


async def request_with_retries(
    http: httpx.AsyncClient, method: str, url: str, *, service: str, policy: RetryPolicy, deadline: float,
    **request: Any,
) -> httpx.Response:
    """Send once, or again only when the first try cannot have been acted on, while `deadline` allows.

    Retried: 429/503 (after Retry-After) and errors before the request was sent. Anything else,
    including a timeout after sending, is final: the remote side may have acted on it (placed a
    call), and doing it twice is worse than reporting a failure. `deadline` is a `policy.clock` value.
    """
    backoff = FIRST_BACKOFF_SECONDS
    problem = "no attempt made"
    busy, after = False, None
    for attempt in range(1, policy.max_attempts + 1):
        remaining = deadline - policy.clock()
        if remaining <= 0:
            break
        try:
            # httpx's timeout bounds each phase (connect, write, read); this bounds the whole attempt.
            async with asyncio.timeout(min(remaining, policy.attempt_timeout)):
                response = await http.request(method, url, **request)
        except TimeoutError:
            raise RemoteError(f"{service} did not answer in time") from None
        except httpx.HTTPError as error:
            if not request_never_sent(error):
                raise RemoteError(f"request to {service} failed ({type(error).__name__})") from None
            problem = f"cannot reach {service} ({type(error).__name__})"
            busy, after = False, None
            wait = backoff
            backoff *= 2
        else:
            if response.status_code not in RETRYABLE_STATUSES:
                return response
            problem = f"{service} answered {response.status_code}"
            busy, after = True, retry_after_seconds(response.headers.get("retry-after"))
            if after is None:
                wait = backoff
                backoff *= 2
            else:
                wait = after
        if attempt == policy.max_attempts:
            break
        if policy.clock() + wait + MIN_ATTEMPT_SECONDS >= deadline:
            problem += f"; retrying after {wait:.2f}s would miss the deadline"
            break
        log.info("%s attempt %d failed (%s); retrying in %.2fs", service, attempt, problem, wait)
        await asyncio.sleep(wait)
    raise RemoteError(problem, over_capacity=busy, retry_after=after)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every client of the process: building one loads the CA bundle
    (~20 ms), and each client would otherwise build its own. A context may be shared by many
    connections and threads."""
    return httpx.create_ssl_context(trust_env=False)


def create_client(
    *,
    pool_size: int,
    timeout: float,
    base_url: str = "",
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A long-lived client: keep-alive connections, never a connection per call.

    The connections are aiohttp's: httpcore's pool (httpx's default transport, 1.0.9) spends time
    quadratic in the number of open connections on every request, which at a pool of 100 costs
    more CPU than everything else the gateway does (see bench/README.md).
    """
    limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
    return httpx.AsyncClient(
        transport=transport or AiohttpTransport(verify=tls_context(), limits=limits, trust_env=False),
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout),
    )


def as_websocket_url(url: str) -> str:
    """The same address spelt for a WebSocket: https:// -> wss://, http:// -> ws://."""
    return url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)


def request_never_sent(error: httpx.HTTPError) -> bool:
    """True when the request cannot have reached the server, so a retry cannot act twice.

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


def transport_problem(error: httpx.HTTPError) -> str:
    """Why a request got no answer, in a person's words ("connection refused", "name not found…").

    httpx_aiohttp reports most connection failures as ConnectTimeout; the aiohttp error it chains
    holds the system's reason."""
    os_error = getattr(error.__cause__, "os_error", None)
    if isinstance(os_error, socket.gaierror):
        return f"its host name was not found ({os_error.strerror})"
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno).lower()
    if isinstance(error, httpx.TimeoutException):
        return "no answer in time"
    return type(error).__name__


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
