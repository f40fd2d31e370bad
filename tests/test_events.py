"""Events to the user's endpoints end to end: the real gateway, fake carriers and Ultravox, and a
receiver that verifies each delivery with the standardwebhooks library."""

from __future__ import annotations

import json

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from gateway.settings import ConfigError, load_settings
from gateway.testing import EventReceiver, double, new_webhook_secret

from .conftest import API_KEY, BASE_CONFIG, CARRIER_NAMES, PUBLIC_URL, SUPPORT_NUMBER, TRANSFER_CARRIERS
from .test_outbound import ultravox_event
from .test_transfer import SALES, LiveCall

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST_RETRIES = "[0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"
TRANSCRIPT = [
    {"role": "MESSAGE_ROLE_AGENT", "text": "Hello, thanks for calling.", "medium": "MESSAGE_MEDIUM_VOICE"},
    {"role": "MESSAGE_ROLE_USER", "text": "I'd like to book a table.", "medium": "MESSAGE_MEDIUM_VOICE"},
    {"role": "MESSAGE_ROLE_TOOL_CALL", "text": "{}", "toolName": "book", "medium": "MESSAGE_MEDIUM_TEXT"},
    {"role": "MESSAGE_ROLE_AGENT", "text": "Booked for eight.", "medium": "MESSAGE_MEDIUM_VOICE"},
]


def webhooks_config(*receivers: tuple[str, EventReceiver], retries: str = FAST_RETRIES, extra: str = "",
                    probe_interval: float = 5.0, lease_margin: float = 10.0) -> str:
    tables = "".join(f'\n[[webhooks]]\nname = "{name}"\nurl = "{receiver.url}"\nsecret = "{receiver.secret}"\n{extra}'
                     for name, receiver in receivers)
    return tables + (f"\n[events]\nretry_schedule_seconds = {retries}\ntimeout_seconds = 2\nartifacts_wait_seconds = 3\n"
                     "ended_settle_seconds = 0.3\n"
                     f"probe_interval_seconds = {probe_interval}\nlease_margin_seconds = {lease_margin}\n")


@pytest.fixture
def receiver():
    with EventReceiver() as receiver:
        yield receiver


@pytest.fixture
def events_gateway(make_gateway, receiver):
    return make_gateway(webhooks_config(("crm", receiver)))


@pytest.fixture
def any_store_gateway(make_gateway, receiver, database_url):
    """The gateway on SQLite, and on PostgreSQL: the outbox's SQL on both."""
    return make_gateway(webhooks_config(("crm", receiver)), database_url=database_url)


def call_in(gateway, carrier, **fields):
    form = double(carrier).inbound_form(to=SUPPORT_NUMBER, **fields)
    response = gateway.post(carrier, form)
    assert response.status_code == 200, response.text
    carrier_call_id = form[double(carrier).call_id_param]
    (record,) = [r for r in gateway.records() if r.carrier_call_id == carrier_call_id]
    return record


def end_call(gateway, fake_ultravox, record, *, summary="Booked a table for eight.", transcript=TRANSCRIPT):
    """Ultravox ends the call: it has the summary and transcript, and tells the gateway."""
    fake_ultravox.end_call(record.ultravox_call_id, summary=summary, short_summary="Table booked", messages=transcript)
    response = ultravox_event(gateway, "call.ended", {
        "callId": record.ultravox_call_id, "endReason": "hangup", "summary": summary,
        "joined": "2026-12-02T10:00:00Z", "ended": "2026-12-02T10:01:30Z"})
    assert response.status_code == 204, response.text


