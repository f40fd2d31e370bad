"""Who may open the media socket (bridge mode): the carrier, for a bridged call waiting for it, once.

The credentials are the gateway's own short-lived token naming the call, plus the carrier's own
upgrade signature where it has one. The token comes in the stream URL's query, or, for a carrier
whose stream URL takes no query (Twilio), as stream parameters in the start message: that carrier
must sign its upgrade, and nothing reaches Ultravox before the start message's token is checked.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from starlette.websockets import WebSocket

from ..carriers.base import Carrier, StreamStart
from ..flows.connect import Connector
from ..logs import bind, bind_call
from ..security import media_token_problem
from ..settings import Settings
from ..store import CallRecord, CallStore
from .bridge import MediaBridge, MediaStats

log = logging.getLogger("gateway.media")


class MediaSockets:
    def __init__(
        self, settings: Settings, carriers: dict[str, Carrier], store: CallStore, bridge: MediaBridge,
        connector: Connector, *, public_url: Callable[[WebSocket], str], on_refused: Callable[[Carrier], None],
    ):
        self.settings = settings
        self.carriers = carriers
        self.store = store
        self.bridge = bridge
        self.connector = connector
        self.public_url = public_url
        self.on_refused = on_refused

    async def serve(self, websocket: WebSocket) -> None:
        carrier = self.carriers.get(websocket.path_params["carrier"])
        if carrier is None:
            await websocket.close(code=1008)
            return
        bind(carrier=carrier.name)
        query = websocket.query_params
        call_id, token = query.get("call", ""), query.get("token")
        problem = None
        if not self.settings.insecure_skip_signature_verification:
            problem = carrier.upgrade_problem(self.public_url(websocket), websocket.headers)
        if problem is None and token is not None:
            problem = self._token_problem(carrier, call_id, token)
        elif problem is None and not carrier.upgrade_is_signed:
            problem = "missing media token"
        if problem is not None:
            return await self._refuse(carrier, websocket, problem)
        start = None
        if token is None:
            # A signed upgrade without our query (Twilio's stream URLs take none): the credentials
            # come as stream parameters in the start message, checked before anything reaches Ultravox.
            await websocket.accept()
            start = await self.bridge.read_start(carrier, websocket, MediaStats())
            params = start.parameters if start else {}
            call_id, token = params.get("call", ""), params.get("token", "")
            problem = self._token_problem(carrier, call_id, token)
            if problem is not None:
                return await self._refuse(carrier, websocket, problem)
        bind(call_id=call_id)  # its token checked: the call is the one it names
        record = await self.store.get(call_id)
        if record is not None and record.carrier == carrier.name:
            bind_call(record)
        problem = self._record_problem(carrier, record, start)
        if problem is None and self.bridge.relaying(call_id):
            # A second socket for a call relayed here (a replayed answer's token, say) is refused
            # before it is anywhere near the live call, which goes on untouched.
            problem = "a media socket for this call is live already"
        # One socket per token, on whichever replica it lands: a compare-and-set in the store.
        if problem is None and record is not None and not await self.store.claim_media_token(record.id, token):
            problem = "media token already used"
        if problem is not None or record is None:  # (no record is a problem too: _record_problem)
            return await self._refuse(carrier, websocket, problem or "no call for this media stream")
        if start is None:
            await websocket.accept()
        await self.bridge.run(carrier, websocket, record, start=start)

    def _record_problem(self, carrier: Carrier, record: CallRecord | None, start: StreamStart | None) -> str | None:
        if record is None or record.carrier != carrier.name or not record.join_url:
            return "no bridged call waiting for this media stream"
        if not self.connector.bridged(record.route, record.id):
            return "no bridged call waiting for this media stream"
        if record.is_final:  # e.g. hung up through the API while it rang: nobody to connect
            return f"the call has ended ({record.status})"
        if start and start.carrier_call_id and record.carrier_call_id and start.carrier_call_id != record.carrier_call_id:
            return "the stream's call is not the one its token names"
        return None

    def _token_problem(self, carrier: Carrier, call_id: str, token: str) -> str | None:
        return media_token_problem(self.settings.ultravox.api_key or "", carrier.name, call_id, token, time.time())

    async def _refuse(self, carrier: Carrier, websocket: WebSocket, problem: str) -> None:
        log.warning("%s media socket refused: %s", carrier.name, problem)
        self.on_refused(carrier)
        # Before accepting, a close is an HTTP 403 to the carrier; after, a policy-violation close.
        await websocket.close(code=1008)
