"""SIGKILL of `gateway serve` while a campaign's dials are in flight at the carrier (issue 11, item 4):
the attempts the dead process recorded but never saw answered are looked up at the carrier. The
call the carrier has is adopted (the row follows it); a dial the carrier never placed is dialled
again without counting the attempt. Each row is dialled exactly once, counted at the fake carrier.
On every carrier, on SQLite and PostgreSQL. (Exotel lists a call only once it has ended: its
ended call is adopted, and a dial it never placed cannot be told from one still ringing, so that
row fails, never dialled again.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gateway.carriers import CARRIERS
from gateway.store import CallStore
from gateway.store.calls import utcnow
from gateway.testing.callees import Callees
from gateway.testing.processes import GatewayProcess
from gateway.testing.ultravox import FakeResponse

from .conftest import API_KEY, BASE_CONFIG, CAMPAIGN_SETTLE, SHARED_WORK, gateway_environ, in_gateway_table, stored_calls

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT_SECONDS = 60
# Carriers whose call list the gateway asks (every carrier does, today).
ASKED_CARRIERS = [name for name, carrier in CARRIERS.items() if carrier.finds_placed_calls]


def wait_for(predicate, what: str, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def age_unplaced_dials_and_wake_the_sweep(database_url: str, fake, by: dt.timedelta) -> None:
    """What waiting `by` would do: the dead process's unplaced dials (and the calls the carrier made
    of them) are that much older, old enough to settle; the outbound sweep is due, and the dead
    process's lease on the dispatch job has lapsed."""
    for call in fake.calls:
        call.created_at -= by

    async def update():
        store = CallStore.open(database_url)
        try:
            now = utcnow()
            def run(connection):
                unplaced = connection.execute(sa.text("SELECT id, created_at FROM calls WHERE status = 'queued' "
                                                      "AND placed_at IS NULL")).all()
                for call_id, created_at in unplaced:
                    created = created_at if isinstance(created_at, dt.datetime) else dt.datetime.fromisoformat(created_at)
                    connection.execute(sa.text("UPDATE calls SET created_at = :then WHERE id = :id"),
                                       {"then": created - by, "id": call_id})
                connection.execute(sa.text("UPDATE jobs SET due_at = :now WHERE key LIKE '%AbandonedOutbound%'"),
                                   {"now": now})
                connection.execute(sa.text("UPDATE jobs SET lease_until = :now WHERE key LIKE 'campaign:%'"),
                                   {"now": now})
            await store.database.transaction(run)
        finally:
            await store.close()

    asyncio.run(update())


@pytest.mark.parametrize("carrier", ASKED_CARRIERS)
def test_dials_in_flight_when_the_gateway_is_killed_are_adopted_or_redialled_never_twice(
        tmp_path: Path, fake_ultravox, fake_carriers, database_url, carrier):
    fake = fake_carriers[carrier]
    within = CARRIERS[carrier].lists_placed_calls_within
    config = tmp_path / "gateway.toml"
    # Carriers that dial into the stream create the agent's call first: under a loaded machine the
    # tests' 1.5 s for an Ultravox request is short for a dial that must reach the carrier.
    patient = BASE_CONFIG.replace("[ultravox]\ninbound_deadline_seconds = 2.0\nrequest_timeout_seconds = 1.5",
                                  "[ultravox]\ninbound_deadline_seconds = 2.0\nrequest_timeout_seconds = 5")
    assert patient != BASE_CONFIG
    config.write_text(in_gateway_table(patient, SHARED_WORK) + CAMPAIGN_SETTLE)
    environ = gateway_environ(fake_ultravox, database_url, fake_carriers)
    release = threading.Event()
    # Both dials reach the carrier and wait there; then the carrier places the first (its answer
    # goes to a dead process) and refuses the second (no call).
    fake.script(FakeResponse(hold=release), FakeResponse(status=500, hold=release))
    listed = ["+15557009001", "+15557009002"]
    with GatewayProcess(config, environ, work_dir=tmp_path, name="victim") as victim:
        victim.start().wait_ready()
        body = {"name": "crash", "route": "support", "carrier": carrier, "calls_per_second": 50,
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
    placed_to = "+" + placed.to.lstrip("+")  # Plivo writes numbers without their "+"
    (refused_to,) = set(listed) - {placed_to}  # the dials reach the carrier in either order
    before = {record.to_number: record for record in stored_calls(database_url)}
    assert {record.status for record in before.values()} == {"queued"}
    assert all(record.carrier_call_id is None for record in before.values())
    if within is None:
        # A list of ended calls only: the call ends (its callbacks went to the dead process) to be listed.
        fake.set_state(fake.live_id(placed), "busy")

    with GatewayProcess(config, environ, work_dir=tmp_path, name="survivor") as survivor:
        survivor.start().wait_ready()
        fake.deliver_to = survivor.url
        client = httpx.Client(base_url=survivor.url, headers=AUTH, timeout=10, trust_env=False)
        if within is None:
            # Past the lookup's patience: the refused dial cannot be told from one still ringing.
            age_unplaced_dials_and_wake_the_sweep(database_url, fake, dt.timedelta(minutes=6))
            view = wait_for(lambda: (lambda v: v if v["status"] == "completed" else None)(
                client.get(f"/v1/campaigns/{campaign_id}").json()), "the campaign to complete")
            rows = client.get(f"/v1/campaigns/{campaign_id}/rows").json()["rows"]
            adopted = {r.to_number: r for r in stored_calls(database_url)}[placed_to]
            assert adopted.carrier_call_id == fake.live_id(placed) and adopted.status == "busy"
            assert view["counts"] == {"busy": 1, "failed": 1}, view
            by_number = {row["to"]: row for row in rows}
            refused = {r.to_number: r for r in stored_calls(database_url)}[refused_to]
            assert by_number[refused_to]["status"] == "failed" and "stopped while placing" in refused.failure_reason
            assert fake.calls == [placed]  # the refused dial never made again
        else:
            # Past the time the carrier's list surely shows a call it placed.
            age_unplaced_dials_and_wake_the_sweep(database_url, fake, dt.timedelta(seconds=max(60.0, within + 30)))
            # The sweep asks the carrier: the first dial is adopted, the second is dialled again.
            wait_for(lambda: len(fake.calls) == 2, "the never-placed row to be dialled again")
            adopted = {r.to_number: r for r in stored_calls(database_url)}[placed_to]
            # Adopted with the carrier's id, or (a dial still in Plivo's queue) to learn it from its first callback.
            assert adopted.placed_at is not None and adopted.status == "queued"
            assert adopted.carrier_call_id in (fake.live_id(placed), None)
            with Callees(fake) as callees:  # now the callees pick up and hang up
                view = wait_for(lambda: (lambda v: v if v["status"] == "completed" else None)(
                    client.get(f"/v1/campaigns/{campaign_id}").json()), "the campaign to complete")
                rows = client.get(f"/v1/campaigns/{campaign_id}/rows").json()["rows"]
            assert view["counts"] == {"completed": 2}, view
            assert Counter("+" + call.to.lstrip("+") for call in fake.calls) == {number: 1 for number in listed}
            assert not callees.errors
            by_number = {row["to"]: row for row in rows}
            assert by_number[refused_to]["attempts"] == 1  # the redial not counted
    assert by_number[placed_to]["attempts"] == 1
    assert by_number[placed_to]["call_id"] == adopted.id
    assert len([r for r in fake.requests if r.method == "GET"]) >= 2  # the carrier's call list, once per unplaced dial
