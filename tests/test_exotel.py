"""What is Exotel's own, beyond the scenarios every carrier runs: Basic credentials instead of a
signature, numbers in national form, a dial that names the stream, no live-call control."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlparse

import pytest

from gateway.testing import FakeResponse, double, exotel_basic_auth, exotel_inbound_params

from .conftest import AGENT_ID, API_KEY, BASE_CONFIG, PUBLIC_URL, TOOL_SECRET

EXOPHONE = "+918047491899"
CALLER = "+919876543210"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXOTEL = double("exotel")
INDIAN_LINE = f"""
[[routes]]
number = "{EXOPHONE}"
name = "bengaluru"
agent_id = "{AGENT_ID}"
operators = ["sales"]
"""


@pytest.fixture
def exotel_gateway(make_gateway):
    config = BASE_CONFIG.replace('allowed_prefixes = ["+1", "+44"]', 'allowed_prefixes = ["+1", "+44", "+91"]')
    return make_gateway(INDIAN_LINE, config=config)


def voicebot(gateway, params, headers=None):
    """Exotel's request to the Voicebot applet's URL: a GET with the call in the query."""
    return gateway.client.get("/exotel/inbound", params=params, headers=headers)


def test_the_voicebot_url_answers_json_naming_the_join_url_and_records_e164_numbers(exotel_gateway, fake_ultravox):
    params = exotel_inbound_params(from_=CALLER, to=EXOPHONE)
    assert params["CallTo"] == "08047491899"  # as Exotel writes it
    response = voicebot(exotel_gateway, params, exotel_basic_auth(EXOTEL.webhook_username, EXOTEL.webhook_password))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (created,) = fake_ultravox.requests
    assert json.loads(response.text) == {"url": fake_ultravox.created_calls[0]["joinUrl"]}
    assert created.body["medium"] == {"exotel": {}}
    # The route names an operator, but Exotel cannot move a live call: no transfer tools.
    assert "toolOverrides" not in created.body
    (record,) = exotel_gateway.records()
    assert (record.from_number, record.to_number, record.route) == (CALLER, EXOPHONE, "bengaluru")


@pytest.mark.parametrize("credentials", [None, ("exotel-hook", "wrong"), ("someone", "exotel-hook-password")])
def test_missing_or_wrong_basic_credentials_get_401_and_create_nothing(exotel_gateway, fake_ultravox, credentials):
    headers = exotel_basic_auth(*credentials) if credentials else None
    response = voicebot(exotel_gateway, exotel_inbound_params(to=EXOPHONE), headers)
    assert response.status_code == 401
    assert fake_ultravox.requests == [] and exotel_gateway.records() == []


def test_garbled_authorization_headers_are_refused(exotel_gateway, fake_ultravox):
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe").decode(), "Bearer x", "Basic"):
        assert voicebot(exotel_gateway, exotel_inbound_params(to=EXOPHONE), {"Authorization": header}).status_code == 401
    assert fake_ultravox.requests == []


@pytest.mark.parametrize("networks, status", [('["10.0.0.0/8"]', 401), ('["127.0.0.0/8", "10.0.0.0/8"]', 200)])
def test_allowed_sources_restrict_who_may_call(make_gateway, fake_ultravox, networks, status):
    gateway = make_gateway(INDIAN_LINE + f"\n[exotel]\nallowed_sources = {networks}\n")
    response = voicebot(gateway, exotel_inbound_params(to=EXOPHONE),
                        exotel_basic_auth(EXOTEL.webhook_username, EXOTEL.webhook_password))
    assert response.status_code == status


def test_a_post_form_or_json_is_accepted_too(exotel_gateway, fake_ultravox):
    auth = exotel_basic_auth(EXOTEL.webhook_username, EXOTEL.webhook_password)
    form = exotel_gateway.client.post("/exotel/inbound", data=exotel_inbound_params(to=EXOPHONE), headers=auth)
    body = exotel_gateway.client.post("/exotel/inbound", json=exotel_inbound_params(to=EXOPHONE), headers=auth)
    assert form.status_code == body.status_code == 200
    assert fake_ultravox.calls_created == 2
    xml = exotel_gateway.client.post("/exotel/inbound", content=b"<x/>", headers={**auth, "content-type": "text/xml"})
    assert xml.status_code == 415


def test_a_transfer_asked_for_anyway_is_refused_in_words_the_agent_can_say(exotel_gateway, fake_ultravox, fake_carriers):
    voicebot(exotel_gateway, exotel_inbound_params(to=EXOPHONE),
             exotel_basic_auth(EXOTEL.webhook_username, EXOTEL.webhook_password))
    (record,) = exotel_gateway.records()
    response = exotel_gateway.client.post("/tools/transfer", headers={"X-Gateway-Tool-Secret": TOOL_SECRET}, json={
        "callId": record.ultravox_call_id, "operator": "sales", "reason": "wants a person"})
    assert response.status_code == 200
    assert "can't transfer calls on this phone line" in response.text
    assert fake_carriers["exotel"].requests == []


def test_outbound_calls_create_the_agent_first_and_dial_into_its_stream(exotel_gateway, fake_ultravox, fake_carriers):
    response = exotel_gateway.client.post("/v1/calls", headers=AUTH, json={
        "to": CALLER, "route": "bengaluru", "carrier": "exotel"})
    assert response.status_code == 201, response.text
    call = response.json()
    (created,) = fake_ultravox.requests  # before the phone rings: Exotel streams on pick-up
    assert created.body["medium"] == {"exotel": {}}
    assert created.body["joinTimeout"] == "55s"  # the ring timeout (25 s) and a margin
    (placed,) = fake_carriers["exotel"].calls
    params = placed.params
    assert (params["From"], params["CallerId"]) == ("09876543210", "08047491899")  # national, as Exotel writes
    assert params["StreamUrl"] == fake_ultravox.created_calls[0]["joinUrl"]
    assert params["StreamType"] == "bidirectional"
    assert params["StatusCallbackEvents[]"] == ["ringing", "answered", "terminal"]
    assert params["StatusCallback"].startswith(f"{PUBLIC_URL}/exotel/status?call={call['id']}&t=")
    assert call["carrier_call_id"] == placed.call_id

    # Exotel sends no credentials with its status callbacks: the URL's token is the proof.
    forged = params["StatusCallback"].split("&t=")[0] + "&t=" + "0" * 32
    assert fake_carriers["exotel"].callback(forged, {"CallSid": placed.call_id, "Status": "completed"}).status_code == 403
    assert fake_carriers["exotel"].send_status(placed, "answered").status_code == 204
    assert exotel_gateway.client.get(f"/v1/calls/{call['id']}", headers=AUTH).json()["status"] == "in-progress"


def test_exotel_refuses_what_it_cannot_do_before_dialling(exotel_gateway, fake_ultravox, fake_carriers):
    for extra, why in (({"via": "ultravox"}, "Ultravox cannot place Exotel calls"),
                       ({"answering_machine_detection": True}, "answering_machine_detection")):
        response = exotel_gateway.client.post("/v1/calls", headers=AUTH, json={
            "to": CALLER, "route": "bengaluru", "carrier": "exotel", **extra})
        assert response.status_code == 422 and why in response.text
    assert fake_ultravox.requests == [] and fake_carriers["exotel"].calls == []


def test_a_refused_dial_fails_the_call_and_says_why(exotel_gateway, fake_ultravox, fake_carriers):
    fake_carriers["exotel"].script(FakeResponse(status=403))  # e.g. Voicebot calls not enabled on the account
    call = exotel_gateway.client.post("/v1/calls", headers=AUTH, json={
        "to": CALLER, "route": "bengaluru", "carrier": "exotel"}).json()
    assert call["status"] == "failed" and "Exotel answered 403" in call["failure_reason"]
    assert len(fake_carriers["exotel"].requests) == 1


def test_bridge_mode_stream_urls_carry_the_media_token_in_the_query(make_gateway, fake_ultravox):
    gateway = make_gateway(INDIAN_LINE.replace('operators = ["sales"]', 'mode = "bridge"'))
    response = voicebot(gateway, exotel_inbound_params(to=EXOPHONE),
                        exotel_basic_auth(EXOTEL.webhook_username, EXOTEL.webhook_password))
    url = urlparse(json.loads(response.text)["url"])
    (record,) = gateway.records()
    assert f"{url.scheme}://{url.netloc}{url.path}" == "wss://gateway.example.test/media/exotel"
    query = parse_qs(url.query)
    assert query["call"] == [record.id] and query["token"]
    assert fake_ultravox.requests[0].body["medium"]["serverWebSocket"]["inputSampleRate"] == 8000


def test_allowed_sources_cover_callbacks_too(make_gateway, fake_ultravox, fake_carriers):
    config = BASE_CONFIG.replace('allowed_prefixes = ["+1", "+44"]', 'allowed_prefixes = ["+1", "+44", "+91"]')
    gateway = make_gateway(INDIAN_LINE + '\n[exotel]\nallowed_sources = ["10.0.0.0/8"]\n', config=config)
    call = gateway.client.post("/v1/calls", headers=AUTH, json={
        "to": CALLER, "route": "bengaluru", "carrier": "exotel"}).json()
    (placed,) = fake_carriers["exotel"].calls
    assert fake_carriers["exotel"].send_status(placed, "completed").status_code == 401  # from 127.0.0.1
    assert gateway.client.get(f"/v1/calls/{call['id']}", headers=AUTH).json()["status"] == "queued"
