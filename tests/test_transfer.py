"""Operator transfers end to end on the three carriers: real gateway, fake carrier REST APIs, fake Ultravox."""

from __future__ import annotations

import time

import pytest

from gateway.testing import FakeResponse, double

from .conftest import API_KEY, SUPPORT_NUMBER, TOOL_SECRET, TRANSFER_CARRIERS

SALES, FRONTDESK = "+15557770001", "+15557770002"


class LiveCall:
    """An inbound call connected to the agent, and the carrier and Ultravox fakes around it."""

    def __init__(self, gateway, fake_ultravox, fake_carriers, carrier):
        self.gateway, self.ultravox, self.carrier = gateway, fake_ultravox, carrier
        self.double = double(carrier)
        self.fake = fake_carriers[carrier]
        self.form = self.double.inbound_form(to=SUPPORT_NUMBER)
        self.carrier_call_id = self.form[self.double.call_id_param]
        self.fake.live_calls.add(self.carrier_call_id)  # the carrier knows this call: it can be redirected
        response = gateway.post(carrier, self.form)
        assert response.status_code == 200, response.text
        (self.record,) = [r for r in gateway.records() if r.carrier_call_id == self.carrier_call_id]
        self.ultravox_call_id = self.record.ultravox_call_id

    def tool(self, operator, *, warm=False, secret=TOOL_SECRET, **extra):
        body = {"callId": self.ultravox_call_id, "operator": operator, "reason": "Wants a quote for 40 seats", **extra}
        if warm:
            body.setdefault("summary", "Ada from Acme, 40 seats, wants a discount.")
        headers = {"X-Gateway-Tool-Secret": secret} if secret else {}
        path = "/tools/warm-transfer" if warm else "/tools/transfer"
        return self.gateway.client.post(path, json=body, headers=headers)

    def redirects(self, count=1, timeout=5.0):
        """The URLs the gateway redirected the caller's live call to, once `count` have happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            updates = [u for u in self.fake.updates if u.call_id == self.carrier_call_id]
            if len(updates) >= count:
                return [self.double.redirect_url(u) for u in updates]
            time.sleep(0.02)
        raise AssertionError(f"expected {count} redirect(s), saw {self.fake.updates}")

    def fetch(self, url, **fields):
        """The carrier requesting `url` for the caller's leg (after a redirect or a <Dial> ending): the answer."""
        response = self.fake.callback(url, self.fake.form_for(self.carrier_call_id, **fields))
        assert response.status_code == 200, response.text
        return response.text

    def dial_ended(self, action, status, **fields):
        """The carrier reporting to a dial's `action` URL that the dial ended with `status`."""
        return self.fetch(action, **{self.double.dial_status_param: status}, **fields)

    def briefing(self, leg):
        """The operator picks up and hears only that a caller is being transferred; pressing 1 plays
        the briefing. Returns (the briefing, the URL its key press to take the call goes to)."""
        gate, brief_url = self.double.gather(self.fake.answer(leg).text)
        assert "Press 1" in gate and "40 seats" not in gate and "Acme" not in gate  # nothing before the key press
        return self.double.gather(self.press(leg, brief_url, "1"))

    def press(self, leg, url, digits):
        """An operator's leg pressing `digits` at a key-press prompt whose keys go to `url`."""
        form = self.fake.form_for(self.fake.live_id(leg), **{self.double.digits_param: digits})
        return self.fake.callback(url, form).text

    def view(self):
        response = self.gateway.client.get(f"/v1/calls/{self.record.id}", headers={"Authorization": f"Bearer {API_KEY}"})
        return response.json()

    def operator_legs(self, count=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.fake.calls) >= count:
                return self.fake.calls
            time.sleep(0.02)
        raise AssertionError(f"expected {count} operator call(s), saw {self.fake.calls}")


@pytest.fixture
def live(gateway, fake_ultravox, fake_carriers):
    return lambda carrier: LiveCall(gateway, fake_ultravox, fake_carriers, carrier)


# --- the tools are attached ---------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_calls_get_the_transfer_tools_with_only_their_routes_operators(live, carrier):
    call = live(carrier)
    (created,) = call.ultravox.requests
    added = created.body["toolOverrides"]["add"]
    assert [t["temporaryTool"]["modelToolName"] for t in added] == ["transferToOperator", "warmTransferToOperator"]
    cold = added[0]["temporaryTool"]
    operator = next(p for p in cold["dynamicParameters"] if p["name"] == "operator")
    assert operator["schema"]["enum"] == ["sales", "frontdesk", "billing"]  # not nightowl: not this route's
    assert "+1555" not in str(cold)  # the model never sees a number
    assert cold["automaticParameters"][0]["knownValue"] == "KNOWN_PARAM_CALL_ID"
    assert added[0]["authTokens"] == {"gatewayToolSecret": TOOL_SECRET}
    assert cold["http"]["baseUrlPattern"].endswith("/tools/transfer")