def events_of(gateway, **query):
    response = gateway.client.get("/v1/events", params=query, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def recorded_delivered(gateway, **query):
    """The events, once every delivery of them is recorded as delivered (the receiver may have an
    event a moment before the gateway has recorded its answer)."""
    return _wait(lambda: (lambda found: found if all(
        d["status"] == "delivered" for e in found for d in e["deliveries"]) else None)(events_of(gateway, **query)["events"]))


# --- what a call sends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_call_sends_started_status_changes_and_ended_with_summary_and_transcript(
        any_store_gateway, fake_ultravox, receiver, carrier):
    events_gateway = any_store_gateway
    record = call_in(events_gateway, carrier)
    started = receiver.wait_for_type("call.started", record.id)
    assert started.data["call"]["ultravox_call_id"] == record.ultravox_call_id
    assert started.data["call"]["carrier"] == carrier and started.data["call"]["route"] == "support"
    end_call(events_gateway, fake_ultravox, record)

    ended = receiver.wait_for_type("call.ended", record.id)
    assert [(e.type, e.data.get("previous_status"), e.data.get("status")) for e in receiver.for_call(record.id)] == [
        ("call.started", None, None),
        ("call.status_changed", "creating", "in-progress"),
        ("call.status_changed", "in-progress", "completed"),
        ("call.ended", None, "completed"),
    ]
    data = ended.data
    assert data["summary"] == "Booked a table for eight." and data["short_summary"] == "Table booked"
    assert data["transcript"] == [
        {"role": "agent", "text": "Hello, thanks for calling.", "medium": "voice"},
        {"role": "user", "text": "I'd like to book a table.", "medium": "voice"},
        {"role": "tool_call", "text": "{}", "medium": "text", "tool_name": "book"},
        {"role": "agent", "text": "Booked for eight.", "medium": "voice"},
    ]
    assert data["artifacts"] == "complete" and data["end_reason"] == "hangup"
    assert data["durations"]["carrier_seconds"] == 90 and data["durations"]["total_seconds"] >= 0
    assert data["call"]["summary"] == "Booked a table for eight." and data["transfers"] == []
    assert receiver.refused == [] and receiver.repeats == 0


def test_deliveries_verify_with_the_standard_webhooks_library_and_keep_their_id(events_gateway, receiver):
    record = call_in(events_gateway, "twilio")
    started = receiver.wait_for_type("call.started", record.id)
    (event,) = recorded_delivered(events_gateway, call_id=record.id, type="call.started")
    assert event["id"] == started.id and event["id"].startswith("evt_")
    assert event["deliveries"][0]["status"] == "delivered" and event["deliveries"][0]["attempts"] == 1
    assert event["data"] == started.data
    # A forged copy (another secret) does not verify; the real one did (the receiver checked it).
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(json.dumps({"type": "x"}), {
            "webhook-id": started.id, "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"})
    redelivered = events_gateway.client.post(f"/v1/events/{started.id}/redeliver", headers=AUTH)
    assert redelivered.status_code == 202, redelivered.text
    receiver.wait_for(lambda r: r.repeats == 1)  # the same webhook-id again: a receiver deduplicates on it
    history = _wait(lambda: (lambda h: h if len(h) == 2 else None)(
        events_gateway.client.get(f"/v1/events/{started.id}", headers=AUTH).json()["deliveries"][0]["history"]))
    assert [attempt["status_code"] for attempt in history] == [200, 200]


def test_the_inbound_webhook_does_not_wait_for_deliveries(make_gateway, receiver):
    receiver.delay = 30  # the endpoint hangs; deliveries give up after their 2 s timeout
    gateway = make_gateway(webhooks_config(("crm", receiver)))
    form = double("twilio").inbound_form(to=SUPPORT_NUMBER)
    request = double("twilio").inbound_request(PUBLIC_URL, "/twilio/inbound", form)
    # Well under one delivery attempt's timeout: the answer cannot have waited for one.
    response = httpx.post(f"{gateway.server.url}/twilio/inbound", content=request.body, headers=request.headers,
                          timeout=1.5)
    assert response.status_code == 200 and "<Stream" in response.text


