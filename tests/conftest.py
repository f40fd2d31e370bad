"""Fixtures: a fake Ultravox and the real gateway, both real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.carriers import CARRIERS
from gateway.http import tls_context
from gateway.settings import Settings, load_settings
from gateway.store import CallRecord, CallStore
from gateway.testing import FakeCarrier, FakeUltravox, ServerThread, double

from . import BYTECODE_FLAGS


def pytest_collection_finish(session):
    sys.dont_write_bytecode, sys.pycache_prefix = BYTECODE_FLAGS  # see tests/__init__.py


# Carriers by what a scenario needs of them; every per-carrier fact comes from double(name).
CARRIER_NAMES = list(CARRIERS)  # every carrier the gateway speaks
TRANSFER_CARRIERS = [name for name, c in CARRIERS.items() if c.can_transfer]  # can move a live call
ULTRAVOX_DIAL_CARRIERS = [name for name, c in CARRIERS.items() if c.ultravox_can_dial]  # via=ultravox
# Outbound calls that fetch an answer URL when the callee picks up (not dialled into the stream).
ANSWER_WEBHOOK_CARRIERS = [name for name, c in CARRIERS.items() if not c.dials_into_stream]
# Tell answering machines from people on the calls the gateway places (and those that cannot).
MACHINE_DETECTING_CARRIERS = [name for name, c in CARRIERS.items() if c.detects_machines]
NO_MACHINE_DETECTION_CARRIERS = [name for name in CARRIERS if name not in MACHINE_DETECTING_CARRIERS]
# Webhook signatures that cover the URL (a proxy's path prefix must be signed too), and the fields
# (a field changed on the way is noticed).
URL_SIGNING_CARRIERS = [name for name in CARRIERS if double(name).signs_url]
FORM_SIGNING_CARRIERS = [name for name in CARRIERS if double(name).signs_form]
# The gateway hangs their calls up through the REST API (not only by closing the media stream).
REST_HANGUP_CARRIERS = [name for name in CARRIERS if double(name).hangs_up_through_api]
UNREACHABLE = "http://127.0.0.1:9"  # a REST API base URL for carriers no fake serves
# A campaign at its concurrency looks at its live calls again after this (1 s by default): a test's
# callees hang up within a fraction of a second. Its [campaigns] table takes more keys after it.
CAMPAIGN_SETTLE = "\n[campaigns]\nsettle_seconds = 0.2\n"


def in_gateway_table(config: str, lines: str) -> str:
    """`config` with `lines` (TOML keys) at the top of its [gateway] table."""
    return config.replace("[gateway]\n", "[gateway]\n" + lines, 1)


# For `gateway serve` processes on one store that take work over from each other (one killed, a
# test ageing a job): each sees a job another wrote or left within 0.2 s, not 1 s.
SHARED_WORK = "work_poll_seconds = 0.2\n"

API_KEY = "test-api-key-0123456789"
OTHER_API_KEY = "other-api-key-9876543210"
WEBHOOK_SECRET = "ultravox-webhook-secret"
TOOL_SECRET = "gateway-tool-secret-for-tests"
PUBLIC_URL = "https://gateway.example.test"
AGENT_ID = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
SUPPORT_NUMBER = "+15550001111"
INLINE_NUMBER = "+15550002222"

# What each carrier needs in the config file beyond its environment, and one number it owns.
CARRIER_CONFIG = "".join(double(name).config_toml() for name in CARRIERS)
OUTBOUND_NUMBERS = "".join(f'{name} = ["{double(name).own_number}"]\n' for name in CARRIERS)

BASE_CONFIG = f"""
[gateway]
max_body_bytes = 8192

[ultravox]
inbound_deadline_seconds = 2.0
request_timeout_seconds = 1.5

[fallback]
message = "Sorry, our assistant is unavailable."
no_route_message = "This number is not in service."

{CARRIER_CONFIG}
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
{OUTBOUND_NUMBERS}
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
    """A running gateway plus a way to send it webhooks the way each carrier sends and signs them."""

    server: ServerThread
    settings: Settings
    client: httpx.Client = field(default=None)

    def __post_init__(self):
        self.client = httpx.Client(base_url=self.server.url, timeout=30, verify=tls_context())

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
        """Deliver `form` to `path` (default: the carrier's inbound webhook) as the carrier would:
        its method and encoding, signed over `public_url` unless `sign` is false; `headers` win."""
        path = path or f"/{carrier}/inbound"
        target = path + (f"?{query}" if query else "")
        request = double(carrier).inbound_request(
            public_url or self.settings.public_url, target, form, body=body, signed=sign
        )
        url = target.partition("?")[0] + (f"?{request.query}" if request.query else "")
        all_headers = {**request.headers, **(headers or {})}
        return self.client.request(request.method, url, content=request.body, headers=all_headers)

    def close(self):
        self.client.close()
        self.server.stop()


