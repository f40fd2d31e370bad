"""Odd input at the edge gets a clear 4xx, never a 500 with a traceback (issue 14, item 8): each case
sent to the running gateway, with and without credentials."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import pytest
import websockets

from gateway import inputs
from gateway.carriers import CARRIERS
from gateway.testing import double

from .conftest import API_KEY, CARRIER_NAMES, SUPPORT_NUMBER, TOOL_SECRET, TRANSFER_CARRIERS
from .test_outbound import ultravox_event

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's JSON parser recurses
FAIRLY_DEEP = "[" * 200 + "]" * 200  # parses, but deeper than anything the gateway is sent


def _cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# --- unauthenticated --------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
@pytest.mark.parametrize("leg", ["%C2%B2", "%D9%A3", "9" * 5000])  # superscript two, Arabic-Indic three
def test_a_transfer_callback_whose_leg_is_no_number_is_a_400(gateway, carrier, leg):
    # Read before the signature check: str.isdigit() let "²" through to int().
    response = gateway.client.post(f"/{carrier}/transfer/result?transfer=x&leg={leg}&t=x", content=b"a=b",
                                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400, response.text


def _media_socket_status(gateway, carrier: str, token: str) -> int | None:
    url = f"ws://{gateway.server.host}:{gateway.server.port}/media/{carrier}?call=x&token={token}"

    async def scenario():
        try:
            async with websockets.connect(url, open_timeout=5):
                return None
        except websockets.InvalidStatus as error:
            return error.response.status_code

    return asyncio.run(scenario())


@pytest.mark.parametrize("token", ["%C2%B2.x", "9" * 5000 + ".x", "%D9%A3.x", "1.%C2%B2"])
def test_a_media_token_that_is_no_token_is_refused_not_a_500(gateway, token):
    carriers = [name for name, carrier in CARRIERS.items() if not carrier.upgrade_is_signed]
    for carrier in carriers:
        assert _media_socket_status(gateway, carrier, token) == 403


# --- with an API key --------------------------------------------------------------------------------


ODD_LISTINGS = [
    "/v1/calls?created_after=9999-12-31T23:59:59-23:59",  # year 10000 in UTC
    "/v1/calls?created_before=0001-01-01T00:00:00%2B01:00",  # before year 1 in UTC
    "/v1/calls?created_after=%C2%B2",
    "/v1/calls?limit=%D9%A3",
    "/v1/calls?limit=" + "9" * 5000,
    f"/v1/calls?cursor={_cursor([[], 1])}",
    f"/v1/calls?cursor={_cursor([1, 2])}",
    f"/v1/calls?cursor={_cursor(['9999-12-31T23:59:59-23:59', 'x'])}",
    f"/v1/calls?cursor={_cursor(['2026-01-01T00:00:00Z', 'x' + chr(0)])}",
    "/v1/calls?cursor=" + base64.urlsafe_b64encode(b"[" * 150).decode(),
    "/v1/events?cursor=%C2%B2",
    "/v1/events?cursor=" + "9" * 5000,
    "/v1/events?call_id=%00",
    "/v1/events?limit=%C2%B2",
    "/v1/campaigns?limit=%C2%B2",
    "/v1/suppressions?after=%00",
    "/v1/suppressions?limit=" + "9" * 5000,
    "/v1/campaigns/{campaign}/rows?after=%C2%B2",
    "/v1/campaigns/{campaign}/rows?after=99999999999999999999999999",
    "/v1/campaigns/{campaign}/rows?after=-99999999999999999999999",
    "/v1/campaigns/{campaign}/rows?after=" + "9" * 5000,
    "/v1/campaigns/{campaign}/rows?status=%00",
]


def test_odd_cursors_dates_and_numbers_on_the_listings_are_400s(make_gateway, database_url):
    gateway = make_gateway(database_url=database_url)
    campaign = gateway.client.post("/v1/campaigns", headers=AUTH, json={
        "name": "odd", "route": "support", "rows": [{"to": "+15557654321"}]})
    assert campaign.status_code == 201, campaign.text
    for path in ODD_LISTINGS:
        response = gateway.client.get(path.replace("{campaign}", campaign.json()["id"]), headers=AUTH)
        assert response.status_code == 400, (path[:80], response.status_code, response.text[:200])
    # and what a person would send still works
    assert gateway.client.get("/v1/calls?created_after=2026-01-01&limit=3", headers=AUTH).status_code == 200
    assert gateway.client.get("/v1/calls?created_after=9999-12-30T00:00:00Z", headers=AUTH).json()["calls"] == []


def test_a_nul_in_a_path_is_a_404_not_a_database_error(make_gateway, database_url):
    gateway = make_gateway(database_url=database_url)
    for path in ("/v1/calls/x%00", "/v1/calls/x%00/recording", "/v1/events/x%00", "/v1/campaigns/x%00",
                 "/v1/campaigns/x%00/rows"):
        response = gateway.client.get(path, headers=AUTH)
        assert response.status_code == 404, (path, response.text)
    assert gateway.client.delete("/v1/suppressions/%2B1555%00", headers=AUTH).status_code == 404


def test_a_nul_in_a_dial_request_is_a_422(gateway):
    response = gateway.client.post("/v1/calls", headers=AUTH, json={
        "to": "+15557654321", "route": "support", "metadata": {"crm": "4\x002"}})
    assert response.status_code == 422, response.text


# --- with a carrier's signature -----------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_status_callback_with_a_duration_that_is_no_number_is_served(gateway, carrier):
    fields = double(carrier).status_fields("completed", 42)
    odd = {name: ("²" if value == "42" else value) for name, value in fields.items()}
    assert odd != fields, "the carrier's status callback names no duration"
    response = gateway.post(carrier, {**double(carrier).inbound_form(to=SUPPORT_NUMBER), **odd}, path=f"/{carrier}/status")
    assert response.status_code == 204, response.text


# --- with Ultravox's signature -----------------------------------------------------------------------


def _answered_call(gateway, fake_ultravox):
    form = double("twilio").inbound_form(to=SUPPORT_NUMBER)
    assert gateway.post("twilio", form).status_code == 200
    return fake_ultravox.created_calls[-1]["callId"]


def test_a_naive_joined_with_an_aware_ended_gives_the_duration(gateway, fake_ultravox):
    call_id = _answered_call(gateway, fake_ultravox)
    response = ultravox_event(gateway, "call.ended", {
        "callId": call_id, "joined": "2026-11-20T10:00:00", "ended": "2026-11-20T10:01:30Z", "endReason": "hangup"})
    assert response.status_code == 204, response.text
    (record,) = gateway.records()
    assert record.status == "completed" and record.duration_seconds == 90


@pytest.mark.parametrize("document", [DEEP, FAIRLY_DEEP])
def test_deeply_nested_json_from_ultravox_is_a_400(gateway, fake_ultravox, document):
    call_id = _answered_call(gateway, fake_ultravox)
    response = ultravox_event(gateway, "call.ended", {"callId": call_id, "summary": "{}", "x": "{}"})
    assert response.status_code == 204
    from gateway.security import sign_ultravox_webhook

    body = ('{"event": "call.ended", "call": {"callId": "%s", "deep": %s}}' % (call_id, document)).encode()
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    response = gateway.client.post("/ultravox/events", content=body, headers={
        "content-type": "application/json", "X-Ultravox-Webhook-Timestamp": now,
        "X-Ultravox-Webhook-Signature": sign_ultravox_webhook("ultravox-webhook-secret", body, now)})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("path", ["/tools/transfer", "/tools/warm-transfer"])
@pytest.mark.parametrize("document", [DEEP, FAIRLY_DEEP])
def test_deeply_nested_json_in_a_tool_call_is_a_400(gateway, path, document):
    body = ('{"callId": "x", "operator": "sales", "reason": %s}' % document).encode()
    response = gateway.client.post(path, content=body, headers={
        "X-Gateway-Tool-Secret": TOOL_SECRET, "content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_control_characters_in_an_ultravox_event_are_a_400_and_change_nothing(gateway, fake_ultravox):
    call_id = _answered_call(gateway, fake_ultravox)
    for call in ({"callId": call_id, "endReason": "hang\x00up"}, {"callId": call_id, "summary": "a\x01b"},
                 {"callId": call_id + "\x00"}, {"callId": call_id, "extra": {"deep": ["\x1b[31m"]}}):
        assert ultravox_event(gateway, "call.ended", call).status_code == 400, call
    (record,) = gateway.records()
    assert record.status != "completed"


@pytest.mark.parametrize("path", ["/tools/transfer", "/tools/warm-transfer"])
def test_control_characters_in_a_tool_call_are_a_400(gateway, path):
    response = gateway.client.post(path, json={"callId": "x", "operator": "sales\x00", "reason": "r"},
                                   headers={"X-Gateway-Tool-Secret": TOOL_SECRET})
    assert response.status_code == 400, response.text


# --- the parsers themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["²", "٣", "+3", " 3", "3 ", "1_000", "", "-1", "9" * 5000, "0x10"])
def test_whole_numbers_take_ascii_digits_only(text):
    with pytest.raises(inputs.InvalidInput):
        inputs.whole_number(text, name="n", maximum=10**6)
    assert inputs.whole_number("-1", name="n", minimum=-1, maximum=5) == -1
    assert inputs.whole_number("0005", name="n", maximum=5) == 5


def test_times_are_always_aware_utc_and_in_range():
    assert inputs.timestamp("2026-11-20T10:00:00", name="t").tzinfo == dt.timezone.utc
    assert inputs.timestamp("2026-11-20T12:00:00+02:00", name="t") == dt.datetime(2026, 11, 20, 10, tzinfo=dt.timezone.utc)
    for text in ("9999-12-31T23:59:59-23:59", "0001-01-01", "²", "2026-11-20T10:00:00" + " " * 50):
        with pytest.raises(inputs.InvalidInput):
            inputs.timestamp(text, name="t")
    assert inputs.timestamp_or_none(["not", "a", "time"]) is None


# --- carrier call ids in the carrier's shape on every callback -----------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
@pytest.mark.parametrize("call_id", ["x" * 300, "a b", "CA" + "0" * 31 + "'"])
def test_a_status_callback_naming_a_call_id_not_in_the_carriers_shape_is_a_400(gateway, carrier, call_id):
    form = {**double(carrier).inbound_form(to=SUPPORT_NUMBER), **double(carrier).status_fields("completed", 42)}
    form[double(carrier).call_id_param] = call_id
    response = gateway.post(carrier, form, path=f"/{carrier}/status")
    assert response.status_code == 400, response.text
    assert gateway.records() == []


# --- premium-rate and shared-cost numbers -------------------------------------------------------------

PREMIUM_RATE = "+449012345678"  # phonenumbers' example GB premium-rate number (+44 is allowed in the tests)
SHARED_COST = "+33884012345"  # its example FR shared-cost number


@pytest.mark.parametrize("number", [PREMIUM_RATE, SHARED_COST])
def test_the_dial_api_refuses_premium_rate_and_shared_cost_numbers(make_gateway, fake_carriers, number):
    from .conftest import BASE_CONFIG
    from .test_outbound import dial

    gateway = make_gateway(config=BASE_CONFIG.replace('allowed_prefixes = ["+1", "+44"]',
                                                      'allowed_prefixes = ["+1", "+44", "+33"]'))
    response = dial(gateway, to=number, carrier="twilio")
    assert response.status_code == 403, response.text
    assert "allow_" in response.json()["detail"]
    assert fake_carriers["twilio"].calls == []


def test_allowed_premium_rate_numbers_are_dialled(make_gateway, fake_carriers):
    from .conftest import BASE_CONFIG
    from .test_outbound import dial

    gateway = make_gateway(config=BASE_CONFIG.replace("calls_per_minute_per_key = 5",
                                                      "calls_per_minute_per_key = 5\nallow_premium_rate = true"))
    assert dial(gateway, to=PREMIUM_RATE, carrier="twilio").status_code == 201


def test_a_campaign_row_to_a_premium_rate_number_is_rejected(gateway, fake_carriers):
    response = gateway.client.post("/v1/campaigns", headers=AUTH, json={
        "name": "costly", "route": "support", "rows": [{"to": PREMIUM_RATE}, {"to": "+15557654321"}]})
    assert response.status_code == 201, response.text
    rows = gateway.client.get(f"/v1/campaigns/{response.json()['id']}/rows", headers=AUTH).json()["rows"]
    assert rows[0]["status"] == "rejected" and "premium-rate" in rows[0]["reason"]


def test_an_operator_with_a_premium_rate_number_is_a_configuration_problem(tmp_path):
    from gateway.settings import ConfigError, load_settings

    from .conftest import BASE_CONFIG

    path = tmp_path / "gateway.toml"
    path.write_text(BASE_CONFIG.replace('number = "+15557770003"', f'number = "{PREMIUM_RATE}"'))
    with pytest.raises(ConfigError) as raised:
        load_settings(path, {})
    assert any("operator nightowl" in problem and "premium-rate" in problem for problem in raised.value.problems)
    allowed = path.read_text().replace("calls_per_minute_per_key = 5", "calls_per_minute_per_key = 5\nallow_premium_rate = true")
    path.write_text(allowed)
    assert load_settings(path, {}).operators["nightowl"].number == PREMIUM_RATE