def test_transfer_events_travel_in_the_calls_stream(make_gateway, fake_ultravox, fake_carriers, receiver):
    gateway = make_gateway(webhooks_config(("crm", receiver)))
    carrier = TRANSFER_CARRIERS[0]
    call = LiveCall(gateway, fake_ultravox, fake_carriers, carrier)
    assert call.tool("sales").status_code == 200
    (url,) = call.redirects()
    dialled = call.double.dialled(call.fetch(url))
    assert dialled.number == SALES
    call.dial_ended(dialled.action, "completed")
    ended = receiver.wait_for_type("transfer.ended", call.record.id)
    assert ended.data["result"] == "connected" and ended.data["transfer"]["operator"] == "sales"
    types = [e.type for e in receiver.for_call(call.record.id)]
    assert types.index("call.started") < types.index("transfer.started") < types.index("transfer.ended")


# --- a receiver that is down, a gateway that restarts --------------------------------------------------


def test_a_receiver_down_for_a_while_gets_every_event_once_in_order_across_a_restart(
        make_gateway, fake_ultravox, receiver, database_url):
    config = webhooks_config(("crm", receiver))
    first = make_gateway(config, database_url=database_url)
    receiver.down()
    records = [call_in(first, carrier) for carrier in CARRIER_NAMES]
    end_call(first, fake_ultravox, records[0])
    pending = events_of(first, status="pending")["events"]
    assert len(pending) >= 2 * len(records)
    # Refused at least once before the gateway goes away (else nothing here was tried yet).
    _wait(lambda: any(e["deliveries"][0]["attempts"] >= 1 for e in events_of(first, status="pending")["events"]))
    first.close()  # the gateway goes away with every delivery still owed

    second = make_gateway(config, database_url=database_url)
    receiver.up()
    receiver.wait_for_type("call.ended", records[0].id, timeout=20)
    for record in records:
        receiver.wait_for(lambda r, record=record: len(r.for_call(record.id)) >= 2, timeout=20)
    assert receiver.repeats == 0 and receiver.refused == []
    first_call = [e.type for e in receiver.for_call(records[0].id)]
    assert first_call == ["call.started", "call.status_changed", "call.status_changed", "call.ended"]
    delivered = recorded_delivered(second, call_id=records[0].id)
    assert max(e["deliveries"][0]["attempts"] for e in delivered) >= 2  # refused while the receiver was down
    _wait(lambda: events_of(second, status="pending")["events"] == [])


def test_an_endpoint_back_from_an_outage_gets_what_waits_at_once_not_at_the_next_retry(make_gateway, receiver):
    """The schedule puts the next retry a minute away; a probe sent early finds the endpoint back,
    and everything waiting goes then. A probe that fails counts for no retry."""
    gateway = make_gateway(webhooks_config(("crm", receiver), retries="[60, 60, 60]", probe_interval=1))
    receiver.status = 503
    records = [call_in(gateway, "twilio") for _ in range(3)]
    # Each call's first event failed (its second waits behind it), then a probe or two.
    _wait(lambda: all(e["deliveries"][0]["attempts"] >= 1 and e["deliveries"][0]["last_status_code"] == 503
                      for e in events_of(gateway, type="call.started")["events"]) and receiver.deliveries > 4,
          timeout=15)
    receiver.status = 200
    for record in records:
        receiver.wait_for(lambda r, record=record: len(r.for_call(record.id)) >= 2, timeout=15)
    for event in recorded_delivered(gateway, call_id=records[0].id):
        (delivery,) = event["deliveries"]
        assert delivery["attempts"] <= 2  # the failed attempt, and the one that went through