# --- cold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_cold_transfer_reaches_the_operator(live, carrier):
    call = live(carrier)
    reply = call.tool("sales")
    assert reply.status_code == 200 and "sales" in reply.text
    assert reply.headers["x-ultravox-agent-reaction"] == "listens"
    (url,) = call.redirects()
    answer = call.fetch(url)
    assert call.double.verbs(answer)[0] == "say"
    dialled = call.double.dialled(answer)
    assert dialled.number == SALES
    assert dialled.timeout == 15
    assert call.double.verbs(call.dial_ended(dialled.action, "completed")) == ["hangup"]
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "connected" and transfer["operator"] == "sales" and transfer["kind"] == "cold"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_cold_no_answer_tries_the_fallback_then_returns_to_the_agent(live, carrier):
    call = live(carrier)
    call.tool("sales")
    (url,) = call.redirects()
    action = call.double.dialled(call.fetch(url)).action
    dialled = call.double.dialled(call.dial_ended(action, "no-answer"))
    assert dialled.number == FRONTDESK  # sales falls back to the front desk
    join_url, _ = call.double.connected_url(call.dial_ended(dialled.action, "busy"))
    back = call.ultravox.requests[-1]
    assert back.path == "/api/calls" and back.query["priorCallId"] == call.ultravox_call_id
    prompt = back.body["firstSpeakerSettings"]["agent"]["prompt"]
    assert "frontdesk did not answer (busy)" in prompt
    assert back.body["medium"] == {carrier: {}}
    view = call.view()
    (transfer,) = view["transfers"]
    assert transfer["status"] == "returned" and transfer["operators_tried"] == ["sales", "frontdesk"]
    assert view["ultravox_call_id"] == call.ultravox.created_calls[-1]["callId"] != call.ultravox_call_id
    assert join_url == call.ultravox.created_calls[-1]["joinUrl"]
    # The carrier asking again gets the same call, not a third one.
    assert call.double.connected_url(call.dial_ended(dialled.action, "busy"))[0] == join_url
    assert len(call.ultravox.requests) == 2


# --- warm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_warm_transfer_briefs_the_operator_who_accepts(live, carrier):
    call = live(carrier)
    assert call.tool("sales", warm=True).status_code == 200
    (url,) = call.redirects()
    conference = call.double.conference(call.fetch(url))
    assert conference.starts is False and conference.ends is True
    (leg,) = call.operator_legs()
    assert leg.to.lstrip("+") == SALES.lstrip("+")
    briefing, accept_url = call.briefing(leg)
    assert "40 seats" in briefing and "Ada from Acme" in briefing and "Press 1" in briefing
    joined = call.double.conference(call.press(leg, accept_url, "1"))
    assert joined.name == conference.name and joined.starts is True
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "connected" and transfer["kind"] == "warm" and transfer["outcome"] == "accepted"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_warm_decline_and_no_answer_return_the_caller_to_the_agent(live, carrier):
    call = live(carrier)
    call.tool("sales", warm=True)
    (hold_url,) = call.redirects()
    call.fetch(hold_url)
    (sales,) = call.operator_legs()
    _, accept_url = call.briefing(sales)
    assert call.double.verbs(call.press(sales, accept_url, "9")) == ["hangup"]
    _, frontdesk = call.operator_legs(2)  # the fallback operator is called; the caller stays on hold
    assert frontdesk.to.lstrip("+") == FRONTDESK.lstrip("+")
    call.fake.send_status(sales, "completed")  # sales hanging up after declining changes nothing now
    call.fake.send_status(frontdesk, "no-answer")
    _, return_url = call.redirects(2)
    join_url, _ = call.double.connected_url(call.fetch(return_url))
    back = call.ultravox.requests[-1]
    assert back.query["priorCallId"] == call.ultravox_call_id
    assert "did not take the call (no-answer)" in back.body["firstSpeakerSettings"]["agent"]["prompt"]
    assert join_url == call.ultravox.created_calls[-1]["joinUrl"]
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "returned" and transfer["operators_tried"] == ["sales", "frontdesk"]


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_warm_transfer_to_voicemail_counts_as_no_and_never_briefs_it(live, carrier):
    """The operator's leg asks for a key press before a word of the briefing, with no answering-
    machine detection keeping a person in silence: a voicemail records the question, presses
    nothing, and the leg ends a no-answer; the caller goes back to the agent."""
    call = live(carrier)
    call.tool("frontdesk", warm=True)
    call.fetch(call.redirects()[0])
    (leg,) = call.operator_legs()
    assert call.fake.detection(leg) is None  # the operator hears the question at once
    gate, _ = call.double.gather(call.fake.answer(leg).text)
    assert "Press 1" in gate and "40 seats" not in gate and "Acme" not in gate
    call.fake.send_status(leg, "completed")  # the voicemail's recording ends; no key was pressed
    _, return_url = call.redirects(2)
    call.double.connected_url(call.fetch(return_url))
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "returned" and "did not take the call" in transfer["outcome"]


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_an_operator_pressing_another_key_at_the_question_declines_unbriefed(live, carrier):
    call = live(carrier)
    call.tool("frontdesk", warm=True)
    call.fetch(call.redirects()[0])
    (leg,) = call.operator_legs()
    gate, brief_url = call.double.gather(call.fake.answer(leg).text)
    assert call.double.verbs(call.press(leg, brief_url, "7")) == ["hangup"]
    _, return_url = call.redirects(2)
    call.double.connected_url(call.fetch(return_url))
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "returned" and "declined" in transfer["outcome"]


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_an_operator_leg_that_never_reports_returns_the_caller_after_a_restart(make_gateway, fake_ultravox,
                                                                               fake_carriers, carrier):
    # The leg's deadline is a row, not a task: the gateway that armed it stops, the next one fires it.
    gateway = make_gateway("[transfer]\nleg_timeout_seconds = 1.0\n")
    call = LiveCall(gateway, fake_ultravox, fake_carriers, carrier)
    call.tool("frontdesk", warm=True)  # no fallback operator: the caller goes back to the agent
    call.fetch(call.redirects()[0])
    call.operator_legs()  # ringing, and it will never report
    gateway.close()
    call.gateway = make_gateway("[transfer]\nleg_timeout_seconds = 1.0\n")  # same database
    _, return_url = call.redirects(2, timeout=10)
    call.double.connected_url(call.fetch(return_url))
    assert call.ultravox.requests[-1].query["priorCallId"] == call.ultravox_call_id
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "returned" and "frontdesk did not pick up in time" in transfer["outcome"]


