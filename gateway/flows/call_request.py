"""What Ultravox call to create for a route: the request body, carrier-agnostic."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..carriers.base import Carrier
from ..settings import RouteSettings, Settings
from ..store import CallRecord
from ..tools import transfer_tools
from ..ultravox import CallRequest
from ..urls import Urls


@dataclass(frozen=True)
class CallIdentity:
    """Which phone call an Ultravox call belongs to: written into its metadata."""

    carrier: str
    carrier_call_id: str | None
    call_id: str | None  # the gateway's record (None: created unrecorded during a store outage)
    route: str | None

    def metadata(self) -> dict[str, str]:
        values = {
            "gateway.carrier": self.carrier,
            "gateway.carrier_call_id": self.carrier_call_id,
            "gateway.call_id": self.call_id,
            "gateway.route": self.route,
        }
        return {key: value for key, value in values.items() if value}


class CallBodies:
    """The one builder of Ultravox call requests: inbound, outbound, and returns from a transfer."""

    def __init__(self, settings: Settings, urls: Urls):
        self.settings = settings
        self.urls = urls

    def _callbacks(self) -> dict[str, Any] | None:
        """Per-call lifecycle callbacks to the gateway, signed with the webhook secret."""
        url, secret = self.urls.ultravox_events(), self.settings.ultravox.webhook_secret
        if not url or not secret:
            return None
        callback = {"url": url, "secrets": [secret]}
        return {"joined": callback, "ended": callback}

    def for_route(
        self,
        route: RouteSettings,
        *,
        carrier: Carrier,
        identity: CallIdentity,
        medium: dict[str, Any],
        webhook_params: Mapping[str, str],
        agent_speaks_first: bool = True,
        extra_template_context: Mapping[str, Any] | None = None,
        extra_metadata: Mapping[str, str] | None = None,
        join_timeout_seconds: float | None = None,
        extra_tools: Sequence[dict[str, Any]] = (),
    ) -> CallRequest:
        """Body for StartAgentCallRequest (agent routes) or StartCallRequest (inline routes).

        The route's metadata (and the request's, `extra_metadata`) is kept beside the gateway's own;
        `extra_tools` (SelectedTools) join the transfer tools.
        """
        body: dict[str, Any] = copy.deepcopy(route.call) if route.call is not None else {}
        body["medium"] = medium
        first_speaker = _first_speaker(route, agent_speaks_first)
        if first_speaker is not None:
            body["firstSpeakerSettings"] = first_speaker
        body["metadata"] = {**body.get("metadata", {}), **route.metadata, **(extra_metadata or {}), **identity.metadata()}
        if route.max_duration_seconds is not None:
            body["maxDuration"] = duration(route.max_duration_seconds)
        if join_timeout_seconds is not None:
            body["joinTimeout"] = duration(join_timeout_seconds)
        if route.recording is not None:
            body["recordingEnabled"] = route.recording
        if route.voice is not None:
            body["voice"] = route.voice
        if route.agent_id is not None and (route.template_context or extra_template_context):
            body["templateContext"] = {
                **template_context(route.template_context, webhook_params), **(extra_template_context or {})
            }
        if callbacks := self._callbacks():
            body["callbacks"] = callbacks
        tools = transfer_tools(self.settings, self.urls, route.operators) if carrier.can_transfer else []
        tools = [*tools, *extra_tools]
        if tools:
            # Inline calls list their tools; agent calls add to the agent's own.
            if route.agent_id is None:
                body["selectedTools"] = [*body.get("selectedTools", []), *tools]
            else:
                body["toolOverrides"] = {"add": tools}
        return CallRequest(agent_id=route.agent_id, body=body)

    def continuation(
        self, record: CallRecord, *, medium: dict[str, Any], prior_call_id: str | None, prompt: str,
        extra_metadata: Mapping[str, str],
    ) -> CallRequest:
        """A new call for `record`'s phone call continuing `prior_call_id`'s conversation (its
        settings and messages), opened by the agent following `prompt`."""
        identity = CallIdentity(record.carrier, record.carrier_call_id, record.id, record.route)
        route = self.settings.route_named(record.route) if record.route else None
        body: dict[str, Any] = {
            "medium": medium,
            "firstSpeakerSettings": {"agent": {"prompt": prompt}},
            "metadata": {**(route.metadata if route else {}), **extra_metadata, **identity.metadata()},
        }
        if callbacks := self._callbacks():
            body["callbacks"] = callbacks
        return CallRequest(agent_id=None, body=body, prior_call_id=prior_call_id)


# How long a silent callee gets before the agent says the greeting itself.
USER_FIRST_FALLBACK_DELAY = "4s"


def _first_speaker(route: RouteSettings, agent_speaks_first: bool) -> dict[str, Any] | None:
    """The call's firstSpeakerSettings, or None to leave them to the agent (or the inline call)."""
    if route.greeting:
        if agent_speaks_first:
            return {"agent": {"text": route.greeting}}
        return {"user": {"fallback": {"delay": USER_FIRST_FALLBACK_DELAY, "text": route.greeting}}}
    # An agent route without a greeting of its own keeps the agent's settings: any value sent
    # here, even `agent: {}`, overrides them (StartAgentCallRequest.firstSpeakerSettings).
    if route.agent_id is not None or agent_speaks_first:
        return None
    # An inline call defaults to the agent speaking first (Ultravox's default): on a call the
    # gateway placed, the callee answers first.
    return {"user": {}}


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