def test_a_410_disables_the_endpoint_until_it_is_enabled(events_gateway, receiver):
    receiver.status = 410
    record = call_in(events_gateway, "twilio")
    events_gateway.client.get("/v1/webhooks", headers=AUTH)
    disabled = _wait(lambda: events_gateway.client.get("/v1/webhooks", headers=AUTH).json()["webhooks"][0]["disabled_at"])
    assert disabled
    (crm,) = events_gateway.client.get("/v1/webhooks", headers=AUTH).json()["webhooks"]
    assert "410" in crm["disabled_reason"] and "secret" not in crm
    statuses = {e["deliveries"][0]["status"] for e in events_of(events_gateway, call_id=record.id)["events"]}
    assert statuses <= {"failed", "skipped"} and "failed" in statuses
    event_id = events_of(events_gateway, call_id=record.id, type="call.started")["events"][0]["id"]
    refused = events_gateway.client.post(f"/v1/events/{event_id}/redeliver", headers=AUTH)
    assert refused.status_code == 409 and "enable" in refused.json()["detail"]

    receiver.status = 200
    assert events_gateway.client.post("/v1/webhooks/crm/enable", headers=AUTH).json()["disabled_at"] is None
    assert events_gateway.client.post(f"/v1/events/{event_id}/redeliver", json={"endpoint": "crm"},
                                      headers=AUTH).status_code == 202
    assert receiver.wait_for_type("call.started", record.id).id == event_id


def test_endpoints_get_only_the_events_and_routes_they_ask_for(make_gateway, fake_ultravox):
    with EventReceiver() as ends, EventReceiver() as other_route:
        config = webhooks_config(("ends", ends), extra='events = ["call.ended", "transfer.*"]\n')
        config = config.replace("\n[events]", f'\n[[webhooks]]\nname = "inline-only"\nurl = "{other_route.url}"\n'
                                              f'secret = "{other_route.secret}"\nroutes = ["inline"]\n\n[events]')
        gateway = make_gateway(config)
        record = call_in(gateway, "telnyx")
        end_call(gateway, fake_ultravox, record)
        ended = ends.wait_for_type("call.ended", record.id)
        assert [e.type for e in ends.for_call(record.id)] == ["call.ended"] and ended.data["artifacts"] == "complete"
        assert other_route.order == []


def test_call_ended_goes_without_what_ultravox_does_not_have(events_gateway, fake_ultravox, receiver):
    record = call_in(events_gateway, "plivo")
    # Ultravox says the call ended but never produces a summary: after artifacts_wait_seconds it goes.
    fake_ultravox.end_call(record.ultravox_call_id, messages=TRANSCRIPT[:1])
    ultravox_event(events_gateway, "call.ended", {"callId": record.ultravox_call_id, "endReason": "hangup"})
    ended = receiver.wait_for_type("call.ended", record.id, timeout=15)
    assert ended.data["artifacts"] == "partial" and ended.data["summary"] is None
    assert ended.data["transcript"] == [{"role": "agent", "text": "Hello, thanks for calling.", "medium": "voice"}]


def test_a_call_refused_for_no_route_ends_with_no_artifacts(events_gateway, receiver):
    form = double("twilio").inbound_form(to="+15559990000")
    assert events_gateway.post("twilio", form).status_code == 200
    (record,) = events_gateway.records()
    ended = receiver.wait_for_type("call.ended", record.id)
    assert ended.data["artifacts"] == "none" and ended.data["status"] == record.status and ended.data["transcript"] is None


# --- the API ------------------------------------------------------------------------------------------------


def test_events_api_refuses_what_it_does_not_know(events_gateway, receiver):
    client = events_gateway.client
    assert client.get("/v1/events").status_code == 401
    assert client.get("/v1/webhooks").status_code == 401
    for query in ({"type": "call.nope"}, {"status": "lost"}, {"limit": "0"}, {"limit": "x"}, {"cursor": "abc"}):
        assert client.get("/v1/events", params=query, headers=AUTH).status_code == 400, query
    assert client.get("/v1/events/evt_nope", headers=AUTH).status_code == 404
    assert client.post("/v1/events/evt_nope/redeliver", headers=AUTH).status_code == 404
    assert client.post("/v1/webhooks/nope/enable", headers=AUTH).status_code == 404
    record = call_in(events_gateway, "twilio")
    event_id = receiver.wait_for_type("call.started", record.id).id
    assert client.post(f"/v1/events/{event_id}/redeliver", json={"endpoint": "nope"}, headers=AUTH).status_code == 422
    assert client.post(f"/v1/events/{event_id}/redeliver", content=b"endpoint=crm", headers={
        **AUTH, "content-type": "application/x-www-form-urlencoded"}).status_code == 415
    assert client.post(f"/v1/events/{event_id}/redeliver", json={"endpoint": 5}, headers=AUTH).status_code == 422