# --- refusals: nothing is dialled -------------------------------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_second_transfer_while_one_is_under_way_is_refused(live, carrier):
    call = live(carrier)
    assert "Transferring" in call.tool("sales").text
    second = call.tool("frontdesk")
    assert second.status_code == 200 and "already under way" in second.text
    assert len(call.redirects()) == 1
    time.sleep(0.2)
    assert len(call.fake.updates) == 1 and len(call.view()["transfers"]) == 1


@pytest.mark.parametrize("secret", [None, "guessed-secret"])
def test_forged_tool_calls_are_refused(live, secret):
    call = live("telnyx")
    response = call.tool("sales", secret=secret)
    assert response.status_code == 403
    time.sleep(0.2)
    assert call.fake.updates == [] and call.view()["transfers"] == []


@pytest.mark.parametrize("operator", ["nightowl", "+15551234567", "ceo", None])
def test_operators_outside_the_routes_list_are_refused(live, operator):
    call = live("plivo")
    reply = call.tool(operator)
    assert reply.status_code == 200 and "I can only transfer to: sales, frontdesk, billing" in reply.text
    assert reply.headers["x-ultravox-agent-reaction"] == "speaks"
    time.sleep(0.2)
    assert call.fake.updates == [] and call.view()["transfers"] == []


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_an_operator_outside_business_hours_is_refused(live, carrier):
    call = live(carrier)
    reply = call.tool("billing")
    assert "not available at the moment" in reply.text and "mon 00:00-00:01" in reply.text
    time.sleep(0.2)
    assert call.fake.updates == []


def test_unknown_or_ended_calls_are_refused(live, gateway):
    call = live("twilio")
    call.ultravox_call_id = "00000000-0000-4000-8000-000000000000"
    assert "doesn't know" in call.tool("sales").text


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_carrier_refusing_the_redirect_leaves_the_caller_with_the_agent(live, carrier):
    call = live(carrier)
    call.fake.script_updates(FakeResponse(status=500))
    assert call.tool("sales").status_code == 200
    deadline = time.monotonic() + 5
    while not call.ultravox.data_messages and time.monotonic() < deadline:
        time.sleep(0.02)
    ((ultravox_call, message),) = call.ultravox.data_messages
    assert ultravox_call == call.ultravox_call_id
    assert message["type"] == "user_text_message" and "could not be started" in message["text"]
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "failed" and "carrier error" in transfer["outcome"]
    assert call.tool("frontdesk").text.startswith("Transferring")  # a new attempt is allowed


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_forged_transfer_callbacks_are_refused(live, gateway, carrier):
    call = live(carrier)
    call.tool("sales")
    (url,) = call.redirects()
    forged = url.replace("t=", "t=0")
    response = call.fake.callback(forged, call.fake.form_for(call.carrier_call_id))
    assert response.status_code == 403


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_transfer_metrics_count_outcomes(live, gateway, carrier):
    call = live(carrier)
    call.tool("sales")
    (url,) = call.redirects()
    call.dial_ended(call.double.dialled(call.fetch(url)).action, "completed")
    metrics = gateway.client.get("/metrics").text
    assert 'gateway_transfers_total{kind="cold",operator="sales",result="connected"} 1.0' in metrics


