"""The call-control API end to end: hang up, cancel, transfer and tell the agent, on every carrier,
through the real gateway against the fake carrier REST APIs and the fake Ultravox."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from gateway.carriers import CARRIERS
from gateway.testing import FakeResponse, FakeTwilio, FakeUltravox, double

from .conftest import AGENT_ID, ANSWER_WEBHOOK_CARRIERS, API_KEY, CARRIER_NAMES, TRANSFER_CARRIERS, ULTRAVOX_DIAL_CARRIERS
from .test_bridge import BRIDGED_NUMBER, BridgedCall, _refused, local
from .test_outbound import call_of, dial, ultravox_event
from .test_transfer import SALES, LiveCall

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Carriers whose REST API ends a call; on the others ending the Ultravox call closes the stream.
REST_HANGUP = [name for name, c in CARRIERS.items() if c.can_hang_up]
STREAM_HANGUP = [name for name, c in CARRIERS.items() if not c.can_hang_up]
NO_TRANSFER = [name for name, c in CARRIERS.items() if not c.can_transfer]
ACTIONS = ("hangup", "transfer", "messages")
VALID_BODY = {
    "hangup": {},
    "transfer": {"operator": "sales", "reason": "Wants a quote for 40 seats"},
    "messages": {"text": "The customer's order shipped today."},
}
UNKNOWN_CALL = "00000000-0000-4000-8000-000000000000"
BRIDGED_ROUTE = f'[[routes]]\nnumber = "{BRIDGED_NUMBER}"\nname = "bridged"\nagent_id = "{AGENT_ID}"\nmode = "bridge"\n'


def act(gateway, call_id, action, body=None, *, headers=AUTH, **request):
    if body is not None:
        request["json"] = body
    return gateway.client.post(f"/v1/calls/{call_id}/{action}", headers=headers, **request)


@pytest.fixture
def live(gateway, fake_ultravox, fake_carriers):
    return lambda carrier: LiveCall(gateway, fake_ultravox, fake_carriers, carrier)


@pytest.fixture
def bridged(make_gateway, fake_ultravox):
    gateway = make_gateway(BRIDGED_ROUTE)
    return lambda carrier: BridgedCall(gateway, fake_ultravox, carrier)


def endings(fake, call_id):
    """How each update the fake carrier accepted for `call_id` ended it (None: it did not)."""
    return [update.ended_as for update in fake.updates if update.call_id == call_id]


def test_the_carriers_say_how_their_calls_are_ended():
    # The gateway's carrier and its test double agree on who ends a call: its REST API, or the stream.
    for name, carrier in CARRIERS.items():
        assert carrier.can_hang_up == double(name).hangs_up_through_api, name


# --- hang up ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_hangup_ends_a_live_inbound_call(live, carrier):
    call = live(carrier)
    response = act(call.gateway, call.record.id, "hangup")  # no body at all
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "completed" and view["end_reason"] == "hangup-api" and view["ended_at"]
    if carrier in REST_HANGUP:
        assert endings(call.fake, call.carrier_call_id) == ["completed"]
        assert call.ultravox.data_messages == []
    else:  # no API ends the call: the Ultravox call ends, and with it the call's stream
        assert call.fake.requests == []
        assert call.ultravox.data_messages == [(call.ultravox_call_id, {"type": "hang_up"})]
        assert call.ultravox_call_id in call.ultravox.ended_calls
    assert call.view()["status"] == "completed"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_hangup_ends_an_answered_outbound_call(gateway, fake_ultravox, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier).json()
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    double(carrier).pick_up(fake, placed)
    assert call_of(gateway, call["id"])["status"] == "in-progress"
    response = act(gateway, call["id"], "hangup", {})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed" and response.json()["end_reason"] == "hangup-api"
    if carrier in REST_HANGUP:
        assert endings(fake, fake.live_id(placed)) == ["completed"]
    else:
        ((ended, message),) = fake_ultravox.data_messages
        assert message == {"type": "hang_up"} and ended == call_of(gateway, call["id"])["ultravox_call_id"]
    # The carrier's own report of the end fills in the rest; the status and reason stay.
    fake.send_status(placed, "completed", **double(carrier).status_fields("completed", 12))
    tracked = call_of(gateway, call["id"])
    assert (tracked["status"], tracked["end_reason"], tracked["duration_seconds"]) == ("completed", "hangup-api", 12)


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_hangup_cancels_a_ringing_outbound_call(gateway, fake_ultravox, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier).json()
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    fake.send_status(placed, "ringing")
    assert call_of(gateway, call["id"])["status"] == "ringing"
    response = act(gateway, call["id"], "hangup")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "canceled" and response.json()["end_reason"] == "canceled"
    if carrier in REST_HANGUP:
        # Stopped before anyone answered, with the parameters the carrier's API takes to do so.
        (update,) = [u for u in fake.updates if u.call_id == fake.live_id(placed)]
        assert update.ended_as == "canceled"
        if carrier == "twilio":
            assert update.params == {"Status": "canceled"}
    else:  # the agent's call, created before the phone rang, ends: the callee finds no stream
        ((_, message),) = fake_ultravox.data_messages
        assert message == {"type": "hang_up"}
    if carrier in ANSWER_WEBHOOK_CARRIERS:
        # Should the callee still pick up, the answer webhook hangs up: nobody is connected.
        assert double(carrier).verbs(fake.answer(placed).text) == ["hangup"]
        assert fake_ultravox.requests == []
    assert act(gateway, call["id"], "hangup").status_code == 409


def test_twilio_cancel_of_a_call_answered_meanwhile_hangs_it_up(gateway, fake_carriers):
    # The gateway still thinks it rings; Twilio's Status=canceled leaves an answered call alone.
    call = dial(gateway, carrier="twilio").json()
    fake = fake_carriers["twilio"]
    (placed,) = fake.calls
    fake.send_status(placed, "ringing")
    fake.set_state(placed.call_id, "in-progress")
    assert act(gateway, call["id"], "hangup").json()["status"] == "canceled"
    assert [u.params for u in fake.updates] == [{"Status": "canceled"}, {"Status": "completed"}]
    assert endings(fake, placed.call_id) == [None, "completed"]
    # The cancel is recorded provisionally: Twilio's own final word corrects it.
    fake.send_status(placed, "completed")
    assert call_of(gateway, call["id"])["status"] == "completed"


def test_a_call_canceled_before_its_carrier_names_the_leg_is_hung_up_when_it_does(gateway, fake_carriers):
    # Plivo answers a dial with a request id; the call's own id (its CallUUID) comes with its first callback.
    call = dial(gateway, carrier="plivo").json()
    fake = fake_carriers["plivo"]
    (placed,) = fake.calls
    assert call_of(gateway, call["id"])["carrier_call_id"] is None
    response = act(gateway, call["id"], "hangup")
    assert response.json()["status"] == "canceled"
    assert fake.updates == []  # nothing to address yet
    fake.send_status(placed, "ringing")  # answered once the gateway has hung the leg up
    (update,) = fake.updates
    assert (update.call_id, update.action, update.ended_as) == (placed.call_uuid, "hangup", "canceled")
    assert call_of(gateway, call["id"])["status"] == "canceled"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_hangup_of_a_bridged_call_ends_its_media_stream(bridged, fake_carriers, carrier):
    call = bridged(carrier)
    fake_carriers[carrier].live_calls.add(call.carrier_call_id)
    call_id = call.record().id

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            response = await asyncio.to_thread(act, call.gateway, call_id, "hangup")
            assert response.status_code == 200, response.text
            if carrier in STREAM_HANGUP:  # the Ultravox call ends: the bridge closes the carrier's stream
                await stream.wait_closed(timeout=5)
            return session

    session = asyncio.run(scenario())
    if carrier in REST_HANGUP:  # the carrier ends the call (and so its stream)
        assert endings(fake_carriers[carrier], call.carrier_call_id)[0] == "completed"
    else:
        assert session.closed.wait(5) and session.close_code == 1000
    assert call.record().status == "completed"


@pytest.mark.parametrize("carrier", REST_HANGUP)
def test_a_call_hung_up_while_its_dial_is_in_flight_is_canceled_once_placed(gateway, fake_carriers, carrier):
    fake = fake_carriers[carrier]
    fake.script(FakeResponse(delay=0.5))  # the carrier takes its time to accept the dial
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        dialling = pool.submit(dial, gateway, carrier=carrier)
        while not (listed := gateway.client.get("/v1/calls", headers=AUTH).json()["calls"]):
            assert not dialling.done(), dialling.result().text
            time.sleep(0.01)
        (call,) = listed
        assert act(gateway, call["id"], "hangup").json()["status"] == "canceled"
        assert dialling.result().json()["status"] == "canceled"
    (placed,) = fake.calls
    if not fake.updates:  # the dial's answer named no call (Plivo): its first callback does
        fake.send_status(placed, "ringing")
    assert endings(fake, fake.live_id(placed)) == ["canceled"]


@pytest.mark.parametrize("carrier", [name for name in STREAM_HANGUP if CARRIERS[name].dials_into_stream])
def test_a_bridged_call_canceled_while_ringing_gets_no_stream_when_answered(make_gateway, fake_carriers, carrier):
    # The carrier cannot be told to stop ringing; its dial names the gateway's media socket, which refuses.
    gateway = make_gateway(BRIDGED_ROUTE)
    call = dial(gateway, carrier=carrier, route="bridged").json()
    (placed,) = fake_carriers[carrier].calls
    fake_carriers[carrier].send_status(placed, "ringing")
    assert act(gateway, call["id"], "hangup").json()["status"] == "canceled"
    stream_url = local(gateway, double(carrier).pick_up(fake_carriers[carrier], placed).stream_url)
    assert _refused(stream_url) == 403


@pytest.mark.parametrize("carrier", ULTRAVOX_DIAL_CARRIERS)
def test_hangup_of_a_call_ultravox_placed_ends_the_ultravox_call(gateway, fake_ultravox, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier, via="ultravox").json()
    ultravox_event(gateway, "call.joined", {"callId": call["ultravox_call_id"]})
    response = act(gateway, call["id"], "hangup")
    assert response.json()["status"] == "completed" and response.json()["end_reason"] == "hangup-api"
    assert fake_ultravox.data_messages == [(call["ultravox_call_id"], {"type": "hang_up"})]
    assert not any(fake.requests for fake in fake_carriers.values())  # its carrier leg is Ultravox's


@pytest.mark.parametrize("carrier", REST_HANGUP)
def test_a_call_the_carrier_has_already_ended_counts_as_hung_up(live, carrier):
    call = live(carrier)
    call.fake.live_calls.discard(call.carrier_call_id)  # the carrier answers 404: no such call any more
    response = act(call.gateway, call.record.id, "hangup")
    assert response.status_code == 200 and response.json()["status"] == "completed"


@pytest.mark.parametrize("carrier", REST_HANGUP)
def test_a_carrier_refusing_the_hangup_is_a_502_and_changes_nothing(live, carrier):
    call = live(carrier)
    call.fake.script_updates(FakeResponse(status=500))
    response = act(call.gateway, call.record.id, "hangup")
    assert response.status_code == 502 and "500" in response.json()["detail"]
    assert call.view()["status"] == "in-progress" and call.view()["end_reason"] is None


def test_ultravox_refusing_the_hangup_is_a_502(live):
    call = live("exotel")
    call.ultravox.script_data_messages(FakeResponse(status=500))
    response = act(call.gateway, call.record.id, "hangup")
    assert response.status_code == 502
    assert call.view()["status"] == "in-progress"


# --- transfer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_cold_transfer_through_the_api_dials_the_operator_like_the_tool(live, carrier):
    call = live(carrier)
    response = act(call.gateway, call.record.id, "transfer", {"operator": "sales", "kind": "cold",
                                                              "reason": "Wants a quote for 40 seats"})
    assert response.status_code == 202, response.text
    transfer = response.json()
    assert (transfer["operator"], transfer["kind"], transfer["status"]) == ("sales", "cold", "requested")
    assert response.headers["location"] == f"/v1/calls/{call.record.id}"
    (url,) = call.redirects()
    dialled = call.double.dialled(call.fetch(url))
    assert dialled.number == SALES and dialled.timeout == 15
    call.dial_ended(dialled.action, "completed")
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "connected" and transfer["reason"] == "Wants a quote for 40 seats"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_warm_transfer_through_the_api_briefs_the_operator(live, carrier):
    call = live(carrier)
    response = act(call.gateway, call.record.id, "transfer", {
        "operator": "sales", "kind": "warm", "reason": "Wants a quote", "summary": "Ada from Acme, 40 seats."})
    assert response.status_code == 202, response.text
    (hold_url,) = call.redirects()
    conference = call.double.conference(call.fetch(hold_url))
    (leg,) = call.operator_legs()
    assert leg.to.lstrip("+") == SALES.lstrip("+")
    briefing, accept_url = call.briefing(leg)
    assert "Ada from Acme, 40 seats." in briefing
    assert call.double.conference(call.press(leg, accept_url, "1")).name == conference.name
    assert call.view()["transfers"][0]["status"] == "connected"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_second_transfer_while_one_is_under_way_is_409(live, carrier):
    call = live(carrier)
    assert act(call.gateway, call.record.id, "transfer", VALID_BODY["transfer"]).status_code == 202
    second = act(call.gateway, call.record.id, "transfer", {**VALID_BODY["transfer"], "operator": "frontdesk"})
    assert second.status_code == 409 and "under way" in second.json()["detail"]
    # The agent's tool sees the same: one path for both.
    assert "already under way" in call.tool("frontdesk").text
    assert len(call.redirects()) == 1 and len(call.view()["transfers"]) == 1


def test_an_operator_the_route_does_not_allow_is_422_naming_the_allowed_ones(live):
    call = live("twilio")
    response = act(call.gateway, call.record.id, "transfer", {**VALID_BODY["transfer"], "operator": "nightowl"})
    assert response.status_code == 422
    ((problem,),) = [response.json()["detail"]]
    assert problem["field"] == "operator" and "sales, frontdesk, billing" in problem["problem"]
    assert call.fake.updates == [] and call.view()["transfers"] == []


def test_an_operator_outside_its_hours_is_409(live):
    call = live("telnyx")
    response = act(call.gateway, call.record.id, "transfer", {**VALID_BODY["transfer"], "operator": "billing"})
    assert response.status_code == 409 and "mon 00:00-00:01" in response.json()["detail"]


@pytest.mark.parametrize("carrier", NO_TRANSFER)
def test_transfer_on_a_carrier_that_cannot_move_a_call_is_422(live, carrier):
    call = live(carrier)
    response = act(call.gateway, call.record.id, "transfer", VALID_BODY["transfer"])
    assert response.status_code == 422 and "cannot move a live call" in response.json()["detail"]
    assert call.fake.requests == [] and call.view()["transfers"] == []
    assert call.view()["status"] == "in-progress"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_transfer_of_an_outbound_call_not_answered_yet_is_409(gateway, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier).json()
    (placed,) = fake_carriers[carrier].calls
    fake_carriers[carrier].send_status(placed, "ringing")
    response = act(gateway, call["id"], "transfer", VALID_BODY["transfer"])
    assert response.status_code == 409 and "not answered yet" in response.json()["detail"]


# --- messages to the agent ------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_message_reaches_the_agent_as_a_user_text_message(live, carrier):
    call = live(carrier)
    response = act(call.gateway, call.record.id, "messages", {"text": "The order shipped.", "urgency": "immediate"})
    assert response.status_code == 202, response.text
    message = {"type": "user_text_message", "text": "The order shipped.", "urgency": "immediate"}
    assert response.json() == {"call_id": call.record.id, "ultravox_call_id": call.ultravox_call_id, "message": message}
    assert act(call.gateway, call.record.id, "messages", {"text": "No rush."}).status_code == 202
    assert call.ultravox.data_messages == [
        (call.ultravox_call_id, message),
        (call.ultravox_call_id, {"type": "user_text_message", "text": "No rush."}),  # Ultravox's default urgency
    ]


def test_ultravox_refusing_a_message_is_502_and_an_inactive_agent_409(live):
    call = live("plivo")
    call.ultravox.script_data_messages(FakeResponse(status=500))
    refused = act(call.gateway, call.record.id, "messages", VALID_BODY["messages"])
    assert refused.status_code == 502 and "Ultravox" in refused.json()["detail"]
    call.ultravox.ended_calls.add(call.ultravox_call_id)  # e.g. the caller is with an operator now
    inactive = act(call.gateway, call.record.id, "messages", VALID_BODY["messages"])
    assert inactive.status_code == 409 and "not active" in inactive.json()["detail"]


def test_a_message_to_a_call_without_its_agent_yet_is_409(gateway, fake_carriers):
    call = dial(gateway, carrier="twilio").json()  # the agent joins when the callee answers
    response = act(gateway, call["id"], "messages", VALID_BODY["messages"])
    assert response.status_code == 409 and "no agent yet" in response.json()["detail"]


# --- errors common to the three routes ------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
def test_every_route_needs_a_known_api_key(live, action):
    call = live("twilio")
    for headers in ({}, {"Authorization": "Bearer not-a-key-of-this-gateway"}):
        response = act(call.gateway, call.record.id, action, VALID_BODY[action], headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert call.fake.updates == [] and call.ultravox.data_messages == []


@pytest.mark.parametrize("action", ACTIONS)
def test_an_unknown_call_is_404(gateway, action):
    response = act(gateway, UNKNOWN_CALL, action, VALID_BODY[action])
    assert response.status_code == 404 and response.json()["detail"] == "no such call"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_an_ended_call_is_409_on_every_route(live, carrier):
    call = live(carrier)
    assert act(call.gateway, call.record.id, "hangup").status_code == 200
    before = (len(call.fake.requests), len(call.ultravox.requests))
    for action in ACTIONS:
        response = act(call.gateway, call.record.id, action, VALID_BODY[action])
        assert response.status_code == 409 and "ended" in response.json()["detail"], action
    assert (len(call.fake.requests), len(call.ultravox.requests)) == before


@pytest.mark.parametrize("action", ACTIONS)
def test_a_body_that_is_not_json_is_415(live, action):
    call = live("telnyx")
    response = act(call.gateway, call.record.id, action, content=b"text=hello", headers={
        **AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert call.fake.updates == [] and call.ultravox.data_messages == []


@pytest.mark.parametrize("action", ACTIONS)
def test_a_body_over_the_limit_is_413(live, action):
    call = live("twilio")
    response = act(call.gateway, call.record.id, action, {**VALID_BODY[action], "padding": "x" * 9000})
    assert response.status_code == 413


@pytest.mark.parametrize(("action", "body", "field"), [
    ("hangup", {"message": "bye"}, "message"),
    ("transfer", {"operator": "sales"}, "reason"),
    ("transfer", {"operator": "sales", "reason": "  "}, "reason"),
    ("transfer", {"operator": "sales", "reason": "Quote", "kind": "warm"}, None),  # a warm one needs a summary
    ("transfer", {"operator": "sales", "reason": "Quote", "kind": "hot"}, "kind"),
    ("transfer", {"operator": "sales", "reason": "Quote", "number": "+15551234567"}, "number"),
    ("messages", {"text": ""}, "text"),
    ("messages", {"text": "Hi", "urgency": "now"}, "urgency"),
    ("messages", {"urgency": "soon"}, "text"),
])
def test_an_invalid_body_is_422_with_field_errors(live, action, body, field):
    call = live("twilio")
    response = act(call.gateway, call.record.id, action, body)
    assert response.status_code == 422, response.text
    assert field in [problem["field"] for problem in response.json()["detail"]]
    assert call.fake.updates == [] and call.ultravox.data_messages == [] and call.view()["transfers"] == []


def test_the_openapi_document_describes_the_call_control_routes(gateway):
    document = gateway.client.get("/v1/openapi.json").json()
    for action, answer in (("hangup", "200"), ("transfer", "202"), ("messages", "202")):
        route = document["paths"][f"/v1/calls/{{call_id}}/{action}"]["post"]
        assert {answer, "401", "404", "409", "413", "415", "422"} <= set(route["responses"]), action
        schema = route["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert schema in document["components"]["schemas"]
    schemas = document["components"]["schemas"]
    assert schemas["TransferCallRequest"]["properties"]["kind"]["enum"] == ["cold", "warm"]
    assert set(schemas["MessageRequest"]["properties"]["urgency"]["anyOf"][0]["enum"]) == {"immediate", "soon", "later"}
    assert "502" in document["paths"]["/v1/calls/{call_id}/messages"]["post"]["responses"]


# --- what the fakes learnt ------------------------------------------------------------------------------


def test_fake_twilio_cancels_only_calls_not_answered_and_forgets_ended_ones():
    twilio = FakeTwilio()
    with twilio.serve():
        auth = (twilio.account_sid, twilio.auth_token)
        base = f"{twilio.base_url}/2010-04-01/Accounts/{twilio.account_sid}/Calls"
        create = {"To": "+15557654321", "From": "+15550001111", "Url": "https://gateway.example.test/a"}
        ringing = httpx.post(f"{base}.json", data=create, auth=auth).json()["sid"]
        answered = httpx.post(f"{base}.json", data=create, auth=auth).json()["sid"]
        twilio.set_state(answered, "in-progress")
        assert httpx.post(f"{base}/{ringing}.json", data={"Status": "canceled"}, auth=auth).json()["status"] == "canceled"
        assert httpx.post(f"{base}/{answered}.json", data={"Status": "canceled"}, auth=auth).json()["status"] == "in-progress"
        assert httpx.post(f"{base}/{answered}.json", data={"Status": "completed"}, auth=auth).json()["status"] == "completed"
        assert [u.ended_as for u in twilio.updates] == ["canceled", None, "completed"]
        assert httpx.post(f"{base}/{ringing}.json", data={"Status": "completed"}, auth=auth).status_code == 404


def test_fake_ultravox_checks_data_message_fields_and_a_hang_up_ends_the_call():
    fake = FakeUltravox()
    with fake.serve() as server, httpx.Client(base_url=server.url, headers={"X-API-Key": fake.api_key}) as client:
        call_id = client.post("/api/calls", json={}).json()["callId"]
        path = f"/api/calls/{call_id}/send_data_message"
        assert client.post(path, json={"type": "user_text_message"}).status_code == 400
        assert client.post(path, json={"type": "user_text_message", "text": "hi", "urgency": "now"}).status_code == 400
        assert client.post(path, json={"type": "user_text_message", "text": "hi", "mood": "calm"}).status_code == 400
        assert len(fake.schema_errors) == 3
        fake.schema_errors.clear()
        assert client.post(path, json={"type": "user_text_message", "text": "hi", "urgency": "later"}).status_code == 204
        assert client.post(path, json={"type": "hang_up"}).status_code == 204
        assert call_id in fake.ended_calls
        assert client.post(path, json={"type": "user_text_message", "text": "still there?"}).status_code == 422