def test_events_list_pages_newest_first(events_gateway, receiver):
    records = [call_in(events_gateway, "twilio") for _ in range(3)]
    receiver.wait_for(lambda r: len(r.order) >= 6)
    first = events_of(events_gateway, limit=4)
    second = events_of(events_gateway, limit=4, cursor=first["next_cursor"])
    listed = first["events"] + second["events"]
    ids = [e["id"] for e in listed]
    assert len(ids) == len(set(ids)) == 6 and second["next_cursor"] is None
    assert {e["call_id"] for e in listed} == {r.id for r in records}
    # Newest first: each call's events in the reverse of the order the receiver got them (calls
    # are delivered side by side, each in its own order).
    for record in records:
        of_call = [e["id"] for e in listed if e["call_id"] == record.id]
        assert of_call == [i for i in reversed(receiver.order) if i in of_call]


def test_openapi_documents_every_event_and_the_events_routes(events_gateway):
    document = events_gateway.client.get("/v1/openapi.json").json()
    assert set(document["webhooks"]) == {"call.started", "call.status_changed", "call.ended", "transfer.started",
                                         "transfer.ended", "campaign.started", "campaign.ended", "campaign.row_finished"}
    ended = document["components"]["schemas"]["CallEndedData"]
    assert {"summary", "transcript", "durations", "recordings", "transfers"} <= set(ended["properties"])
    assert {"/v1/events", "/v1/events/{event_id}", "/v1/events/{event_id}/redeliver", "/v1/webhooks"} <= set(
        document["paths"])


# --- configuration ------------------------------------------------------------------------------------------


def test_webhook_settings_are_checked(tmp_path):
    def problems(toml: str = "", **environ: str) -> str:
        path = tmp_path / "gateway.toml"
        path.write_text(BASE_CONFIG + toml)
        with pytest.raises(ConfigError) as error:
            load_settings(path, environ)
        return str(error.value)

    secret = new_webhook_secret()
    assert "whsec_" in problems('[[webhooks]]\nurl = "https://crm.example.com/h"\nsecret = "hunter2"\n')
    assert "http(s)" in problems(f'[[webhooks]]\nurl = "ftp://crm.example.com"\nsecret = "{secret}"\n')
    assert "matches no event type" in problems(
        f'[[webhooks]]\nurl = "https://crm.example.com"\nsecret = "{secret}"\nevents = ["call.begun"]\n')
    assert "routes that are not configured" in problems(
        f'[[webhooks]]\nurl = "https://crm.example.com"\nsecret = "{secret}"\nroutes = ["sales-line"]\n')
    assert "same name" in problems(f'[[webhooks]]\nurl = "https://a.example.com"\nsecret = "{secret}"\n'
                                   f'[[webhooks]]\nurl = "https://b.example.com"\nsecret = "{secret}"\n')
    assert "go together" in problems(GATEWAY_WEBHOOK_URL="https://crm.example.com/h")
    assert "more than 0" in problems("[events]\nretry_schedule_seconds = [5, 0]\n")
    path = tmp_path / "ok.toml"
    path.write_text(BASE_CONFIG)
    settings = load_settings(path, {"GATEWAY_WEBHOOK_URL": "https://crm.example.com/h", "GATEWAY_WEBHOOK_SECRET": secret})
    (webhook,) = settings.webhooks
    assert (webhook.name, webhook.url) == ("default", "https://crm.example.com/h") and secret in settings.secrets()
    assert sum(settings.events.retry_schedule_seconds) > 20 * 3600  # the default retries for about a day


