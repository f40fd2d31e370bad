"""Campaigns end to end: the real gateway dials a list through a fake carrier whose callees end
their calls as scripted; the counts come from the fake carrier's placed calls."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import signal
import time

import httpx
import pytest

from gateway.carriers import CARRIERS
from gateway.flows.campaigns import Window, zones_of
from gateway.settings import parse_hours
from gateway.store.jobs import JobStore
from gateway.store.calls import CallStore
from gateway.testing.callees import Callees

from .conftest import API_KEY, CAMPAIGN_SETTLE as SETTLE, CARRIER_NAMES
from .test_replicas import make_replicas  # noqa: F401  (the fixture: replicas on PostgreSQL behind HAProxy)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CARRIER = CARRIER_NAMES[0]
WAIT_SECONDS = 60


@pytest.fixture
def gateway(make_gateway):
    return make_gateway(SETTLE)


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1555700{n:04d}" for n in range(start, start + count)]


def create(gateway, rows, **fields):
    body = {"name": "reminders", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
            "rows": [{"to": number} for number in rows] if rows and isinstance(rows[0], str) else rows, **fields}
    response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def campaign(gateway, campaign_id):
    response = gateway.client.get(f"/v1/campaigns/{campaign_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(gateway, campaign_id, predicate, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        view = campaign(gateway, campaign_id)
        if predicate(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"campaign never {what}: {view}")


def rows_of(gateway, campaign_id, **query):
    response = gateway.client.get(f"/v1/campaigns/{campaign_id}/rows", params={"limit": 200, **query}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def dispatch_jobs(database_url):
    async def read():
        store = CallStore.open(database_url)
        try:
            return await JobStore(store.database).pending("DispatchCampaign")
        finally:
            await store.close()

    return asyncio.run(read())


# --- the list, end to end --------------------------------------------------------------------------


def test_a_campaign_dials_each_row_once_within_its_concurrency_retries_and_suppressions(
        make_gateway, fake_carriers, database_url):
    gateway = make_gateway(SETTLE, database_url=database_url)
    listed = numbers(12)
    busy_once, always_busy, denied, suppressed = listed[1], listed[2], "+33612345678", listed[3]
    response = gateway.client.post("/v1/suppressions", json={"numbers": [suppressed], "reason": "asked"}, headers=AUTH)
    assert response.status_code == 201 and response.json()["added"] == 1
    script = {busy_once: ["busy", "completed"], always_busy: ["busy"], listed[4]: ["no-answer"]}
    with Callees(fake_carriers[CARRIER], script=script, hold=lambda: 0.05) as callees:
        created = create(gateway, [*listed, denied], max_concurrency=3,
                         retry={"busy": {"attempts": 2, "delay_seconds": 0}})
        assert created["status"] == "running" and created["rows"] == 13
        assert created["counts"]["suppressed"] == 1 and created["counts"]["rejected"] == 1
        done = wait_for(gateway, created["id"], lambda view: view["status"] == "completed", "completed")
    assert not callees.errors
    assert done["counts"] == {"completed": 9, "busy": 1, "no-answer": 1, "suppressed": 1, "rejected": 1}
    # Dialled from the carrier's side: once each, the busy ones twice (their retry), never the others.
    expected = {number: 1 for number in listed if number != suppressed}
    expected[busy_once] = expected[always_busy] = 2
    assert dict(callees.dialled) == expected
    assert callees.most_live <= 3
    rows = {row["to"]: row for row in rows_of(gateway, created["id"])}
    assert rows[busy_once]["status"] == "completed" and rows[busy_once]["attempts"] == 2
    assert rows[always_busy]["status"] == "busy" and rows[always_busy]["attempts"] == 2
    assert rows[denied]["status"] == "rejected" and "+33" not in callees.dialled
    assert rows[suppressed]["attempts"] == 0 and rows[suppressed]["status"] == "suppressed"
    # Each row's call is one the dialer API knows.
    call = gateway.client.get(f"/v1/calls/{rows[listed[0]]['call_id']}", headers=AUTH).json()
    assert call["to"] == listed[0] and call["status"] == "completed"
    exported = gateway.client.get(f"/v1/campaigns/{created['id']}/rows", params={"format": "csv"}, headers=AUTH)
    assert exported.headers["content-type"].startswith("text/csv")
    assert len(exported.text.strip().splitlines()) == 14 and f"{always_busy},busy,2" in exported.text
    assert dispatch_jobs(database_url) == []  # nothing more to do: the job is gone


def test_csv_rows_carry_template_context_metadata_and_a_time_zone(gateway, fake_carriers):
    csv_text = "to,timezone,name,metadata.crm\n+15557000001,Europe/Paris,Ada,42\n+12125550100,,Grace,\n"
    with Callees(fake_carriers[CARRIER]):
        response = gateway.client.post("/v1/campaigns", json={
            "name": "csv", "route": "support", "carrier": CARRIER, "calls_per_second": 50, "csv": csv_text},
            headers=AUTH)
        assert response.status_code == 201, response.text
        created = response.json()
        wait_for(gateway, created["id"], lambda view: view["status"] == "completed", "completed")
    rows = rows_of(gateway, created["id"])
    assert [row["timezones"] for row in rows] == [["Europe/Paris"], ["America/New_York"]]
    assert rows[0]["metadata"] == {"crm": "42"}
    # What the row's call was asked for (its agent gets it when the callee answers).
    (first,) = [record for record in gateway.records() if record.id == rows[0]["call_id"]]
    assert first.request["request"]["template_context"] == {"name": "Ada"}
    assert first.request["request"]["metadata"] == {"crm": "42"}


def test_pause_stops_dialling_resume_goes_on_cancel_ends_it(make_gateway, fake_carriers, database_url):
    gateway = make_gateway(SETTLE, database_url=database_url)
    hold = {"seconds": 30.0}
    with Callees(fake_carriers[CARRIER], hold=lambda: hold["seconds"]) as callees:
        created = create(gateway, numbers(5), max_concurrency=1)
        first = wait_for(gateway, created["id"], lambda view: view["counts"].get("dialing") == 1, "dialled")
        paused = gateway.client.post(f"/v1/campaigns/{created['id']}/pause", headers=AUTH)
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
        assert first["counts"]["pending"] == 4
        hold["seconds"] = 0.0
        callees._ending[:] = [(0.0, call, outcome) for _, call, outcome in callees._ending]  # the first call ends
        # Paused: the live call is settled, then the dispatch job stops, nothing more dialled.
        wait_for(gateway, created["id"], lambda view: view["counts"].get("completed") == 1, "settled the live call")
        deadline = time.monotonic() + WAIT_SECONDS
        while dispatch_jobs(gateway.settings.database_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dispatch_jobs(gateway.settings.database_url) == []
        assert sum(callees.dialled.values()) == 1
        assert gateway.client.post(f"/v1/campaigns/{created['id']}/pause", headers=AUTH).status_code == 200
        resumed = gateway.client.post(f"/v1/campaigns/{created['id']}/resume", headers=AUTH)
        assert resumed.status_code == 200 and resumed.json()["status"] == "running"
        wait_for(gateway, created["id"], lambda view: view["counts"].get("completed", 0) >= 2, "resumed")
        canceled = gateway.client.post(f"/v1/campaigns/{created['id']}/cancel", headers=AUTH)
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert gateway.client.post(f"/v1/campaigns/{created['id']}/resume", headers=AUTH).status_code == 409
        view = wait_for(gateway, created["id"], lambda view: not view["counts"].get("dialing"), "settled")
    assert view["counts"]["canceled"] >= 1 and view["counts"].get("pending", 0) == 0
    assert sum(callees.dialled.values()) == view["counts"]["completed"]
    assert all(count == 1 for count in callees.dialled.values())


def test_rows_wait_for_their_window_in_their_own_time_zone(gateway, fake_carriers):
    now = dt.datetime.now(dt.timezone.utc)
    day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(now.weekday() + 3) % 7]
    with Callees(fake_carriers[CARRIER]) as callees:
        created = create(gateway, ["+12125550100", "+15557000001"], window=[f"{day} 09:00-17:00"],
                         timezone="Asia/Tokyo")
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            rows = rows_of(gateway, created["id"])
            if all(dt.datetime.fromisoformat(row["due_at"]) > now + dt.timedelta(days=1) for row in rows):
                break
            time.sleep(0.05)
    new_york, tokyo = (dt.datetime.fromisoformat(row["due_at"]) for row in rows)
    # 09:00 local, three days on (or so): New York's for the +1212 number, the campaign's default for +1555.
    assert new_york.astimezone(dt.timezone(dt.timedelta(hours=-5))).hour in (9, 10)  # EST/EDT
    assert tokyo.astimezone(dt.timezone(dt.timedelta(hours=9))).hour == 9
    assert [row["status"] for row in rows] == ["pending", "pending"] and not callees.dialled


def test_rows_not_dialled_by_ends_at_are_expired(gateway, fake_carriers):
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat()
    with Callees(fake_carriers[CARRIER]) as callees:
        created = create(gateway, numbers(3), ends_at=past)
        done = wait_for(gateway, created["id"], lambda view: view["status"] == "completed", "completed")
    assert done["counts"] == {"expired": 3} and not callees.dialled


def test_suppression_list_api_and_csv_import(gateway):
    post = gateway.client.post
    assert post("/v1/suppressions", json={"numbers": ["+15557000001"]}).status_code == 401
    assert post("/v1/suppressions", json={"numbers": ["12345"]}, headers=AUTH).status_code == 422
    response = post("/v1/suppressions", content="number\n+15557000001\n+15557000002\n",
                    headers={**AUTH, "content-type": "text/csv"})
    assert response.status_code == 201 and response.json() == {"added": 2, "numbers": 2}
    again = post("/v1/suppressions", json={"numbers": ["+15557000002", "+15557000003"]}, headers=AUTH)
    assert again.json()["added"] == 1
    listed = gateway.client.get("/v1/suppressions", params={"limit": 2}, headers=AUTH).json()
    assert [entry["number"] for entry in listed["suppressions"]] == ["+15557000001", "+15557000002"]
    assert listed["suppressions"][0]["source"] == "import" and listed["next_after"] == "+15557000002"
    assert gateway.client.delete("/v1/suppressions/+15557000001", headers=AUTH).status_code == 204
    assert gateway.client.delete("/v1/suppressions/+15557000001", headers=AUTH).status_code == 404


def test_a_campaign_is_refused_whole_for_what_no_row_could_pass(gateway):
    body = {"name": "x", "route": "support", "carrier": CARRIER, "rows": [{"to": "+15557000001"}]}
    assert gateway.client.post("/v1/campaigns", json=body).status_code == 401
    refused = gateway.client.post("/v1/campaigns", json={**body, "from": "+15559999999"}, headers=AUTH)
    assert refused.status_code == 403
    unknown = gateway.client.post("/v1/campaigns", json={**body, "route": "nope"}, headers=AUTH)
    assert unknown.status_code == 422 and "nope" in unknown.text
    empty = gateway.client.post("/v1/campaigns", json={**body, "rows": []}, headers=AUTH)
    assert empty.status_code == 422
    assert gateway.client.get("/v1/campaigns/nope", headers=AUTH).status_code == 404
    document = gateway.client.get("/v1/openapi.json").json()
    assert "/v1/campaigns/{campaign_id}/pause" in document["paths"]
    assert "CampaignRequest" in document["components"]["schemas"]


# --- windows and zones ----------------------------------------------------------------------------


def test_windows_open_in_every_zone_of_a_number():
    window = Window((parse_hours("mon-fri 09:00-17:00"),))
    monday_noon_utc = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.timezone.utc)  # a Monday
    assert window.opens_at(monday_noon_utc, ("Europe/London",)) is None
    assert window.opens_at(monday_noon_utc, ("America/New_York",)) == dt.datetime(2026, 3, 2, 14, 0, tzinfo=dt.timezone.utc)
    # Open in both London and New York: from 14:00 UTC (09:00 in New York) while London is open till 17:00.
    assert window.opens_at(monday_noon_utc, ("Europe/London", "America/New_York")) == dt.datetime(
        2026, 3, 2, 14, 0, tzinfo=dt.timezone.utc)
    friday_evening = dt.datetime(2026, 3, 6, 18, 0, tzinfo=dt.timezone.utc)
    assert window.opens_at(friday_evening, ("Europe/London",)) == dt.datetime(2026, 3, 9, 9, 0, tzinfo=dt.timezone.utc)
    assert zones_of("+12125550100", None, "UTC") == ("America/New_York",)
    assert zones_of("+15557000001", None, "Asia/Tokyo") == ("Asia/Tokyo",)
    assert zones_of("+12125550100", "Europe/Paris", "UTC") == ("Europe/Paris",)


@pytest.mark.parametrize("field,value", [("window", ["someday 9-5"]), ("timezone", "Mars/Olympus"),
                                         ("retry", {"busy": {"attempts": 0, "delay_seconds": 1}}),
                                         ("retry", {"completed": {"attempts": 2, "delay_seconds": 1}})])
def test_invalid_campaign_fields_are_refused(gateway, field, value):
    body = {"name": "x", "route": "support", "carrier": CARRIER, "rows": [{"to": "+15557000001"}], field: value}
    response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
    assert response.status_code == 422, response.text


# --- several replicas, one killed ------------------------------------------------------------------


def test_two_replicas_share_a_campaign_and_one_killed_mid_run_dials_no_row_twice(make_replicas, fake_carriers,  # noqa: F811
                                                                                 postgres_database_url):
    # The survivor takes the campaign's dispatch over once the victim's lease on it runs out (15 s by default).
    # The rows the victim was dialling are placed again 10 s + 1 s after their claim (10 s + 10 s by default).
    replicas = make_replicas(2, SETTLE + "redial_margin_seconds = 1\n", work_lease_seconds=4)
    client = httpx.Client(base_url=replicas.url, timeout=30)
    listed = numbers(60, start=1000)
    fake = fake_carriers[CARRIER]
    jitter = random.Random(7)
    with Callees(fake, hold=lambda: jitter.uniform(0.1, 0.4)) as callees:
        body = {"name": "replicas", "route": "support", "carrier": CARRIER, "calls_per_second": 10,
                "max_concurrency": 4, "rows": [{"to": number} for number in listed]}
        response = client.post("/v1/campaigns", json=body, headers=AUTH)
        assert response.status_code == 201, response.text
        campaign_id = response.json()["id"]
        deadline = time.monotonic() + WAIT_SECONDS
        while len(fake.calls) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The replica running the dispatch: between runs (waiting for its calls to settle) the job is
        # pending and held by no one, so look until a run of it holds it.
        while time.monotonic() < deadline:
            (job,) = [j for j in dispatch_jobs(postgres_database_url) if j.key == f"campaign:{campaign_id}"]
            if job.lease_owner:
                break
            time.sleep(0.01)
        (victim,) = [p for p in replicas.processes if job.lease_owner and f":{p.pid}:" in job.lease_owner]
        victim.kill()
        assert victim.wait(10) == -signal.SIGKILL
        replicas.balancer.wait_for_status(victim.name, "DOWN")
        deadline = time.monotonic() + 2 * WAIT_SECONDS
        while time.monotonic() < deadline:
            view = client.get(f"/v1/campaigns/{campaign_id}", headers=AUTH).json()
            if view["status"] == "completed":
                break
            time.sleep(0.1)
        rows = client.get(f"/v1/campaigns/{campaign_id}/rows", params={"limit": 100}, headers=AUTH).json()["rows"]
    assert view["status"] == "completed", view
    # Never twice. A row not dialled at all is one left unplaced by the killed replica: reported,
    # unless the carrier's call list said it never placed it (then a survivor dialled it).
    assert max(callees.dialled.values()) == 1, callees.dialled
    undialled = [row for row in rows if row["to"] not in callees.dialled]
    assert all(row["status"] == "failed" and "stopped while placing" in row["reason"] for row in undialled), undialled
    if CARRIERS[CARRIER].finds_placed_calls:
        assert undialled == []
    assert view["counts"].get("completed", 0) + view["counts"].get("failed", 0) == 60, view
    assert all(row["to"] in callees.dialled for row in rows if row["status"] == "completed")
    assert callees.most_live <= 4


def test_the_campaign_command_creates_and_follows_a_campaign(gateway, fake_carriers, tmp_path, capsys):
    from gateway.cli import main as cli_main

    rows = tmp_path / "rows.csv"
    rows.write_text("to,name\n+15557000001,Ada\n+15557000002,Grace\n")
    common = ["--url", gateway.server.url, "--api-key", API_KEY, "--poll-seconds", "0.05"]
    with Callees(fake_carriers[CARRIER], script={"+15557000002": ["busy", "completed"]}):
        code = cli_main(["campaign", "create", str(rows), "--name", "cli", "--route", "support", "--carrier", CARRIER,
                         "--calls-per-second", "50", "--retry", "busy=2/0", "--follow", *common])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2/2 done (completed 2)" in lines[-1] and "completed" in lines[-1]
    campaign_id = lines[-1].split()[1]
    assert cli_main(["campaign", "status", campaign_id, *common]) == 0
    assert cli_main(["campaign", "pause", campaign_id, *common]) == 2  # completed: nothing to pause
    assert "409" in capsys.readouterr().err


def test_inbound_headroom_keeps_account_capacity_free_for_callers(make_gateway, fake_carriers):
    gateway = make_gateway(SETTLE + "account_concurrency = 3\ninbound_headroom = 2\n")
    with Callees(fake_carriers[CARRIER], hold=lambda: 0.1) as callees:
        created = create(gateway, numbers(4), max_concurrency=4)
        wait_for(gateway, created["id"], lambda view: view["status"] == "completed", "completed")
    assert sum(callees.dialled.values()) == 4 and callees.most_live == 1  # 3 the account allows, 2 kept for callers
