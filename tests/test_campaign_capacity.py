"""Ultravox over capacity during a campaign (issue 11, item 5): a 429/503 with Retry-After (seconds
or an HTTP date) holds the campaign off that long and halves its pace, which then rises slowly
again; the state is the campaign's row, shared by every replica. The refused row is dialled again
without counting an attempt. And inbound_headroom with the account limit Ultravox states."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import time
from collections import Counter

import pytest

from gateway.store.calls import CallStore
from gateway.store.campaigns import CampaignStore, NewRow
from gateway.store.jobs import NewJob
from gateway.testing import double
from gateway.testing.callees import Callees
from gateway.testing.ultravox import FakeResponse

from .conftest import API_KEY, BASE_CONFIG, CAMPAIGN_SETTLE, CARRIER_NAMES, stored_calls

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CARRIER = CARRIER_NAMES[0]
WAIT_SECONDS = 60
# One try per Ultravox request: the 429 reaches the flow at once instead of being waited out.
ONE_TRY = BASE_CONFIG.replace("[ultravox]\n", "[ultravox]\nmax_attempts = 1\n", 1) + CAMPAIGN_SETTLE


def create(gateway, listed, **fields):
    body = {"name": "capacity", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
            "rows": [{"to": number} for number in listed], **fields}
    response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def wait_completed(gateway, campaign_id):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        view = gateway.client.get(f"/v1/campaigns/{campaign_id}", headers=AUTH).json()
        if view["status"] == "completed":
            return view
        time.sleep(0.05)
    raise AssertionError(f"campaign never completed: {view}")


@pytest.mark.parametrize("retry_after", ["2", "date"])
def test_a_429_holds_the_campaign_off_slows_it_and_redials_the_row_without_counting(
        make_gateway, fake_carriers, fake_ultravox, database_url, retry_after):
    gateway = make_gateway(config=ONE_TRY, database_url=database_url)
    if retry_after == "date":
        retry_after = email.utils.format_datetime(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3),
                                                  usegmt=True)
    fake_ultravox.script(FakeResponse(status=429, retry_after=retry_after))
    listed = ["+15557008001", "+15557008002", "+15557008003"]
    with Callees(fake_carriers[CARRIER], answer_with=double(CARRIER)) as callees:
        created = create(gateway, listed, max_concurrency=1)
        view = wait_completed(gateway, created["id"])
    assert view["counts"] == {"completed": 3}, view
    assert not callees.errors
    rows = gateway.client.get(f"/v1/campaigns/{created['id']}/rows", headers=AUTH).json()["rows"]
    assert [row["attempts"] for row in rows] == [1, 1, 1]  # the refused dial not counted
    # The first callee picked up, Ultravox refused its agent: rung again later; the others once.
    assert Counter(call.to for call in fake_carriers[CARRIER].calls) == {listed[0]: 2, listed[1]: 1, listed[2]: 1}
    assert 0.5 <= view["pace"] < 1.0  # halved, rising again
    held_until = dt.datetime.fromisoformat(view["held_until"])
    calls = sorted(stored_calls(database_url), key=lambda call: call.created_at)
    refused = [call for call in calls if call.failure_reason == "Ultravox was over capacity (429/503)"]
    assert len(refused) == 1
    # Nothing dialled while held off: every later call was created after the hold ended.
    assert all(call.created_at >= held_until for call in calls if call.created_at > refused[0].updated_at)
    assert len([call for call in calls if call.created_at > refused[0].updated_at]) == 3


def test_the_pace_in_the_row_halves_once_per_hold_and_rises_additively(database_url):
    async def run():
        calls = CallStore.open(database_url)
        await calls.migrate()
        store = CampaignStore(calls.database)
        async def new_campaign():
            return await store.create(name="pace", api_key_id="k", spec={}, starts_at=None, ends_at=None,
                                      rows=[NewRow("+15557008100", ("UTC",))],
                                      job=lambda cid: NewJob("DispatchCampaign", {"campaign_id": cid},
                                                             dt.datetime.now(dt.timezone.utc), key=f"campaign:{cid}"))

        try:
            campaign = await new_campaign()
            now = dt.datetime.now(dt.timezone.utc)
            paces = []
            # Two refusals in one hold (calls already under way): lowered once.
            await store.back_off(campaign.id, until=now + dt.timedelta(seconds=30), factor=0.5, floor=0.05)
            await store.back_off(campaign.id, until=now + dt.timedelta(seconds=10), factor=0.5, floor=0.05)
            held = await store.get(campaign.id)
            paces.append(held.pace)
            await store.speed_up(campaign.id, step=0.1)  # not while held off
            paces.append((await store.get(campaign.id)).pace)
            # Refusals each after the hold before had ended: lowered each time; then up by steps.
            campaign = await new_campaign()
            await store.back_off(campaign.id, until=now - dt.timedelta(seconds=1), factor=0.5, floor=0.05)
            await store.back_off(campaign.id, until=now - dt.timedelta(seconds=1), factor=0.5, floor=0.05)
            paces.append((await store.get(campaign.id)).pace)
            for _ in range(10):
                await store.speed_up(campaign.id, step=0.1)
            paces.append((await store.get(campaign.id)).pace)
            return held, paces
        finally:
            await calls.close()

    held, paces = asyncio.run(run())
    assert held.held_until is not None and held.held_until > dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=20)
    assert paces[:2] == [0.5, 0.5]
    assert paces[2] == pytest.approx(0.25)
    assert paces[3] == 1.0


def test_inbound_headroom_uses_the_limit_ultravox_states_without_account_concurrency(
        make_gateway, fake_carriers, fake_ultravox):
    fake_ultravox.allowed_concurrent_calls = 3
    gateway = make_gateway(CAMPAIGN_SETTLE + "inbound_headroom = 2\n")
    with Callees(fake_carriers[CARRIER], hold=lambda: 0.1) as callees:
        created = create(gateway, ["+15557008201", "+15557008202", "+15557008203", "+15557008204"],
                         max_concurrency=4)
        wait_completed(gateway, created["id"])
    assert sum(callees.dialled.values()) == 4 and callees.most_live == 1  # 3 allowed, 2 kept for callers
    assert any(request.path == "/api/accounts/me" for request in fake_ultravox.requests)