def _wait(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_events_owed_by_a_gateway_killed_with_sigkill_are_delivered_by_the_next(
        tmp_path, fake_ultravox, fake_carriers, receiver, database_url):
    """The real `gateway serve`, SIGKILLed while its deliveries wait for a receiver that is down."""
    from gateway.testing import GatewayProcess

    from .conftest import gateway_environ

    config = tmp_path / "events.toml"
    # The claims the killed process held run out a second after their send's timeout (10 s by default).
    config.write_text(BASE_CONFIG + webhooks_config(("crm", receiver), lease_margin=1.0))
    environ = gateway_environ(fake_ultravox, database_url, fake_carriers)

    def serve(name):
        return GatewayProcess(config, environ, work_dir=tmp_path, name=name).start().wait_ready()

    receiver.down()
    first = serve("first")
    try:
        carrier_call_ids = []
        for carrier in CARRIER_NAMES:
            form = double(carrier).inbound_form(to=SUPPORT_NUMBER)
            request = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", form)
            url = f"{first.url}/{carrier}/inbound" + (f"?{request.query}" if request.query else "")
            assert httpx.request(request.method, url, content=request.body, headers=request.headers).status_code == 200
            carrier_call_ids.append(form[double(carrier).call_id_param])
        # It tried, and is waiting to try again (from its delivery process: seconds to start when busy).
        first.wait_for_log("attempt 2 in", timeout=30)
    finally:
        first.kill()
        first.wait(10)
    second = serve("second")
    try:
        receiver.up()
        receiver.wait_for(lambda r: len(r.order) >= 2 * len(CARRIER_NAMES), timeout=30)
        assert [e.type for e in receiver.of_type("call.started")] and receiver.repeats == 0
        started = receiver.of_type("call.started")
        assert sorted(e.data["call"]["carrier_call_id"] for e in started) == sorted(carrier_call_ids)
        for event in started:  # each call's started came before its status change
            (changed,) = receiver.of_type("call.status_changed", event.call_id)
            assert receiver.order.index(event.id) < receiver.order.index(changed.id)
    finally:
        second.close()


def test_a_call_hung_up_through_the_api_ends_with_its_events(events_gateway, receiver):
    record = call_in(events_gateway, "telnyx")
    response = events_gateway.client.post(f"/v1/calls/{record.id}/hangup", headers=AUTH)
    assert response.status_code == 200, response.text
    ended = receiver.wait_for_type("call.ended", record.id)
    assert ended.data["status"] == "completed" and ended.data["end_reason"] == "hangup-api"
    changed = receiver.of_type("call.status_changed", record.id)
    assert [(e.data["previous_status"], e.data["status"]) for e in changed] == [
        ("creating", "in-progress"), ("in-progress", "completed")]


def test_the_loop_pace_tells_a_loop_that_is_behind_from_one_on_time():
    """What deliveries go by to give way to callers (EventDelivery.giving_way)."""
    import asyncio
    import time

    from gateway.flows.events import LOOP_BEHIND_SECONDS, LoopPace

    async def scenario():
        pace = LoopPace()
        pace.start()
        try:
            await asyncio.sleep(0.3)
            on_time = pace.late
            for _ in range(10):  # a loop with more to do than it gets through: every turn blocks
                await asyncio.sleep(0)
                time.sleep(0.05)
            behind = pace.late
        finally:
            await pace.stop()
        return on_time, behind

    on_time, behind = asyncio.run(scenario())
    # (An idle loop's timers run late only by what the machine's other load costs it.)
    assert LOOP_BEHIND_SECONDS < behind and on_time < behind / 4
