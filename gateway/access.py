"""What an API key may do on /v1: the permission each operation needs, and which calls it sees.

Every /v1 route is in OPERATIONS (app.py builds the route table from it, and refuses a /v1 route
that is not), so no route can skip the check: `guarded` answers 401 without a known key and 403
without the permission, before the endpoint runs. Which calls a key sees is its CallScope, the one
predicate the store applies to every read of a call, its events and (through the call) its
campaign; a call outside it answers 404, as an unknown id does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .security import api_key_id, match_api_key
from .settings import PERMISSIONS, ApiKeySettings, Permission, Settings
from .store import CallScope

# (method, path) of every /v1 operation -> the permission it needs (None: public).
OPERATIONS: dict[tuple[str, str], Permission | None] = {
    ("GET", "/v1/openapi.json"): None,
    ("POST", "/v1/calls"): "dial",
    ("GET", "/v1/calls"): "read",
    ("GET", "/v1/calls/{call_id}"): "read",
    ("GET", "/v1/calls/{call_id}/recording"): "recordings",
    ("POST", "/v1/calls/{call_id}/hangup"): "control",
    ("POST", "/v1/calls/{call_id}/transfer"): "control",
    ("POST", "/v1/calls/{call_id}/messages"): "control",
    ("GET", "/v1/events"): "events",
    ("GET", "/v1/events/{event_id}"): "events",
    ("POST", "/v1/events/{event_id}/redeliver"): "events",
    ("GET", "/v1/webhooks"): "events",
    ("POST", "/v1/webhooks/{name}/enable"): "events",
    ("POST", "/v1/campaigns"): "campaigns",
    ("GET", "/v1/campaigns"): "campaigns",
    ("GET", "/v1/campaigns/{campaign_id}"): "campaigns",
    ("GET", "/v1/campaigns/{campaign_id}/rows"): "campaigns",
    ("POST", "/v1/campaigns/{campaign_id}/pause"): "campaigns",
    ("POST", "/v1/campaigns/{campaign_id}/resume"): "campaigns",
    ("POST", "/v1/campaigns/{campaign_id}/cancel"): "campaigns",
    ("POST", "/v1/suppressions"): "suppressions",
    ("GET", "/v1/suppressions"): "suppressions",
    ("DELETE", "/v1/suppressions/{number}"): "suppressions",
}

# What each permission opens, for the OpenAPI document and the README.
PERMISSION_MEANINGS: dict[str, str] = {
    "read": "list and read calls (GET /v1/calls, /v1/calls/{id})",
    "recordings": "download a call's recording",
    "dial": "place calls (POST /v1/calls)",
    "control": "hang up, cancel, transfer and message live calls",
    "campaigns": "start, read, pause, resume and cancel campaigns",
    "events": "read and redeliver events, list and re-enable webhook endpoints",
    "suppressions": "add to, read and remove from the suppression list",
}
assert set(PERMISSION_MEANINGS) == set(PERMISSIONS)


@dataclass(frozen=True)
class ApiAccess:
    """The key a request presented: its id (stored with the calls it places), name, permissions and scope."""

    key_id: str
    name: str
    permissions: frozenset[str]
    scope: CallScope | None  # None: every call

    @classmethod
    def of(cls, key: ApiKeySettings) -> "ApiAccess":
        key_id = api_key_id(key.key)
        scope = CallScope(routes=tuple(key.routes), carriers=tuple(key.carriers),
                          api_key_id=key_id if key.own_calls_only else None) if key.scoped else None
        return cls(key_id=key_id, name=key.name or key_id, permissions=frozenset(key.permissions), scope=scope)

    def dial_refusal(self, route: str | None, carrier: str) -> str | None:
        """Why this key may not place a call on `route` (None: an ad-hoc agent) through `carrier`, or None."""
        if self.scope is None:
            return None
        routes, carriers = self.scope.routes, self.scope.carriers
        if routes and route is None:
            return f"API key {self.name} dials only on its routes ({', '.join(routes)}): name one as route"
        if routes and route not in routes:
            return f"API key {self.name} may not dial on route {route!r}; its routes: {', '.join(routes)}"
        if carriers and carrier not in carriers:
            return f"API key {self.name} may not dial through {carrier}; its carriers: {', '.join(carriers)}"
        return None

    def sees_campaign(self, *, route: str | None, carrier: str, owner_key_id: str) -> bool:
        """Whether a campaign on `route` and `carrier`, created by the key `owner_key_id`, is in scope."""
        scope = self.scope
        if scope is None:
            return True
        if scope.api_key_id is not None and owner_key_id != scope.api_key_id:
            return False
        return self.dial_refusal(route, carrier) is None


def presented_access(request: Request, settings: Settings) -> ApiAccess | None:
    """The access of the key in `Authorization: Bearer KEY`, None without a known one."""
    keys = settings.api_keys
    key = match_api_key(request.headers.get("authorization"), [entry.key for entry in keys])
    return None if key is None else ApiAccess.of(next(entry for entry in keys if entry.key == key))


def unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "send Authorization: Bearer <an API key of GATEWAY_API_KEYS or [[api_keys]]>"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


def forbidden(access: ApiAccess, permission: str) -> JSONResponse:
    held = ", ".join(sorted(access.permissions)) or "none"
    return JSONResponse({"detail": f"API key {access.name} lacks the {permission} permission, needed to "
                                   f"{PERMISSION_MEANINGS[permission]}; it has: {held}"}, status_code=403)


Endpoint = Callable[[Request], Awaitable[Response]]


def guarded(settings: Settings, method: str, path: str, endpoint: Endpoint) -> Endpoint:
    """`endpoint` behind its operation's permission; KeyError for a /v1 operation not in OPERATIONS."""
    permission = OPERATIONS[(method, path)]
    if permission is None:
        return endpoint

    async def checked(request: Request) -> Response:
        access = presented_access(request, settings)
        if access is None:
            return unauthorized()
        if permission not in access.permissions:
            return forbidden(access, permission)
        request.state.api_access = access
        return await endpoint(request)

    return checked


def access_of(request: Request) -> ApiAccess:
    """The access `guarded` admitted the request with (an endpoint outside it has none: a bug)."""
    access = getattr(request.state, "api_access", None)
    if not isinstance(access, ApiAccess):
        raise RuntimeError(f"{request.url.path} is served without gateway.access.guarded")
    return access


def openapi_refusals(paths: dict[str, Any]) -> None:
    """Each operation's 401 and 403 (the permission it needs) in the OpenAPI document's `paths`."""
    for (method, path), permission in OPERATIONS.items():
        operation = paths.get(path, {}).get(method.lower())
        if operation is None or permission is None:
            continue
        responses = operation.setdefault("responses", {})
        responses.setdefault("401", {"description": "missing or unknown API key"})
        lacking = f"the API key lacks the `{permission}` permission ({PERMISSION_MEANINGS[permission]})"
        existing = responses.get("403", {}).get("description")
        responses["403"] = {"description": f"{lacking}; or {existing}" if existing else lacking}
        operation["x-permission"] = permission
