"""What Ultravox sends the gateway: tool invocations (operator transfers) and call events."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from . import inputs
from .api import read_limited
from .flows.campaigns import CampaignFlow
from .flows.tracking import CallTracking
from .flows.transfer import ToolInvocation, TransferFlow
from .logs import bind
from .security import tool_secret_matches
from .settings import Settings
from .tools import SECRET_HEADER
from .ultravox import EventRejected, read_event

log = logging.getLogger("gateway")
MAX_OPT_OUT_REASON = 500


class UltravoxCallbacks:
    def __init__(self, settings: Settings, transfer: TransferFlow, tracking: CallTracking, campaigns: CampaignFlow):
        self.settings = settings
        self.transfer = transfer
        self.tracking = tracking
        self.campaigns = campaigns
        self.cold_tool = self._transfer_tool("cold")
        self.warm_tool = self._transfer_tool("warm")

    async def _tool_payload(self, request: Request, tool: str) -> dict[str, Any] | Response:
        """The JSON object Ultravox sent a gateway tool, once its tool secret is checked; or the refusal."""
        if not self.settings.tool_secret:
            return PlainTextResponse("GATEWAY_TOOL_SECRET is not configured on this gateway\n", status_code=403)
        if not tool_secret_matches(request.headers.get(SECRET_HEADER), self.settings.tool_secret):
            log.warning("%s tool call refused: wrong or missing %s", tool, SECRET_HEADER)
            return PlainTextResponse("wrong or missing tool secret\n", status_code=403)
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            return PlainTextResponse("body too large\n", status_code=413)
        try:
            payload = inputs.json_document(body or b"")
        except inputs.InvalidInput as error:
            return PlainTextResponse(f"expected a JSON object: {error}\n", status_code=400)
        if not isinstance(payload, dict):
            return PlainTextResponse("expected a JSON object\n", status_code=400)
        if inputs.controls_anywhere(payload):
            return PlainTextResponse("a value holds NUL or another control character\n", status_code=400)
        return payload

    async def opt_out_tool(self, request: Request) -> Response:
        payload = await self._tool_payload(request, "opt-out")
        if isinstance(payload, Response):
            return payload
        reason = str(payload.get("reason") or "").strip()[:MAX_OPT_OUT_REASON]
        opted = await self.campaigns.opt_out(str(payload.get("callId") or ""), reason)
        if opted is None:
            return PlainTextResponse("This call is not one the gateway placed; nothing was recorded.",
                                     status_code=404, headers={"X-Ultravox-Agent-Reaction": "speaks"})
        return PlainTextResponse("Recorded: this number will not be called again. Confirm that to the person, "
                                 "then say goodbye.", headers={"X-Ultravox-Agent-Reaction": "speaks"})

    def _transfer_tool(self, kind: str):
        async def endpoint(request: Request) -> Response:
            payload = await self._tool_payload(request, "transfer")
            if isinstance(payload, Response):
                return payload
            reply = await self.transfer.invoke(ToolInvocation.of(kind, payload))
            return PlainTextResponse(reply.text, status_code=reply.status, headers={
                "X-Ultravox-Agent-Reaction": reply.reaction,
            })

        endpoint.__name__ = f"{kind}_transfer_tool"
        return endpoint

    async def events(self, request: Request) -> Response:
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            return PlainTextResponse("body too large\n", status_code=413)
        try:
            event = read_event(self.settings.ultravox, body, request.headers)
        except EventRejected as rejection:
            log.warning("Ultravox event refused: %s", rejection.detail)
            return PlainTextResponse(f"{rejection.detail}\n", status_code=rejection.status)
        bind(ultravox_call_id=event.call_id)
        await self.tracking.ultravox_event(event)
        return Response(status_code=204)