def sign_headers(carrier: str, url: str, form: dict[str, str], raw: bytes) -> dict[str, str]:
    """The signature headers `carrier` sends with `form` (`raw`: its body) to `url`."""
    return double(carrier).sign(url, form, raw)


def gateway_environ(
    fake: FakeUltravox, database_url: str, carriers: dict[str, FakeCarrier] | None = None, **extra: str
) -> dict[str, str]:
    """The gateway's environment: each carrier's test credentials, its REST API at its fake in `carriers`."""
    carriers = carriers or {}
    environ = {
        "GATEWAY_PUBLIC_URL": PUBLIC_URL,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
        "ULTRAVOX_API_KEY": fake.api_key,
        "ULTRAVOX_BASE_URL": fake.base_url,
        "ULTRAVOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GATEWAY_TOOL_SECRET": TOOL_SECRET,
    }
    for name in CARRIERS:
        api_base_url = getattr(carriers.get(name), "base_url", None) or UNREACHABLE
        environ.update(double(name).environ(api_base_url))
    return {**environ, **extra}


@pytest.fixture(scope="session")
def _fake_carrier_servers():
    fakes = {name: double(name).fake_api() for name in CARRIERS}
    servers = [fake.serve() for fake in fakes.values()]
    yield fakes
    for fake, server in zip(fakes.values(), servers):
        fake.close()
        server.stop()


@pytest.fixture
def fake_carriers(_fake_carrier_servers) -> dict[str, FakeCarrier]:
    """Each carrier's fake REST API, by name, calling the gateway back as the carrier does."""
    for fake in _fake_carrier_servers.values():
        fake.reset()
        fake.public_url = PUBLIC_URL
    return _fake_carrier_servers


@pytest.fixture(scope="session")
def _migrated_sqlite(tmp_path_factory) -> Path:
    """An SQLite database file with every migration applied and no rows, made once per process:
    a copy of it is a new store without the migrations' cost (tens of ms and several fsyncs each)."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"

    async def migrate():
        store = CallStore.open(f"sqlite:///{path}")
        try:
            await store.migrate()
        finally:
            await store.close()  # the last connection closed: the WAL is folded into the file

    asyncio.run(migrate())
    return path


def new_sqlite_url(path: Path, migrated: Path) -> str:
    """The URL of an empty, migrated SQLite store at `path` (left as it is if it exists already)."""
    if not path.exists():
        shutil.copyfile(migrated, path)
    return f"sqlite:///{path}"


@pytest.fixture
def make_gateway(tmp_path: Path, fake_ultravox: FakeUltravox, _fake_carrier_servers, _migrated_sqlite):
    started: list[Gateway] = []

    def make(extra_config: str = "", *, database_url: str | None = None, config: str | None = None, **environ: str):
        config_path = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}.toml"
        config_path.write_text((BASE_CONFIG if config is None else config) + extra_config)
        database_url = database_url or new_sqlite_url(tmp_path / "gateway.db", _migrated_sqlite)
        # These gateways send their events themselves: a delivery process per test would take a
        # second or more to start (seconds on a busy machine) before the first delivery. The
        # delivery process is tested on `gateway serve` (test_delivery_process.py, the kill tests).
        environ = gateway_environ(fake_ultravox, database_url, _fake_carrier_servers,
                                  **{"GATEWAY_DELIVERY_PROCESS": "false", **environ})
        settings = load_settings(config_path, environ)
        server = ServerThread(create_app(settings)).start()
        gateway = Gateway(server=server, settings=settings)
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


@contextlib.contextmanager
def new_postgres_database(prefix: str):
    """A fresh PostgreSQL database, dropped afterwards: (its URL, its name, `admin(*statements)`
    running statements on the server's admin database). Skipped when no PostgreSQL answers, unless
    GATEWAY_REQUIRE_POSTGRES=1 (as in .ci/run)."""
    import asyncpg

    admin_url = postgres_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(*statements: str) -> None:
        connection = await asyncpg.connect(admin_url, timeout=5)
        try:
            for statement in statements:
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
    try:
        yield f"{base}/{name}", name, admin
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_database_url():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with new_postgres_database("gateway_test") as (url, _, _):
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path, _migrated_sqlite):
    """The store on SQLite and on PostgreSQL, from empty tables."""
    if request.param == "sqlite":
        return new_sqlite_url(tmp_path / "store.db", _migrated_sqlite)
    url = request.getfixturevalue("postgres_database_url")
    # Each test starts from empty tables on the session's database.
    async def clear():
        store = CallStore.open(url)
        await store.migrate()
        def delete(connection):
            for table in ("campaign_rows", "campaigns", "suppressions", "jobs", "delivery_attempts", "deliveries", "events",
                          "webhook_endpoints", "transfers", "calls"):
                connection.exec_driver_sql(f"DELETE FROM {table}")

        await store.database.transaction(delete)
        await store.close()

    asyncio.run(clear())
    return url
