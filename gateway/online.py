"""`gateway check --online`: each remote service the configuration names, reached with its
credentials, and what works. Ultravox's account (GET /api/accounts/me) proves the API key; each
configured carrier's account read (its `read_account`) proves its REST credentials."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import httpx

from .carriers import CARRIERS, Carrier
from .http import RemoteError, create_client, transport_problem
from .settings import Settings

TIMEOUT_SECONDS = 10.0

Outcome = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Probe:
    """What one service answered."""

    service: str  # "Ultravox", or a carrier's title
    outcome: Outcome
    detail: str

    def line(self) -> str:
        return f"  {self.outcome.upper() if self.outcome == 'failed' else self.outcome:<8}{self.service:<10}{self.detail}"


async def probe_ultravox(settings: Settings, http: httpx.AsyncClient, *, timeout: float = TIMEOUT_SECONDS) -> Probe:
    config = settings.ultravox
    if not config.api_key:
        return Probe("Ultravox", "failed", "ULTRAVOX_API_KEY is not set: every call would get the spoken apology")
    url = f"{config.base_url.rstrip('/')}/api/accounts/me"
    try:
        response = await http.get(url, headers={"X-API-Key": config.api_key}, timeout=timeout)
    except httpx.HTTPError as error:
        return Probe("Ultravox", "failed", f"cannot reach {config.base_url} ({transport_problem(error)}): check "
                     "ULTRAVOX_BASE_URL and this machine's network")
    if response.status_code in (401, 403):
        return Probe("Ultravox", "failed", f"{config.base_url} refused the API key ({response.status_code}): check "
                     "ULTRAVOX_API_KEY (the Ultravox console's API keys)")
    if response.status_code != 200:
        return Probe("Ultravox", "failed", f"{url} answered {response.status_code}: {response.text[:200]}")
    try:
        account = response.json()
    except ValueError:
        account = None
    if not isinstance(account, dict):
        return Probe("Ultravox", "failed", f"{url} answered with a body that is not a JSON object")
    return Probe("Ultravox", "ok", f"{config.base_url}: the API key works (account {account.get('name')!r}, "
                 f"{account.get('activeCalls', 0)} live calls)")


async def probe_carrier(carrier: Carrier, http: httpx.AsyncClient, *, timeout: float = TIMEOUT_SECONDS) -> Probe:
    if not carrier.rest_keys:
        return Probe(carrier.title, "skipped", "no REST API to check")
    missing = [key for key in carrier.rest_keys if not getattr(carrier.config, key)]
    if len(missing) == len(carrier.rest_keys):
        return Probe(carrier.title, "skipped", f"not configured ({', '.join(carrier.variables(tuple(missing)))} not set)")
    if missing:
        return Probe(carrier.title, "failed", f"{', '.join(carrier.variables(tuple(missing)))} not set: the REST "
                     "credentials are incomplete")
    try:
        description = await carrier.read_account(http, timeout=timeout)
    except RemoteError as error:
        return Probe(carrier.title, "failed", error.reason)
    return Probe(carrier.title, "ok", f"{carrier.config.api_base_url}: {description}")


async def check_online(settings: Settings, *, timeout: float = TIMEOUT_SECONDS) -> list[Probe]:
    """Every service, at once; Ultravox first, then the carriers in the registry's order."""
    carriers = [cls(settings) for cls in CARRIERS.values()]
    # The gateway's own kind of client: what this check reaches is what `gateway serve` reaches.
    async with create_client(pool_size=len(carriers) + 1, timeout=timeout) as http:
        return list(await asyncio.gather(
            probe_ultravox(settings, http, timeout=timeout),
            *(probe_carrier(carrier, http, timeout=timeout) for carrier in carriers),
        ))
