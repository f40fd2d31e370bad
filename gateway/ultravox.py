"""Ultravox REST client: one pooled httpx.AsyncClient, a deadline per call, retries that respect it."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Mapping

import httpx

from . import inputs
from .http import RemoteError, RetryPolicy, create_client, post_with_retries, request_with_retries
from .security import WebhookRejected, verify_ultravox_webhook
from .settings import UltravoxSettings

@dataclass(frozen=True)
class CallRequest:
    """A call for Ultravox to create; see gateway.flows.call_request for how bodies are built."""

    agent_id: str | None  # None: an inline call (POST /api/calls)
    body: dict[str, Any]
    prior_call_id: str | None = None  # continue that call's conversation (?priorCallId=)


class UltravoxError(RemoteError):
    """The call could not be created; `reason` is short and safe to store."""


class UltravoxCallInactive(UltravoxError):
    """Ultravox no longer runs the call (a data message to it answered 422)."""


@dataclass(frozen=True)
class AccountCapacity:
    allowed: int | None  # allowedConcurrentCalls
    active: int  # activeCalls


@dataclass(frozen=True)
class CreatedCall:
    call_id: str
    join_url: str


def create_http_client(settings: UltravoxSettings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The process-wide Ultravox client."""
    return create_client(
        pool_size=settings.pool_size,
        timeout=settings.request_timeout_seconds,
        base_url=settings.base_url,
        headers={"X-API-Key": settings.api_key or "", "Content-Type": "application/json"},
        transport=transport,
    )


