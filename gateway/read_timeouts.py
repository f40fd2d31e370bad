"""Read timeouts for HTTP requests: a client that sends its headers or its body too slowly is
answered 408 and closed.

uvicorn bounds only the idle time between requests on a kept-alive connection (timeout_keep_alive).
A connection that trickles a request (a "slow loris") or sends nothing at all holds its socket,
its buffers and, for a body, the request's task, for as long as it likes: enough of them exhaust
the descriptor limit and no carrier can reach the gateway. `TimedHttpProtocol` is uvicorn's
httptools protocol with two deadlines, as Apache's mod_reqtimeout has:

- headers: from a connection's opening (or a request's first byte) to the end of its headers;
- body: from the end of the headers to the end of the body, extended by one second for each
  `BODY_MIN_BYTES_PER_SECOND` bytes received, so that a large upload at a fair rate goes through
  while a trickle does not.

A request whose body times out while the app reads it gets `http.disconnect` from receive(),
the way a client that went away does; the 408 is written here, before that.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("gateway.http")

BODY_MIN_BYTES_PER_SECOND = 500  # mod_reqtimeout's MinRate
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n")


def timed_protocol(header_seconds: float, body_seconds: float) -> Any:
    """The protocol factory for uvicorn.Config(http=...) with these deadlines."""
    return functools.partial(TimedHttpProtocol, header_seconds=header_seconds, body_seconds=body_seconds)


class TimedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, header_seconds: float, body_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_seconds = header_seconds
        self.body_seconds = body_seconds
        self._phase: str | None = None  # "headers" or "body" while one is awaited
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._request_began = False  # a byte of the awaited request has arrived

    # --- the deadline ------------------------------------------------------------------------------
    def _await(self, phase: str, seconds: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _stop_waiting(self) -> None:
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # One timer per connection, moved on only when it fires: a body's many chunks each push
        # the deadline back without touching the timer.
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        phase, self._phase = self._phase, None
        if phase == "headers" and not self._request_began:
            self.transport.close()  # nothing was asked: nothing to answer
            return
        cycle = self.cycle if phase == "body" else None
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("%s sent its request %s too slowly: 408, connection closed", client, phase)
        if cycle is None or not cycle.response_started:  # the app may have answered before reading it all
            self.transport.write(_TIMEOUT_RESPONSE)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect; its send() is a no-op
            cycle.message_event.set()
        self.transport.close()

    # --- uvicorn's protocol and parser callbacks ---------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_began = False
        self._await("headers", self.header_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is None and (self.cycle is None or self.cycle.response_complete):
            # Between requests (uvicorn's keep-alive timer stops here): the next one's headers.
            self._request_began = True
            self._await("headers", self.header_seconds)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_began = True
        if self._phase != "headers":
            self._await("headers", self.header_seconds)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._await("body", self.body_seconds)  # ended at once by on_message_complete when there is none

    def on_body(self, body: bytes) -> None:
        if self._phase == "body":
            self._deadline += len(body) / BODY_MIN_BYTES_PER_SECOND
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_waiting()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_waiting()  # the WebSocket protocol has its own pings and timeouts
        super().handle_websocket_upgrade()
