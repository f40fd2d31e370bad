"""SIGKILL of `gateway serve` while Ultravox calls are being created (issue 14, item 7): the records
a dead process left `creating` are settled by what Ultravox has for them, and a carrier retry after
the crash reuses the call made for it, never creating a second one. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from gateway.store import CallStore
from gateway.store.calls import utcnow
from gateway.testing import double
from gateway.testing.processes import GatewayProcess
from gateway.testing.ultravox import FakeResponse

from .conftest import BASE_CONFIG, SHARED_WORK, SUPPORT_NUMBER, gateway_environ, in_gateway_table, stored_calls

CARRIER = "twilio"


def deliver(url: str, form: dict[str, str]) -> httpx.Response | None:
    request = double(CARRIER).inbound_request("https://gateway.example.test", f"/{CARRIER}/inbound", form)
    try:
        return httpx.request(request.method, f"{url}/{CARRIER}/inbound", content=request.body,
                             headers=request.headers, timeout=10, trust_env=False)
    except httpx.TransportError:
        return None  # the gateway was killed under it


def make_sweep_due(database_url: str) -> None:
    async def update():
        store = CallStore.open(database_url)
        try:
            await store.database.transaction(lambda connection: connection.execute(
                sa.text("UPDATE jobs SET due_at = :now WHERE key LIKE '%AbandonedInbound%'"), {"now": utcnow()}))
        finally:
            await store.close()

    asyncio.run(update())


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_calls_being_created_when_the_gateway_is_killed_are_adopted_or_failed_never_made_twice(
        tmp_path: Path, fake_ultravox, fake_carriers, database_url):
    config = tmp_path / "gateway.toml"
    # The creations the victim held lapse 1 s after the inbound deadline (5 s by default).
    config.write_text(in_gateway_table(BASE_CONFIG, SHARED_WORK).replace(
        "[ultravox]\n", "[ultravox]\ncreating_lease_margin_seconds = 1\n", 1))
    environ = gateway_environ(fake_ultravox, database_url, fake_carriers, GATEWAY_PUBLIC_URL="https://gateway.example.test")
    release = threading.Event()
    fake_ultravox.script(*[FakeResponse(hold=release) for _ in range(3)])
    forms = [double(CARRIER).inbound_form(to=SUPPORT_NUMBER) for _ in range(3)]
    with GatewayProcess(config, environ, work_dir=tmp_path, name="victim") as victim:
        victim.start().wait_ready()
        senders = [threading.Thread(target=deliver, args=(victim.url, form)) for form in forms]
        for sender in senders:
            sender.start()
        wait_for(lambda: fake_ultravox.held_requests == 3)
        victim.kill()  # SIGKILL: the three creations are in flight at Ultravox
        victim.wait(10)
    release.set()  # Ultravox goes on and creates them: calls the dead gateway never recorded
    for sender in senders:
        sender.join(15)
    wait_for(lambda: fake_ultravox.calls_created == 3)
    records = {r.carrier_call_id: r for r in stored_calls(database_url)}
    assert {r.status for r in records.values()} == {"creating"}
    assert all(r.lease_owner and r.lease_until for r in records.values())
    by_record = {call["metadata"]["gateway.call_id"]: call for call in fake_ultravox.created_calls}
    ids = [forms[n][double(CARRIER).call_id_param] for n in range(3)]
    adopted, ended, _ = (records[i] for i in ids)
    fake_ultravox.end_call(by_record[ended.id]["callId"])  # that one timed out at Ultravox meanwhile

    with GatewayProcess(config, environ, work_dir=tmp_path, name="survivor") as survivor:
        survivor.start().wait_ready()
        wait_for(lambda: utcnow() > max(r.lease_until for r in records.values()), timeout=20)
        # The carrier retries the first call after the crash: the call made for it, not a new one.
        retry = deliver(survivor.url, forms[0])
        assert retry is not None and retry.status_code == 200
        assert by_record[adopted.id]["joinUrl"] in retry.text.replace("&amp;", "&")
        assert fake_ultravox.calls_created == 3
        # The sweep (any replica's work loop) settles the others; due now rather than in 30 s.
        make_sweep_due(database_url)
        settled = wait_for(lambda: (lambda rs: rs if all(r.status != "creating" for r in rs.values()) else None)(
            {r.carrier_call_id: r for r in stored_calls(database_url)}))
    assert settled[ids[0]].status == "in-progress" and settled[ids[0]].ultravox_call_id == by_record[adopted.id]["callId"]
    assert settled[ids[1]].status == "failed" and settled[ids[1]].ultravox_call_id == by_record[ended.id]["callId"]
    assert "ended unconnected" in settled[ids[1]].failure_reason
    # Ultravox had a live call for the third: adopted too, so a carrier retry would join it.
    assert settled[ids[2]].status == "in-progress" and settled[ids[2]].ultravox_call_id
    assert fake_ultravox.calls_created == 3
