"""How a delivery's request goes out: signed per Standard Webhooks, POSTed, its answer's status read.

`HttpSender` makes the requests with aiohttp itself, not through the httpx client the rest of the
gateway uses: a delivery needs nothing of httpx (one POST, its status and one header), and its
layer cost each delivery about 0.2 ms of CPU more, on the event loop that answers the carriers
(bench/README.md). Sending from a child process instead was tried and measured: it cost more
CPU in all than it took off the loop (issue 10's note).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Iterable

import aiohttp
import yarl
from standardwebhooks import Webhook

from ..http import retry_after_seconds, tls_context
from ..settings import WebhookSettings
from ..store.calls import utcnow

USER_AGENT = "ultravox-telephony-gateway"
IN_FLIGHT_PER_ENDPOINT = 64  # deliveries one process sends to one endpoint at once (distinct streams)


@dataclasses.dataclass(frozen=True)
class Sent:
    status_code: int | None
    error: str | None
    retry_after: float | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class HttpSender:
    """Sends to the configured endpoints, on one pool of keep-alive connections."""

    def __init__(self, webhooks: Iterable[WebhookSettings], timeout_seconds: float):
        webhooks = list(webhooks)
        self.urls = {webhook.name: yarl.URL(webhook.url) for webhook in webhooks}  # parsed once
        self.timeout_seconds = timeout_seconds
        self._signers = {webhook.name: Webhook(webhook.secret) for webhook in webhooks}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Connections for every endpoint's sends at once: a slow endpoint holding its own must not
        # leave another's sends waiting for one (the wait counts against their timeout).
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT_PER_ENDPOINT * max(1, len(self.urls)), ssl=tls_context())
        # trust_env off: no proxy from the environment, as for every client of the gateway.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, endpoint: str, event_id: str, body: str) -> Sent:
        """POST `body` to the endpoint named `endpoint`, signed as event `event_id` (after `start`)."""
        assert self._session is not None
        now = utcnow()
        # The timestamp is this attempt's (receivers refuse old ones); the id and the body are the event's.
        headers = {
            "webhook-id": event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signers[endpoint].sign(event_id, now, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        started = time.monotonic()
        status_code, error, retry_after = None, None, None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                # A redirect is not followed: an answer other than 2xx, retried.
                async with self._session.post(self.urls[endpoint], data=body.encode(), headers=headers,
                                              allow_redirects=False) as response:
                    status_code = response.status
                    # The answer's body is not read (not ours to keep): aiohttp keeps the connection
                    # when it came with the head, and closes it when more is on the way.
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
        except TimeoutError:
            error = f"no answer within {self.timeout_seconds:g} s"
        except aiohttp.ClientError as failure:
            error = f"{type(failure).__name__}: {failure}"[:200]
        if status_code is not None and not 200 <= status_code < 300:
            error = f"answered {status_code}"
        return Sent(status_code, error, retry_after, round((time.monotonic() - started) * 1000))
