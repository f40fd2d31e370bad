"""Campaign events (issue 11, item 6): campaign.started, a campaign.row_finished per row, then
campaign.ended, written by the transactions of the changes (the outbox) and delivered signed, in
that order (one stream per campaign); their schemas in the OpenAPI document's webhooks. And the
campaign series on /metrics."""

from __future__ import annotations

import time

from gateway.testing import EventReceiver
from gateway.testing.callees import Callees

from .conftest import API_KEY, CAMPAIGN_SETTLE, CARRIER_NAMES
from .test_events import webhooks_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CARRIER = CARRIER_NAMES[0]


def test_a_campaign_sends_started_each_rows_outcome_and_ended_in_order(make_gateway, fake_carriers, database_url):
    with EventReceiver() as receiver:
        gateway = make_gateway(webhooks_config(("crm", receiver)) + CAMPAIGN_SETTLE, database_url=database_url)
        answered, busy, suppressed, denied = "+15557005001", "+15557005002", "+15557005003", "+33612345678"
        response = gateway.client.post("/v1/suppressions", json={"numbers": [suppressed]}, headers=AUTH)
        assert response.status_code == 201
        with Callees(fake_carriers[CARRIER], script={busy: ["busy"]}):
            body = {"name": "events", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
                    "rows": [{"to": number} for number in (answered, busy, suppressed, denied)]}
            response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
            assert response.status_code == 201, response.text
            campaign_id = response.json()["id"]
            ended = receiver.wait_for_type("campaign.ended", timeout=60)
        ours = [receiver.events[event_id] for event_id in receiver.order
                if receiver.events[event_id].type.startswith("campaign.")]
    assert [event.type for event in ours] == ["campaign.started", *["campaign.row_finished"] * 4, "campaign.ended"], [
        (e.type, e.data.get("row", {}).get("to")) for e in ours]
    started = ours[0].data["campaign"]
    assert started["id"] == campaign_id and started["status"] == "running" and started["rows"] == 4
    outcomes = {event.data["row"]["to"]: event.data["row"] for event in ours[1:-1]}
    assert {number: row["status"] for number, row in outcomes.items()} == {
        answered: "completed", busy: "busy", suppressed: "suppressed", denied: "rejected"}
    assert all(event.data["campaign_id"] == campaign_id for event in ours[1:-1])
    assert outcomes[answered]["call_id"] and outcomes[answered]["attempts"] == 1
    assert ended.data["status"] == "completed"
    assert ended.data["campaign"]["counts"] == {"completed": 1, "busy": 1, "suppressed": 1, "rejected": 1}


def test_the_campaign_events_are_in_the_openapi_webhooks(gateway):
    document = gateway.client.get("/v1/openapi.json", headers=AUTH).json()
    for event_type, schema in (("campaign.started", "CampaignStartedEvent"), ("campaign.ended", "CampaignEndedEvent"),
                               ("campaign.row_finished", "CampaignRowFinishedEvent")):
        hook = document["webhooks"][event_type]["post"]
        assert hook["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(schema)
        assert document["components"]["schemas"][schema]["properties"]["type"] == {"const": event_type}


def test_metrics_show_running_campaigns_rows_and_pace_and_counters_without_a_campaign_label(gateway, fake_carriers):
    listed = ["+15557005101", "+15557005102"]
    body = {"name": "metrics", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
            "rows": [{"to": number} for number in listed]}
    with Callees(fake_carriers[CARRIER], hold=lambda: 30.0):  # live until the test ends
        response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
        assert response.status_code == 201, response.text
        campaign_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(fake_carriers[CARRIER].calls) < 2:
            time.sleep(0.05)
        text = gateway.client.get("/metrics").text
        assert f'gateway_campaign_rows{{campaign="{campaign_id}",status="dialing"}} 2.0' in text
        assert f'gateway_campaign_pace{{campaign="{campaign_id}"}} 1.0' in text
        response = gateway.client.post(f"/v1/campaigns/{campaign_id}/cancel", headers=AUTH)
        assert response.status_code == 200
    # An ended campaign has no series any more (their number stays bounded).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and campaign_id in gateway.client.get("/metrics").text:
        time.sleep(0.05)
    text = gateway.client.get("/metrics").text
    assert campaign_id not in text
    assert "gateway_campaign_capacity_refusals_total 0.0" in text