class UltravoxClient:
    def __init__(self, http: httpx.AsyncClient, settings: UltravoxSettings, clock=time.monotonic):
        self._http = http
        self._settings = settings
        self._policy = RetryPolicy(settings.max_attempts, settings.request_timeout_seconds, clock)

    async def create_call(self, request: CallRequest, *, deadline: float) -> CreatedCall:
        """Create an Ultravox call, retrying 429/503 and connection failures while `deadline` allows.

        `deadline` is a value of the client's monotonic clock.
        """
        if not self._settings.api_key:
            raise UltravoxError("ULTRAVOX_API_KEY is not configured")
        path = f"/api/agents/{request.agent_id}/calls" if request.agent_id else "/api/calls"
        params = {"priorCallId": request.prior_call_id} if request.prior_call_id else None
        try:
            response = await post_with_retries(
                self._http, path, service="Ultravox", policy=self._policy, deadline=deadline, json=request.body,
                params=params,
            )
        except RemoteError as error:
            raise UltravoxError(error.reason, over_capacity=error.over_capacity, retry_after=error.retry_after) from None
        return _created_call(response)

    async def tell_agent(self, call_id: str, text: str, *, deadline: float) -> None:
        """Tell a live call's agent something it must act on now (a user_text_message it answers)."""
        await self.send_data_message(call_id, {"type": "user_text_message", "text": text, "urgency": "immediate"},
                                     deadline=deadline)

    async def send_data_message(self, call_id: str, message: dict[str, Any], *, deadline: float) -> None:
        """Inject a message into a live call (204), e.g. to tell the agent what happened meanwhile."""
        try:
            response = await post_with_retries(
                self._http, f"/api/calls/{call_id}/send_data_message", service="Ultravox", policy=self._policy,
                deadline=deadline, json=message,
            )
        except RemoteError as error:
            raise UltravoxError(error.reason) from None
        if response.status_code == 422:  # "if the call is not active" (Ultravox's data-message docs)
            raise UltravoxCallInactive("the Ultravox call is not active")
        if response.status_code != 204:
            raise UltravoxError(f"Ultravox answered {response.status_code} to a data message")

    async def end_call(self, call_id: str, *, deadline: float) -> None:
        """End a live call. Ultravox has no end-call endpoint (DELETE /api/calls/{id} deletes the call's
        record): its `hang_up` data message makes the agent hang up. A call already ended counts as success."""
        try:
            await self.send_data_message(call_id, {"type": "hang_up"}, deadline=deadline)
        except UltravoxCallInactive:
            pass


    async def call_report(self, call_id: str, *, deadline: float) -> "CallReport | None":
        """What Ultravox has on a call after it (summary, transcript); None: it does not know the call."""
        call = await self._get(f"/api/calls/{call_id}", deadline=deadline)
        if call is None:
            return None
        transcript: list[dict[str, Any]] = []
        params: dict[str, Any] = {"pageSize": MESSAGES_PAGE}
        for _ in range(MAX_MESSAGE_PAGES):
            page = await self._get(f"/api/calls/{call_id}/messages", deadline=deadline, params=params)
            results = page.get("results") if isinstance(page, dict) else None
            if not isinstance(results, list):
                break
            transcript += [line for line in map(transcript_line, results) if line is not None]
            cursor = _cursor_of(page.get("next"))
            if cursor is None:
                break
            params = {"pageSize": MESSAGES_PAGE, "cursor": cursor}
        return CallReport(
            ended=_time(call.get("ended")), summary=_text(call.get("summary")),
            short_summary=_text(call.get("shortSummary")), end_reason=_text(call.get("endReason")),
            transcript=tuple(transcript),
        )

    async def find_call(self, metadata_key: str, value: str, *, deadline: float,
                        also: dict[str, str] | None = None) -> "FoundCall | None":
        """The Ultravox call whose metadata has `metadata_key` = `value` (the gateway writes its own
        record id into each call's metadata), found with the list's metadata filter; None: none.
        `also`: more metadata the call must have (checked here, not filtered by Ultravox)."""
        page = await self._get("/api/calls", deadline=deadline, params={f"metadata.{metadata_key}": value, "pageSize": 5})
        results = page.get("results") if isinstance(page, dict) else None
        wanted = {metadata_key: value, **(also or {})}
        for call in results if isinstance(results, list) else []:
            # Checked here too: a filter the service ignored must not adopt some other call.
            metadata = (call.get("metadata") or {}) if isinstance(call, dict) else {}
            if isinstance(metadata, dict) and all(metadata.get(k) == v for k, v in wanted.items()) and call.get("callId"):
                join_url = call.get("joinUrl")
                return FoundCall(str(call["callId"]), join_url if isinstance(join_url, str) else None,
                                 ended=call.get("ended") is not None)
        return None

    async def account_capacity(self, *, deadline: float) -> "AccountCapacity":
        """The account's concurrent-call limit (None: Ultravox states none) and its live calls."""
        account = await self._get("/api/accounts/me", deadline=deadline)
        if not isinstance(account, dict):
            raise UltravoxError("Ultravox sent no account")
        allowed = account.get("allowedConcurrentCalls")
        return AccountCapacity(allowed if isinstance(allowed, int) else None, int(account.get("activeCalls") or 0))

    async def _get(self, path: str, *, deadline: float, params: dict[str, Any] | None = None) -> Any:
        if not self._settings.api_key:
            raise UltravoxError("ULTRAVOX_API_KEY is not configured")
        try:
            response = await request_with_retries(
                self._http, "GET", path, service="Ultravox", policy=self._policy, deadline=deadline, params=params)
        except RemoteError as error:
            raise UltravoxError(error.reason) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise UltravoxError(f"Ultravox answered {response.status_code} to GET {path}")
        try:
            return response.json()
        except ValueError:
            raise UltravoxError(f"Ultravox answered GET {path} with a body that is not JSON") from None


MESSAGES_PAGE = 200
MAX_MESSAGE_PAGES = 20  # a transcript of up to 4,000 messages; longer ones are cut


@dataclass(frozen=True)
class FoundCall:
    call_id: str
    join_url: str | None
    ended: bool


@dataclass(frozen=True)
class CallReport:
    ended: dt.datetime | None  # None: Ultravox has the call as still going
    summary: str | None
    short_summary: str | None
    end_reason: str | None
    transcript: tuple[dict[str, Any], ...]


