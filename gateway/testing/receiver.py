"""`EventReceiver`: the user's endpoint for the gateway's events, as a real HTTP server on loopback.

It verifies every delivery with the `standardwebhooks` library (as a receiver would with any
Standard Webhooks SDK), keeps each event once by its `webhook-id`, counts repeats, and can be
taken down and brought back on the same port, or made to answer a status of the test's choice.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import ServerThread

__all__ = ["EventReceiver", "ReceivedEvent", "new_webhook_secret"]


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True)
class ReceivedEvent:
    id: str  # webhook-id
    type: str
    timestamp: str
    data: dict[str, Any]
    received_at: float  # time.time()

    @property
    def call_id(self) -> str | None:
        return self.data.get("call_id") or (self.data.get("call") or {}).get("id")


class EventReceiver:
    """POST / accepts events; `status` (default 200) is what it answers to a verified one."""

    def __init__(self, secret: str | None = None, *, path: str = "/events"):
        self.secret = secret or new_webhook_secret()
        self.path = path
        self.status = 200
        self.delay = 0.0  # seconds before answering
        self._verifier = Webhook(self.secret)
        self._lock = threading.Condition()
        self.events: dict[str, ReceivedEvent] = {}  # by webhook-id, the first delivery of each
        self.order: list[str] = []  # webhook-ids in the order first accepted
        self.deliveries = 0  # every verified request, repeats included
        self.repeats = 0  # verified requests for an id accepted before
        self.refused: list[str] = []  # why requests failed verification
        self._server: ServerThread | None = None
        self.port = 0
        self.app = Starlette(routes=[Route(path, self._receive, methods=["POST"])])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    # --- lifecycle ------------------------------------------------------------------------------------
    def serve(self) -> "EventReceiver":
        self._server = ServerThread(self.app, port=self.port).start()
        self.port = self._server.port
        return self

    def down(self) -> None:
        """Stop listening: deliveries now fail to connect."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def up(self) -> None:
        """Listen again, on the same port."""
        if self._server is None:
            self.serve()

    def __enter__(self) -> "EventReceiver":
        return self.serve() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- what arrived -----------------------------------------------------------------------------------
    def of_type(self, event_type: str, call_id: str | None = None) -> list[ReceivedEvent]:
        with self._lock:
            found = [self.events[i] for i in self.order]
        return [e for e in found if e.type == event_type and (call_id is None or e.call_id == call_id)]

    def for_call(self, call_id: str) -> list[ReceivedEvent]:
        with self._lock:
            return [self.events[i] for i in self.order if self.events[i].call_id == call_id]

    def wait_for(self, condition: Callable[["EventReceiver"], Any], *, timeout: float = 10.0) -> Any:
        """Wait until `condition(self)` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = condition(self)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the receiver did not get what was awaited; it has {self.order!r}")
                self._lock.wait(min(remaining, 0.1))

    def wait_for_type(self, event_type: str, call_id: str | None = None, *, timeout: float = 10.0) -> ReceivedEvent:
        return self.wait_for(lambda r: next(iter(r.of_type(event_type, call_id)), None), timeout=timeout)

    # --- the endpoint -------------------------------------------------------------------------------------
    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        try:
            envelope = self._verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            with self._lock:
                self.refused.append(str(error))
            return JSONResponse({"detail": f"signature: {error}"}, status_code=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.status
        webhook_id = request.headers["webhook-id"]
        with self._lock:
            self.deliveries += 1
            if 200 <= status < 300:
                if webhook_id in self.events:
                    self.repeats += 1
                else:
                    self.events[webhook_id] = ReceivedEvent(
                        webhook_id, envelope["type"], envelope["timestamp"], envelope["data"], time.time())
                    self.order.append(webhook_id)
            self._lock.notify_all()
        return Response(status_code=status)
