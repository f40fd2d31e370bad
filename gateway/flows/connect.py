"""How a carrier call's audio reaches Ultravox, decided once for inbound, outbound and transfer returns.

direct: the carrier streams to Ultravox itself (the carrier's native medium, its join URL).
bridge: the carrier streams to the gateway's media socket, which relays to Ultravox's
serverWebSocket (recording, keypad handling, audio counters); see gateway.media.bridge.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from ..carriers.base import Carrier
from ..settings import Settings
from ..store import CallRecord
from ..urls import MEDIA_TOKEN_SECONDS, Urls

# Ultravox's advice with clear support: a large client buffer, so its audio flows ahead smoothly.
CLIENT_BUFFER_MS = 30000

Mode = Literal["direct", "bridge"]
MODES: tuple[Mode, ...] = ("direct", "bridge")


class Connector:
    def __init__(self, settings: Settings, urls: Urls):
        self.settings = settings
        self.urls = urls

    def mode(self, route: str | None) -> Mode:
        """How calls on `route` reach Ultravox: "bridge" or "direct"."""
        settings = self.settings.route_named(route) if route else None
        return "bridge" if settings and settings.mode == "bridge" else "direct"

    def bridged(self, route: str | None, call_id: str | None) -> bool:
        """Whether the call on `route` is bridged. The bridge finds the call by its record, so a call
        created unrecorded (during a store outage) is always direct."""
        return bool(call_id) and self.mode(route) == "bridge"

    def medium(self, carrier: Carrier, route: str | None, call_id: str | None) -> dict[str, Any]:
        """The Ultravox call's medium for this carrier call."""
        if not self.bridged(route, call_id):
            return carrier.ultravox_medium()
        # The carrier's own rate both ways: no resampling in the bridge.
        return {"serverWebSocket": {
            "inputSampleRate": carrier.media_rate,
            "outputSampleRate": carrier.media_rate,
            "clientBufferSizeMs": CLIENT_BUFFER_MS,
        }}

    def stream_url(self, carrier: Carrier, route: str | None, call_id: str | None, join_url: str,
                   *, lifetime: float = MEDIA_TOKEN_SECONDS, expires: int | None = None) -> tuple[str, dict[str, str]]:
        """Where the carrier streams the call's audio, and the parameters to give with the stream
        (`expires`: the media token's expiry, to give the same token again)."""
        if not call_id or not self.bridged(route, call_id):
            return join_url, {}
        return self.urls.media_socket(carrier.name, call_id, lifetime=lifetime, in_query=carrier.stream_url_takes_query,
                                      expires=expires)

    def stream_expiry(self, route: str | None, call_id: str | None) -> int | None:
        """Bridge mode: the expiry of a new media token for the call (recorded, so that every answer
        to the call's webhook carries the one token: a replayed webhook opens no second socket)."""
        return int(time.time() + MEDIA_TOKEN_SECONDS) if self.bridged(route, call_id) else None

    def answer(self, carrier: Carrier, route: str | None, call_id: str | None, join_url: str,
               *, expires: int | None = None) -> str:
        """The carrier answer that connects the call's audio."""
        url, parameters = self.stream_url(carrier, route, call_id, join_url, expires=expires)
        return carrier.connect_answer(url, parameters=parameters or None)

    def record_answer(self, carrier: Carrier, record: CallRecord, join_url: str) -> str:
        return self.answer(carrier, record.route, record.id, join_url)
