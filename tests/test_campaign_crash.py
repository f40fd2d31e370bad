"""SIGKILL of `gateway serve` while a campaign's dials are in flight at the carrier (issue 11, item 4):
the attempts the dead process recorded but never saw answered are looked up at the carrier. The
call the carrier has is adopted (the row follows it); a dial the carrier never placed is dialled
again without counting the attempt. Each row is dialled exactly once, counted at the fake carrier.
On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import sqlalchemy as sa

from gateway.store import CallStore
from gateway.store.calls import utcnow
from gateway.testing.callees import Callees
from gateway.testing.processes import GatewayProcess
from gateway.testing.ultravox import FakeResponse

from .conftest import API_KEY, BASE_CONFIG, CAMPAIGN_SETTLE, SHARED_WORK, gateway_environ, in_gateway_table, stored_calls

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CARRIER = "twilio"  # its call list is what the gateway asks
WAIT_SECONDS = 60


def wait_for(predicate, what: str, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def age_unplaced_dials_and_wake_the_sweep(database_url: str) -> None:
    """What 30 s of waiting would do: the dead process's unplaced dials are old enough to settle,
    the outbound sweep is due, and the dead process's lease on the dispatch job has lapsed."""

    async def update():
        store = CallStore.open(database_url)
        try:
            now = utcnow()
            def run(connection):
                connection.execute(sa.text("UPDATE calls SET created_at = :then WHERE status = 'queued' "
                                           "AND placed_at IS NULL"), {"then": now - dt.timedelta(minutes=1)})
                connection.execute(sa.text("UPDATE jobs SET due_at = :now WHERE key LIKE '%AbandonedOutbound%'"),
                                   {"now": now})
                connection.execute(sa.text("UPDATE jobs SET lease_until = :now WHERE key LIKE 'campaign:%'"),
                                   {"now": now})
            await store.database.transaction(run)
        finally:
            await store.close()

    asyncio.run(update())


def test_dials_in_flight_when_the_gateway_is_killed_are_adopted_or_redialled_never_twice(
        tmp_path: Path, fake_ultravox, fake_carriers, database_url):
    fake = fake_carriers[CARRIER]
    config = tmp_path / "gateway.toml"
    config.write_text(in_gateway_table(BASE_CONFIG, SHARED_WORK) + CAMPAIGN_SETTLE)
    environ = gateway_environ(fake_ultravox, database_url, fake_carriers)
    release = threading.Event()
    # Both dials reach the carrier and wait there; then the carrier places the first to have come
    # (its answer goes to a dead process) and refuses the other (no call). Which row's came first is
    # the machine's choice: the rows are told apart below by the call the carrier placed.
    fake.script(FakeResponse(hold=release), FakeResponse(status=500, hold=release))
    listed = ["+15557009001", "+15557009002"]
    with GatewayProcess(config, environ, work_dir=tmp_path, name="victim") as victim:
        victim.start().wait_ready()
        body = {"name": "crash", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
                "max_concurrency": 2, "rows": [{"to": number} for number in listed]}
        response = httpx.post(f"{victim.url}/v1/campaigns", json=body, headers=AUTH, timeout=10, trust_env=False)
        assert response.status_code == 201, response.text
        campaign_id = response.json()["id"]
        wait_for(lambda: fake.held_requests == 2, "both dials at the carrier")
        victim.kill()
        victim.wait(10)
    release.set()
    wait_for(lambda: len(fake.calls) == 1, "the carrier to place the first dial")
    placed = fake.calls[0]
    before = {record.to_number: record for record in stored_calls(database_url)}
    assert {record.status for record in before.values()} == {"queued"}
    assert all(record.carrier_call_id is None for record in before.values())

    with GatewayProcess(config, environ, work_dir=tmp_path, name="survivor") as survivor:
        survivor.start().wait_ready()
        fake.deliver_to = survivor.url
        age_unplaced_dials_and_wake_the_sweep(database_url)
        # The sweep asks the carrier: the first dial is adopted, the second is dialled again.
        wait_for(lambda: len(fake.calls) == 2, "the never-placed row to be dialled again")
        adopted = {r.to_number: r for r in stored_calls(database_url)}[placed.to]
        assert adopted.carrier_call_id == placed.call_id and adopted.status == "queued"
        with Callees(fake) as callees:  # now the callees pick up and hang up
            client = httpx.Client(base_url=survivor.url, headers=AUTH, timeout=10, trust_env=False)
            view = wait_for(lambda: (lambda v: v if v["status"] == "completed" else None)(
                client.get(f"/v1/campaigns/{campaign_id}").json()), "the campaign to complete")
            rows = client.get(f"/v1/campaigns/{campaign_id}/rows").json()["rows"]
    assert view["counts"] == {"completed": 2}, view
    assert Counter(call.to for call in fake.calls) == {number: 1 for number in listed}
    assert not callees.errors
    by_number = {row["to"]: row for row in rows}
    assert by_number[listed[0]]["attempts"] == 1 and by_number[listed[1]]["attempts"] == 1  # the redial not counted
    assert by_number[placed.to]["call_id"] == adopted.id
    asked = [r for r in fake.requests if r.method == "GET" and r.path.endswith("/Calls.json")]
    assert len(asked) >= 2  # the carrier's call list, once per unplaced dial
