"""Fixtures: a fake Ultravox and the real gateway, both real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings, load_settings
from gateway.store import CallRecord, CallStore
from gateway.testing import (
    FakePlivo,
    FakeTelnyx,
    FakeTwilio,
    FakeUltravox,
    ServerThread,
    TelnyxSigner,
    plivo_v3_headers,
    twilio_signature,
)

TWILIO_TOKEN = "twilio-test-auth-token"
TWILIO_ACCOUNT = "AC" + "0" * 32
TELNYX_API_KEY = "test-telnyx-key"
TELNYX_ACCOUNT = "0b2f3c4d-1111-4222-8333-444455556666"
PLIVO_AUTH_ID = "MA" + "0" * 18
API_KEY = "test-api-key-0123456789"
OTHER_API_KEY = "other-api-key-9876543210"
WEBHOOK_SECRET = "ultravox-webhook-secret"
TOOL_SECRET = "gateway-tool-secret-for-tests"
PLIVO_TOKEN = "plivo-test-auth-token"
PUBLIC_URL = "https://gateway.example.test"
AGENT_ID = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
SUPPORT_NUMBER = "+15550001111"
INLINE_NUMBER = "+15550002222"

BASE_CONFIG = f"""
[gateway]
max_body_bytes = 8192

[ultravox]
inbound_deadline_seconds = 2.0
request_timeout_seconds = 1.5

[fallback]
message = "Sorry, our assistant is unavailable."
no_route_message = "This number is not in service."

[telnyx]
account_sid = "0b2f3c4d-1111-4222-8333-444455556666"
texml_application_id = "1234567890"

[operators.sales]
number = "+15557770001"
description = "Sales team: pricing and new orders"
ring_timeout_seconds = 15
fallback = "frontdesk"

[operators.frontdesk]
number = "+15557770002"
description = "Front desk"

[operators.billing]
sip = "sip:billing@pbx.example.com"
description = "Billing questions"
hours = ["mon 00:00-00:01"]
timezone = "Pacific/Kiritimati"

[operators.nightowl]
number = "+15557770003"
description = "After-hours line"

[outbound]
ring_timeout_seconds = 25

[outbound.numbers]
twilio = ["+15550001111"]
telnyx = ["+15550003333"]
plivo = ["+15550004444"]

[outbound.policy]
allowed_prefixes = ["+1", "+44"]
calls_per_minute_per_key = 5

[[routes]]
number = "{SUPPORT_NUMBER}"
name = "support"
agent_id = "{AGENT_ID}"
greeting = "Hello, thanks for calling."
max_duration_seconds = 600
recording = true
operators = ["sales", "frontdesk", "billing"]

[routes.template_context]
"caller.number" = "from_number"
"caller.city" = "FromCity"

[routes.metadata]
team = "support"

[[routes]]
number = "{INLINE_NUMBER}"
name = "inline"

[routes.call]
systemPrompt = "You are a helpful receptionist."
voice = "Mark"
temperature = 0.3
"""


@pytest.fixture(scope="session")
def telnyx_signer() -> TelnyxSigner:
    return TelnyxSigner.generate()


@pytest.fixture(scope="session")
def _fake_ultravox_server():
    fake = FakeUltravox()
    with fake.serve() as server:
        yield fake, server


@pytest.fixture
def fake_ultravox(_fake_ultravox_server) -> FakeUltravox:
    fake, server = _fake_ultravox_server
    fake.reset()
    fake.base_url = server.url
    yield fake
    assert fake.schema_errors == [], "the gateway sent Ultravox a body that does not match its OpenAPI schema"


@dataclass
class Gateway:
    """A running gateway plus a way to send it webhooks signed the way each carrier signs them."""

    server: ServerThread
    settings: Settings
    telnyx_signer: TelnyxSigner
    client: httpx.Client = field(default=None)

    def __post_init__(self):
        self.client = httpx.Client(base_url=self.server.url, timeout=30)

    def records(self) -> list[CallRecord]:
        """Every stored call, read through a store of our own (the server's lives on its own loop)."""
        return stored_calls(self.settings.database_url)

    def post(
        self,
        carrier: str,
        form: dict[str, str],
        *,
        path: str | None = None,
        query: str = "",
        public_url: str | None = None,
        headers: dict[str, str] | None = None,
        sign: bool = True,
        body: bytes | None = None,
    ) -> httpx.Response:
        path = path or f"/{carrier}/inbound"
        target = path + (f"?{query}" if query else "")
        raw = body if body is not None else urlencode(form).encode()
        signed_url = (public_url or self.settings.public_url) + target
        all_headers = {"content-type": "application/x-www-form-urlencoded"}
        if sign:
            all_headers.update(sign_headers(carrier, signed_url, form, raw, self.telnyx_signer))
        all_headers.update(headers or {})
        return self.client.post(target, content=raw, headers=all_headers)

    def close(self):
        self.client.close()
        self.server.stop()


def sign_headers(carrier: str, url: str, form: dict[str, str], raw: bytes, signer: TelnyxSigner) -> dict[str, str]:
    if carrier == "twilio":
        return {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url, form)}
    if carrier == "telnyx":
        return signer.headers(raw)
    if carrier == "plivo":
        return plivo_v3_headers(PLIVO_TOKEN, url, form)
    raise ValueError(carrier)


