"""The tools the gateway serves (operator transfers, opt-out), as Ultravox tool definitions.

The model picks an operator by name from an enum; numbers never reach it. Ultravox adds the call
id itself (an automatic parameter) and the tool secret as a header (a security requirement
satisfied by authTokens), so neither is visible to the model either.
"""

from __future__ import annotations

from typing import Any

import httpx

from .http import RemoteError
from .settings import Settings
from .urls import Urls

COLD_TOOL = "transferToOperator"
WARM_TOOL = "warmTransferToOperator"
SECRET_HEADER = "X-Gateway-Tool-Secret"
SECRET_REQUIREMENT = "gatewayToolSecret"
# Durable tool names for `gateway tools sync`.
DURABLE_NAMES = {COLD_TOOL: "gateway-transfer", WARM_TOOL: "gateway-warm-transfer"}
# Offered on the calls a campaign (or a dial asking for it) places: the callee asks never to be
# called again, and the gateway adds the number it called (never one the model names) to the
# suppression list.
OPT_OUT_TOOL = "optOutOfCalls"
# The gateway's routes serving them (see gateway.app).
TOOL_ROUTES = {COLD_TOOL: "tool-transfer", WARM_TOOL: "tool-warm-transfer", OPT_OUT_TOOL: "tool-opt-out"}
# Ultravox's built-in tool that leaves a voicemail (its `message`, model-written), then ends the call
# (docs.ultravox.ai/tools/built-in-tools, per research/operations-and-voicemail.md A4; built-in
# tools are not in the OpenAPI schema, which only says a SelectedTool may name one by toolName).
LEAVE_VOICEMAIL = "leaveVoicemail"


def _body(name: str, description: str, schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"name": name, "location": "PARAMETER_LOCATION_BODY", "schema": {**schema, "description": description},
            "required": required}


def tool_definition(settings: Settings, urls: Urls, tool: str, operators: list[str]) -> dict[str, Any]:
    """A BaseToolDefinition for the cold or warm transfer tool, limited to `operators`."""
    listing = "; ".join(f"{name}: {settings.operators[name].description}" for name in operators)
    parameters = [
        _body("operator", "Who to transfer to", {"type": "string", "enum": list(operators)}),
        _body("reason", "Why the caller needs a person, in one sentence", {"type": "string"}),
    ]
    if tool == WARM_TOOL:
        description = (
            "Hand the caller to a person after briefing them: the caller waits on hold, the person hears "
            f"your summary and accepts. Operators: {listing}. Tell the caller you are connecting them first."
        )
        parameters.append(_body("summary", "What the person should know, two or three sentences", {"type": "string"}))
    else:
        description = (
            f"Transfer the caller to a person. Operators: {listing}. "
            "Tell the caller you are connecting them before you use this."
        )
    return {
        "modelToolName": tool,
        "description": description,
        "dynamicParameters": parameters,
        "automaticParameters": [
            {"name": "callId", "location": "PARAMETER_LOCATION_BODY", "knownValue": "KNOWN_PARAM_CALL_ID"}
        ],
        "requirements": {"httpSecurityOptions": {"options": [
            {"requirements": {SECRET_REQUIREMENT: {"headerApiKey": {"name": SECRET_HEADER}}}}
        ]}},
        "http": {"baseUrlPattern": urls.tool(TOOL_ROUTES[tool]), "httpMethod": "POST"},
        "timeout": "5s",
    }


def transfer_tools(settings: Settings, urls: Urls, operators: list[str]) -> list[dict[str, Any]]:
    """SelectedTools to attach to a call whose route may use `operators` (none if not configured)."""
    if not operators or not settings.tool_secret or not settings.public_url:
        return []
    return [
        {"temporaryTool": tool_definition(settings, urls, tool, operators),
         "authTokens": {SECRET_REQUIREMENT: settings.tool_secret}}
        for tool in (COLD_TOOL, WARM_TOOL)
    ]


def _authenticated(definition: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A SelectedTool of `definition`, presenting the tool secret as the gateway's tools require."""
    return {"temporaryTool": {
        **definition,
        "automaticParameters": [
            {"name": "callId", "location": "PARAMETER_LOCATION_BODY", "knownValue": "KNOWN_PARAM_CALL_ID"}
        ],
        "requirements": {"httpSecurityOptions": {"options": [
            {"requirements": {SECRET_REQUIREMENT: {"headerApiKey": {"name": SECRET_HEADER}}}}
        ]}},
    }, "authTokens": {SECRET_REQUIREMENT: settings.tool_secret}}


def opt_out_tools(settings: Settings, urls: Urls) -> list[dict[str, Any]]:
    """The opt-out tool as a SelectedTool (none without a tool secret and public URL)."""
    if not settings.tool_secret or not settings.public_url:
        return []
    return [_authenticated({
        "modelToolName": OPT_OUT_TOOL,
        "description": ("The person asks not to be called again (or to be taken off the list): record it. "
                        "Then confirm they will not be called again, and say goodbye."),
        "dynamicParameters": [_body("reason", "What they said, in a few words", {"type": "string"}, required=False)],
        "http": {"baseUrlPattern": urls.tool(TOOL_ROUTES[OPT_OUT_TOOL]), "httpMethod": "POST"},
        "timeout": "5s",
    }, settings)]


def voicemail_tool() -> dict[str, Any]:
    """The SelectedTool of Ultravox's leaveVoicemail (the model writes the message)."""
    return {"toolName": LEAVE_VOICEMAIL}


async def sync_tools(settings: Settings, urls: Urls, http: httpx.AsyncClient) -> list[str]:
    """Create or update the durable versions of the tools, naming every configured operator.

    Returns one line per tool saying what was done. Raises RemoteError when Ultravox refuses.
    """
    operators = sorted(settings.operators)
    report = []
    for tool, name in DURABLE_NAMES.items():
        definition = tool_definition(settings, urls, tool, operators)
        listing = await http.get("/api/tools", params={"search": name})
        if listing.status_code != 200:
            raise RemoteError(f"Ultravox answered {listing.status_code} listing tools: {listing.text[:200]}")
        existing = next((t for t in listing.json().get("results", []) if t.get("name") == name), None)
        if existing:
            response = await http.put(f"/api/tools/{existing['toolId']}", json={"name": name, "definition": definition})
            done = "updated"
        else:
            response = await http.post("/api/tools", json={"name": name, "definition": definition})
            done = "created"
        if response.status_code not in (200, 201):
            raise RemoteError(f"Ultravox answered {response.status_code} for tool {name}: {response.text[:200]}")
        report.append(f"{done} {name} ({response.json().get('toolId')})")
    return report
