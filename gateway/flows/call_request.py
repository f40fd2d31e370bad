"""What Ultravox call to create for a route: the request body, carrier-agnostic."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from ..settings import RouteSettings


@dataclass(frozen=True)
class CallRequest:
    agent_id: str | None  # None: an inline call (POST /api/calls)
    body: dict[str, Any]


def build_call_request(
    route: RouteSettings,
    *,
    medium: dict[str, Any],
    metadata: Mapping[str, str],
    webhook_params: Mapping[str, str],
    agent_speaks_first: bool = True,
    extra_template_context: Mapping[str, Any] | None = None,
    callbacks: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> CallRequest:
    """Body for StartAgentCallRequest (agent routes) or StartCallRequest (inline routes).

    `metadata` is the gateway's own (carrier, ids); the route's metadata is kept beside it.
    """
    body: dict[str, Any] = copy.deepcopy(route.call) if route.call is not None else {}
    body["medium"] = medium
    body["firstSpeakerSettings"] = _first_speaker(route, agent_speaks_first)
    body["metadata"] = {**body.get("metadata", {}), **route.metadata, **metadata}
    if route.max_duration_seconds is not None:
        body["maxDuration"] = duration(route.max_duration_seconds)
    if route.recording is not None:
        body["recordingEnabled"] = route.recording
    if route.voice is not None:
        body["voice"] = route.voice
    if route.agent_id is not None and (route.template_context or extra_template_context):
        body["templateContext"] = {
            **template_context(route.template_context, webhook_params), **(extra_template_context or {})
        }
    if callbacks:
        body["callbacks"] = callbacks
    if tools:
        # Inline calls list their tools; agent calls add to the agent's own.
        if route.agent_id is None:
            body["selectedTools"] = [*body.get("selectedTools", []), *tools]
        else:
            body["toolOverrides"] = {"add": tools}
    return CallRequest(agent_id=route.agent_id, body=body)


def ultravox_callbacks(url: str | None, secret: str | None) -> dict[str, Any] | None:
    """Per-call lifecycle callbacks to the gateway, signed with the webhook secret."""
    if not url or not secret:
        return None
    callback = {"url": url, "secrets": [secret]}
    return {"joined": callback, "ended": callback}


# How long a silent callee gets before the agent says the greeting itself.
USER_FIRST_FALLBACK_DELAY = "4s"


def _first_speaker(route: RouteSettings, agent_speaks_first: bool) -> dict[str, Any]:
    if not agent_speaks_first:
        if route.greeting:
            return {"user": {"fallback": {"delay": USER_FIRST_FALLBACK_DELAY, "text": route.greeting}}}
        return {"user": {}}
    return {"agent": {"text": route.greeting}} if route.greeting else {"agent": {}}


def template_context(mapping: Mapping[str, str], params: Mapping[str, str]) -> dict[str, Any]:
    """{"caller.number": "From"} and From=+1555… give {"caller": {"number": "+1555…"}}."""
    context: dict[str, Any] = {}
    for variable, source in mapping.items():
        if source not in params:
            continue
        *parents, leaf = variable.split(".")
        node = context
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = params[source]
    return context


def duration(seconds: float) -> str:
    """Protobuf duration text, e.g. 600 -> "600s", 90.5 -> "90.5s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}".rstrip("0") + "s"