def test_tools_sync_creates_then_updates_durable_tools(tmp_path, fake_ultravox, monkeypatch, capsys):
    from gateway.cli import main as cli_main

    from .conftest import BASE_CONFIG, gateway_environ

    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG)
    for name, value in gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'x.db'}").items():
        monkeypatch.setenv(name, value)
    assert cli_main(["tools", "sync", "--config", str(config)]) == 0
    assert cli_main(["tools", "sync", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert output.count("created gateway-") == 2 and output.count("updated gateway-") == 2
    tools = {tool["name"]: tool for tool in fake_ultravox.tools.values()}
    assert set(tools) == {"gateway-transfer", "gateway-warm-transfer"}
    operator = tools["gateway-transfer"]["definition"]["dynamicParameters"][0]
    assert operator["schema"]["enum"] == ["billing", "frontdesk", "nightowl", "sales"]


# --- the caller must never be stranded (review findings) ---------------------------------------------


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_repeated_no_answer_callback_does_not_skip_an_operator(live, carrier):
    call = live(carrier)
    call.tool("sales")
    (url,) = call.redirects()
    action = call.double.dialled(call.fetch(url)).action
    first = call.double.dialled(call.dial_ended(action, "no-answer"))
    again = call.double.dialled(call.dial_ended(action, "no-answer"))  # the carrier retrying
    assert first.number == again.number == FRONTDESK
    assert call.view()["transfers"][0]["operators_tried"] == ["sales", "frontdesk"]


def test_caller_hanging_up_while_the_operator_rings_ends_the_transfer(live):
    call = live("twilio")
    call.tool("sales")
    (url,) = call.redirects()
    action = call.double.dialled(call.fetch(url)).action
    answer = call.fetch(action, DialCallStatus="canceled", CallStatus="completed")
    assert call.double.verbs(answer) == ["hangup"]
    assert len(call.ultravox.requests) == 1  # no agent call for nobody
    view = call.view()
    assert view["status"] == "completed" and view["transfers"][0]["status"] == "failed"


def test_caller_hanging_up_on_hold_hangs_up_the_ringing_operator(live):
    call = live("twilio")
    call.tool("sales", warm=True)
    (hold_url,) = call.redirects()
    left_url = call.double.conference(call.fetch(hold_url)).action
    (leg,) = call.operator_legs()
    call.fake.live_calls.add(leg.call_id)
    call.fetch(left_url, CallStatus="completed")
    (transfer,) = call.view()["transfers"]
    assert transfer["status"] == "failed" and "hung up while on hold" in transfer["outcome"]
    deadline = time.monotonic() + 5
    while not (hung_up := [u for u in call.fake.updates if u.call_id == leg.call_id]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hung_up and hung_up[0].params.get("Status") == "completed"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_the_agents_call_ending_at_the_transfer_does_not_end_the_phone_call(live, gateway, carrier):
    import datetime as dt
    import json

    from gateway.security import sign_ultravox_webhook

    from .conftest import WEBHOOK_SECRET

    call = live(carrier)
    call.tool("sales")
    call.redirects()
    body = json.dumps({"event": "call.ended", "call": {"callId": call.ultravox_call_id, "endReason": "hangup"}}).encode()
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    gateway.client.post("/ultravox/events", content=body, headers={
        "X-Ultravox-Webhook-Timestamp": now, "X-Ultravox-Webhook-Signature": sign_ultravox_webhook(WEBHOOK_SECRET, body, now)})
    assert call.view()["status"] == "in-progress"


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_token_for_one_step_does_not_open_another(live, carrier):
    call = live(carrier)
    call.tool("sales", warm=True)
    (hold_url,) = call.redirects()
    stolen = hold_url.replace("/transfer/hold?", "/transfer/return?")
    response = call.fake.callback(stolen, call.fake.form_for(call.carrier_call_id))
    assert response.status_code == 403


def test_plivo_hold_music_is_served_as_xml(live):
    call = live("plivo")
    call.tool("sales", warm=True)
    (hold_url,) = call.redirects()
    music = call.fetch(call.double.conference(call.fetch(hold_url)).wait_url)
    assert call.double.verbs(music) in (["play"], ["say", "wait"])