def gateway_environ(
    fake: FakeUltravox, signer: TelnyxSigner, database_url: str, carriers: dict | None = None, **extra: str
) -> dict[str, str]:
    carriers = carriers or {}
    return {
        "GATEWAY_PUBLIC_URL": PUBLIC_URL,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
        "ULTRAVOX_API_KEY": fake.api_key,
        "ULTRAVOX_BASE_URL": fake.base_url,
        "ULTRAVOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GATEWAY_TOOL_SECRET": TOOL_SECRET,
        "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_API_BASE_URL": getattr(carriers.get("twilio"), "base_url", None) or "http://127.0.0.1:9",
        "TELNYX_API_KEY": TELNYX_API_KEY,
        "TELNYX_PUBLIC_KEY": signer.public_key_b64,
        "TELNYX_API_BASE_URL": getattr(carriers.get("telnyx"), "base_url", None) or "http://127.0.0.1:9",
        "PLIVO_AUTH_ID": PLIVO_AUTH_ID,
        "PLIVO_AUTH_TOKEN": PLIVO_TOKEN,
        "PLIVO_API_BASE_URL": getattr(carriers.get("plivo"), "base_url", None) or "http://127.0.0.1:9",
        **extra,
    }


@pytest.fixture(scope="session")
def _fake_carrier_servers(telnyx_signer):
    fakes = {
        "twilio": FakeTwilio(TWILIO_ACCOUNT, TWILIO_TOKEN),
        "telnyx": FakeTelnyx(TELNYX_API_KEY, telnyx_signer, TELNYX_ACCOUNT),
        "plivo": FakePlivo(PLIVO_AUTH_ID, PLIVO_TOKEN),
    }
    servers = [fake.serve() for fake in fakes.values()]
    yield fakes
    for fake, server in zip(fakes.values(), servers):
        fake.close()
        server.stop()


@pytest.fixture
def fake_carriers(_fake_carrier_servers) -> dict:
    """Fake Twilio, Telnyx and Plivo REST APIs that call the gateway back as the carriers do."""
    for fake in _fake_carrier_servers.values():
        fake.reset()
        fake.public_url = PUBLIC_URL
    return _fake_carrier_servers


@pytest.fixture
def make_gateway(tmp_path: Path, fake_ultravox: FakeUltravox, telnyx_signer: TelnyxSigner, _fake_carrier_servers):
    started: list[Gateway] = []

    def make(extra_config: str = "", *, database_url: str | None = None, config: str | None = None, **environ: str):
        config_path = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}.toml"
        config_path.write_text((BASE_CONFIG if config is None else config) + extra_config)
        database_url = database_url or f"sqlite:///{tmp_path / 'gateway.db'}"
        environ = gateway_environ(fake_ultravox, telnyx_signer, database_url, _fake_carrier_servers, **environ)
        settings = load_settings(config_path, environ)
        server = ServerThread(create_app(settings)).start()
        gateway = Gateway(server=server, settings=settings, telnyx_signer=telnyx_signer)
        for fake in _fake_carrier_servers.values():
            fake.deliver_to = server.url  # the carriers call back the gateway started last
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.close()


@pytest.fixture
def gateway(make_gateway) -> Gateway:
    return make_gateway()


def stored_calls(database_url: str) -> list[CallRecord]:
    async def read() -> list[CallRecord]:
        store = CallStore.open(database_url)
        try:
            await store.migrate()
            return await store.list_all()
        finally:
            await store.close()

    return asyncio.run(read())


def postgres_url() -> str:
    return os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


@pytest.fixture(scope="session")
def postgres_database_url():
    """A fresh PostgreSQL database for this test session, dropped afterwards.

    Skipped when no PostgreSQL answers, unless GATEWAY_REQUIRE_POSTGRES=1 (as in .ci/run).
    """
    import asyncpg

    admin_url = postgres_url()
    name = f"gateway_test_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(admin_url, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as error:
        if os.environ.get("GATEWAY_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"PostgreSQL not available at {admin_url}: {error}")
    base, _, _ = admin_url.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
