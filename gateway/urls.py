"""Every URL the gateway hands out (to carriers, Ultravox and tools), built in one place: the route
table's names and the public URL, with the tokens that prove the gateway issued them."""

from __future__ import annotations

import time
from urllib.parse import urlencode

from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Router

from .http import as_websocket_url
from .security import callback_token, media_token, valid_callback_token
from .settings import Settings

# The carrier opens the media socket right after fetching the answer; a token older than this is stale.
MEDIA_TOKEN_SECONDS = 60


# A callback token covers the carrier and the route (for transfers: the step and the leg) it was
# issued for: Telnyx signs only its body and Exotel nothing, so a captured callback URL must not be
# replayable on another carrier's path or against another step (say, `accept`).
def call_subject(route: str, carrier: str, call_id: str) -> str:
    return f"call:{route}:{carrier}:{call_id}"


def transfer_subject(carrier: str, transfer_id: str, step: str, leg: int | None) -> str:
    return f"transfer:{carrier}:{transfer_id}:{step}:{'' if leg is None else leg}"


class Urls:
    def __init__(self, settings: Settings, routes: list[BaseRoute] | None = None):
        self.settings = settings
        self._router = Router(routes or [])

    def bind(self, routes: list[BaseRoute]) -> None:
        """The route table, once it exists (its endpoints need the flows, which need URLs)."""
        self._router = Router(routes)

    @property
    def _key(self) -> str:
        return self.settings.ultravox.api_key or ""

    def public(self, route: str, query: dict[str, str] | None = None, **path_params: str) -> str:
        """The public URL of a named route, as a carrier or Ultravox reaches it."""
        url = f"{self.settings.public_url or ''}{self._router.url_path_for(route, **path_params)}"
        return f"{url}?{urlencode(query)}" if query else url

    # --- what carriers are given --------------------------------------------------------------
    def call_callback(self, route: str, carrier: str, call_id: str) -> str:
        """A URL for the carrier to call back about one call, with a token only the gateway can make."""
        token = callback_token(self._key, call_subject(route, carrier, call_id))
        return self.public(route, {"call": call_id, "t": token}, carrier=carrier)

    def valid_call_callback(self, route: str, carrier: str, call_id: str, token: str | None) -> bool:
        return valid_callback_token(self._key, call_subject(route, carrier, call_id), token)

    def transfer_callback(self, carrier: str, step: str, transfer_id: str, leg: int | None = None) -> str:
        token = callback_token(self._key, transfer_subject(carrier, transfer_id, step, leg))
        query = {"transfer": transfer_id, "t": token}
        if leg is not None:
            query["leg"] = str(leg)
        return self.public(f"transfer-{step}", query, carrier=carrier)

    def valid_transfer_callback(self, carrier: str, transfer_id: str, step: str, leg: int | None,
                                token: str | None) -> bool:
        return valid_callback_token(self._key, transfer_subject(carrier, transfer_id, step, leg), token)

    def media_socket(self, carrier: str, call_id: str, *, lifetime: float = MEDIA_TOKEN_SECONDS,
                     in_query: bool = True, expires: int | None = None) -> tuple[str, dict[str, str]]:
        """The gateway's media socket for one call (bridge mode), and its credentials: in the URL's
        query too (`in_query`), or only for the carrier to give as stream parameters (Twilio's
        <Parameter>s, which arrive in the start message). `expires` (a Unix time) instead of
        `lifetime`: the token given before, again."""
        expires = expires if expires is not None else int(time.time() + lifetime)
        credentials = {"call": call_id, "token": media_token(self._key, carrier, call_id, expires)}
        url = self.public("media", credentials if in_query else None, carrier=carrier)
        return as_websocket_url(url), credentials

    # --- what Ultravox is given -----------------------------------------------------------------
    def ultravox_events(self) -> str | None:
        return self.public("ultravox-events") if self.settings.public_url else None

    def tool(self, route: str) -> str:
        return self.public(route)

    # --- what requests were addressed to ----------------------------------------------------------
    def of_request(self, request: HTTPConnection) -> str:
        """The URL as the carrier addressed it (what it signed): the public base, our path, the query."""
        base = self.settings.public_url
        if base is None:
            url = f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
        else:
            url = base + request.url.path
        query = request.url.query
        return f"{url}?{query}" if query else url