# Ultravox's message roles, as the gateway's events name them.
ROLES = {"MESSAGE_ROLE_USER": "user", "MESSAGE_ROLE_AGENT": "agent", "MESSAGE_ROLE_TOOL_CALL": "tool_call",
         "MESSAGE_ROLE_TOOL_RESULT": "tool_result"}


def transcript_line(message: Any) -> dict[str, Any] | None:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        return None
    line: dict[str, Any] = {"role": ROLES[message["role"]], "text": _text(message.get("text")) or ""}
    medium = message.get("medium")
    if medium in ("MESSAGE_MEDIUM_VOICE", "MESSAGE_MEDIUM_TEXT"):
        line["medium"] = medium.removeprefix("MESSAGE_MEDIUM_").lower()
    if _text(message.get("toolName")):
        line["tool_name"] = message["toolName"]
    return line


def _cursor_of(next_url: Any) -> str | None:
    if not isinstance(next_url, str) or not next_url:
        return None
    return httpx.URL(next_url).params.get("cursor")


def _created_call(response: httpx.Response) -> CreatedCall:
    if response.status_code not in (200, 201):
        detail = response.text[:200].replace("\n", " ")
        raise UltravoxError(f"Ultravox answered {response.status_code}: {detail}")
    try:
        payload = response.json()
    except ValueError:
        raise UltravoxError("Ultravox answered with a body that is not JSON") from None
    join_url = payload.get("joinUrl") if isinstance(payload, dict) else None
    call_id = payload.get("callId") if isinstance(payload, dict) else None
    if not isinstance(join_url, str) or not join_url.startswith(("wss://", "ws://")):
        raise UltravoxError("Ultravox answered without a usable joinUrl")
    return CreatedCall(call_id=str(call_id or ""), join_url=join_url)


# --- Ultravox's call events (per-call callbacks and account webhooks) ------------------------------


class EventRejected(Exception):
    """Not an event the gateway accepts; answer `status` and change nothing."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Ultravox call ids are UUIDs; anything much longer is not one.
MAX_CALL_ID_LENGTH = 200


@dataclass(frozen=True)
class UltravoxEvent:
    name: str  # call.joined, call.ended, …
    call_id: str
    end_reason: str | None = None
    summary: str | None = None
    joined: dt.datetime | None = None
    ended: dt.datetime | None = None

    @property
    def duration_seconds(self) -> int | None:
        if self.joined is None or self.ended is None:
            return None
        return max(0, round((self.ended - self.joined).total_seconds()))


def read_event(settings: UltravoxSettings, body: bytes, headers: Mapping[str, str]) -> UltravoxEvent:
    """A signed event from Ultravox, checked (signature, age) and parsed. Raises EventRejected."""
    if not settings.webhook_secret:
        raise EventRejected(403, "ULTRAVOX_WEBHOOK_SECRET is not configured on this gateway")
    try:
        verify_ultravox_webhook(
            settings.webhook_secret, body, headers.get("x-ultravox-webhook-timestamp"),
            headers.get("x-ultravox-webhook-signature"), tolerance_seconds=settings.webhook_tolerance_seconds,
        )
    except WebhookRejected as rejection:
        raise EventRejected(403, str(rejection)) from None
    try:
        event = inputs.json_document(body)
        name, call = event["event"], event["call"]
        call_id = call["callId"]
        if not isinstance(name, str) or not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_LENGTH:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise EventRejected(400, 'expected {"event": …, "call": {"callId": …}}') from None
    if inputs.controls_anywhere(event):  # PostgreSQL refuses a NUL in text; nothing Ultravox sends has one
        raise EventRejected(400, "the event holds NUL or another control character")
    return UltravoxEvent(
        name=name,
        call_id=call_id,
        end_reason=_text(call.get("endReason")),
        summary=_text(call.get("summary")) or _text(call.get("shortSummary")),
        joined=_time(call.get("joined")),
        ended=_time(call.get("ended")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> dt.datetime | None:
    # Always aware: a naive `joined` less an aware `ended` raised TypeError (a 500).
    return inputs.timestamp_or_none(value)
