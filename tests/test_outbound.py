"""The dialer API end to end: real gateway, fake carrier REST APIs and fake Ultravox on loopback."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import threading
import time
import uuid
from urllib.parse import parse_qs, urlparse

import pytest

from gateway.carriers import CARRIERS
from gateway.cli import main as cli_main
from gateway.security import sign_ultravox_webhook
from gateway.testing import Declined, FakeResponse, double, validate_ultravox_request

from .conftest import (
    AGENT_ID,
    BASE_CONFIG,
    ANSWER_WEBHOOK_CARRIERS,
    API_KEY,
    CARRIER_NAMES,
    FORM_SIGNING_CARRIERS,
    OTHER_API_KEY,
    PUBLIC_URL,
    SUPPORT_NUMBER,
    MACHINE_DETECTING_CARRIERS,
    NO_MACHINE_DETECTION_CARRIERS,
    ULTRAVOX_DIAL_CARRIERS,
    WEBHOOK_SECRET,
)

CALLEE = "+15557654321"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def dial(gateway, key=API_KEY, idempotency_key=None, **body):
    body.setdefault("to", CALLEE)
    body.setdefault("route", "support")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return gateway.client.post("/v1/calls", json=body, headers=headers)


def call_of(gateway, call_id):
    response = gateway.client.get(f"/v1/calls/{call_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def ultravox_event(gateway, event, call, *, secret=WEBHOOK_SECRET, timestamp=None):
    body = json.dumps({"event": event, "call": call}).encode()
    timestamp = timestamp or dt.datetime.now(dt.timezone.utc).isoformat()
    headers = {
        "content-type": "application/json",
        "X-Ultravox-Webhook-Timestamp": timestamp,
        "X-Ultravox-Webhook-Signature": sign_ultravox_webhook(secret, body, timestamp),
    }
    return gateway.client.post("/ultravox/events", content=body, headers=headers)


# --- via carrier: the gateway dials, Ultravox joins when the callee answers ---------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_carrier_mode_places_the_call_and_connects_the_agent_on_answer(gateway, fake_ultravox, fake_carriers, carrier):
    carrier_double = double(carrier)
    response = dial(gateway, carrier=carrier, template_context={"customer": {"name": "Ada"}}, metadata={"crm": "42"})
    assert response.status_code == 201, response.text
    call = response.json()
    assert call["status"] == "queued" and call["direction"] == "outbound" and call["via"] == "carrier"
    assert call["from"] == carrier_double.own_number and call["to"] == CALLEE
    assert response.headers["location"] == f"/v1/calls/{call['id']}"

    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    assert placed.status_url.startswith(f"{PUBLIC_URL}/{carrier}/status?call={call['id']}&t=")
    assert placed.to.lstrip("+") == CALLEE.lstrip("+")

    picked_up = carrier_double.pick_up(fake, placed)
    join_url = picked_up.stream_url
    (created,) = fake_ultravox.requests
    assert created.agent_id == AGENT_ID
    assert created.body["medium"] == {carrier: {}}
    # The callee speaks first; the route's greeting is said only if they stay silent.
    assert created.body["firstSpeakerSettings"] == {"user": {"fallback": {"delay": "4s", "text": "Hello, thanks for calling."}}}
    assert created.body["templateContext"]["customer"] == {"name": "Ada"}
    assert created.body["metadata"]["gateway.call_id"] == call["id"]
    assert created.body["metadata"]["crm"] == "42"
    assert created.body["callbacks"]["ended"]["url"] == f"{PUBLIC_URL}/ultravox/events"
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "in-progress" and tracked["answered_at"]
    assert join_url == fake_ultravox.created_calls[-1]["joinUrl"] and tracked["ultravox_call_id"]

    completed = fake.send_status(placed, "completed", **carrier_double.status_fields("completed", 42))
    assert completed.status_code in (200, 204)
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "completed" and tracked["duration_seconds"] == 42 and tracked["ended_at"]


@pytest.mark.parametrize("carrier", ANSWER_WEBHOOK_CARRIERS)
def test_carrier_mode_creates_the_ultravox_call_only_when_the_callee_answers(gateway, fake_ultravox, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier).json()
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    assert placed.answer_url.startswith(f"{PUBLIC_URL}/{carrier}/outbound/answer?call={call['id']}&t=")
    assert fake_ultravox.requests == []  # nothing is created while the phone rings

    picked_up = double(carrier).pick_up(fake, placed)
    assert picked_up.answer.status_code == 200, picked_up.answer.text
    assert picked_up.answer.headers["content-type"].split(";")[0] in double(carrier).answer_media_types
    (created,) = fake_ultravox.requests
    assert picked_up.stream_url == fake_ultravox.created_calls[-1]["joinUrl"]
    assert created.body["metadata"]["gateway.call_id"] == call["id"]


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_an_agent_call_without_a_greeting_keeps_the_agents_first_speaker_settings(gateway, fake_ultravox, fake_carriers, carrier):
    """Any firstSpeakerSettings, even `agent: {}` or `user: {}`, would override the agent's own."""
    dial(gateway, carrier=carrier, route=None, agent_id=AGENT_ID)
    (placed,) = fake_carriers[carrier].calls
    double(carrier).pick_up(fake_carriers[carrier], placed)
    (created,) = fake_ultravox.requests
    assert created.agent_id == AGENT_ID
    assert "firstSpeakerSettings" not in created.body


# --- answering machines -------------------------------------------------------------------------------


def answered_with_detection(gateway, fake_carriers, carrier, **body):
    """A call dialled with answering-machine detection, picked up: (its view, the placed call)."""
    call = dial(gateway, carrier=carrier, answering_machine_detection=True, **body).json()
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    double(carrier).pick_up(fake, placed)
    return call, placed


def hung_up(fake, placed) -> bool:
    live_id = fake.live_id(placed)
    return any(u.call_id == live_id and (u.action == "hangup" or u.params.get("Status") == "completed")
               for u in fake.updates)


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_detection_runs_in_the_background_and_a_person_is_connected_at_once(gateway, fake_ultravox, fake_carriers, carrier):
    """Nobody waits in silence for the verdict: the agent takes the call as it is answered."""
    call = dial(gateway, carrier=carrier, answering_machine_detection=True).json()
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    detection = fake.detection(placed)
    assert detection.report_url.startswith(f"{PUBLIC_URL}/{carrier}/machine-detection?call={call['id']}&t=")
    answer = double(carrier).pick_up(fake, placed)
    assert answer.stream_url == fake_ultravox.created_calls[-1]["joinUrl"]  # the agent, before any verdict
    fake.answered_by(placed, "human")
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "in-progress" and not hung_up(fake, placed)
    # Plivo reports machines only; the others say it was a person.
    assert tracked["answered_by"] in ("human", None)


@pytest.mark.parametrize("who", ["machine", "fax"])
@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_a_machine_is_hung_up_once_however_often_the_verdict_comes(gateway, fake_ultravox, fake_carriers, carrier, who):
    call, placed = answered_with_detection(gateway, fake_carriers, carrier)
    fake = fake_carriers[carrier]
    assert fake.answered_by(placed, who).status_code == 204
    fake.answered_by(placed, who)  # delivered twice
    tracked = call_of(gateway, call["id"])
    # Plivo tells no fax from a machine.
    assert tracked["status"] == "machine-detected" and tracked["answered_by"] in (who, "machine")
    hangups = [u for u in fake.updates if u.call_id == fake.live_id(placed)]
    assert len(hangups) == 1 and hung_up(fake, placed)


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_a_forged_verdict_is_refused_and_changes_nothing(gateway, fake_ultravox, fake_carriers, carrier):
    call, placed = answered_with_detection(gateway, fake_carriers, carrier)
    fake = fake_carriers[carrier]
    report_url = fake.detection(placed).report_url
    forged = report_url.split("&t=")[0] + "&t=" + "0" * 32
    assert fake.callback(forged, {**fake.form_for(fake.live_id(placed)), "AnsweredBy": "machine_start",
                                  "Machine": "true"}).status_code == 403
    assert call_of(gateway, call["id"])["status"] == "in-progress" and not hung_up(fake, placed)


@pytest.mark.parametrize("asked", [{"answering_machine_detection": True}, {"voicemail": "message"}])
@pytest.mark.parametrize("carrier", NO_MACHINE_DETECTION_CARRIERS)
def test_carriers_without_detection_refuse_it_cleanly(gateway, fake_ultravox, fake_carriers, carrier, asked):
    response = dial(gateway, carrier=carrier, **asked)
    assert response.status_code == 422 and "reports no answering machines" in response.text
    assert fake_carriers[carrier].calls == [] and fake_ultravox.requests == []


# --- voicemail policies: what a machine gets -----------------------------------------------------------


def leaves_the_message(gateway, fake, carrier, call, placed) -> str:
    """The voicemail the gateway moved the machine's call to, as the carrier fetches it: its answer."""
    (url,) = [double(carrier).redirect_url(u) for u in fake.updates if u.call_id == fake.live_id(placed)]
    assert url.startswith(f"{PUBLIC_URL}/{carrier}/voicemail?call={call['id']}&t=")
    answer = fake.callback(url, fake.form_for(fake.live_id(placed)))
    assert answer.status_code == 200, answer.text
    return answer.text


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_voicemail_message_is_left_after_the_greeting_then_the_call_hangs_up(gateway, fake_ultravox, fake_carriers, carrier):
    call, placed = answered_with_detection(gateway, fake_carriers, carrier, voicemail="message")
    fake, carrier_double = fake_carriers[carrier], double(carrier)
    # The machine's verdict waits for the end of its greeting, where the carrier can tell it.
    assert fake.detection(placed).greeting_end == CARRIERS[carrier].reports_greeting_end
    fake.answered_by(placed, "machine")
    fake.answered_by(placed, "machine")  # delivered twice: moved once
    assert call_of(gateway, call["id"])["status"] == "machine-detected"
    # The move ends the agent's stream: Ultravox says the call ended, before the message is fetched.
    ultravox_event(gateway, "call.ended", {"callId": call_of(gateway, call["id"])["ultravox_call_id"], "endReason": "hangup"})
    message = leaves_the_message(gateway, fake, carrier, call, placed)
    assert carrier_double.spoken(message) == [gateway.settings.outbound.voicemail_message]
    # Plivo, which tells no end of the greeting, waits for the beep first.
    assert carrier_double.verbs(message) in (["say", "hangup"], ["wait", "say", "hangup"])
    fake.send_status(placed, "completed", **carrier_double.status_fields("completed", 25))
    tracked = call_of(gateway, call["id"])
    assert (tracked["status"], tracked["answered_by"], tracked["duration_seconds"]) == ("voicemail-left", "machine", 25)


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_voicemail_policy_agent_has_the_agent_leave_a_message(gateway, fake_ultravox, fake_carriers, carrier):
    call, placed = answered_with_detection(gateway, fake_carriers, carrier, voicemail="agent")
    fake = fake_carriers[carrier]
    (created,) = fake_ultravox.requests
    assert {"toolName": "leaveVoicemail"} in created.body["toolOverrides"]["add"]  # Ultravox's built-in tool
    assert fake.detection(placed).greeting_end == CARRIERS[carrier].reports_greeting_end
    fake.answered_by(placed, "machine")
    fake.answered_by(placed, "machine")
    ((told, message),) = fake_ultravox.data_messages  # told once
    assert told == fake_ultravox.created_calls[-1]["callId"]
    assert message["type"] == "user_text_message" and "leaveVoicemail" in message["text"]
    assert fake.updates == []  # neither hung up nor moved: the agent speaks, and its tool ends the call
    ultravox_event(gateway, "call.ended", {"callId": told, "endReason": "agent_hangup"})
    tracked = call_of(gateway, call["id"])
    assert (tracked["status"], tracked["answered_by"]) == ("voicemail-left", "machine")


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_a_person_is_left_with_the_agent_whatever_the_voicemail_policy(gateway, fake_ultravox, fake_carriers, carrier):
    for policy in ("message", "agent"):
        call, placed = answered_with_detection(gateway, fake_carriers, carrier, voicemail=policy)
        fake_carriers[carrier].answered_by(placed, "human")
        assert call_of(gateway, call["id"])["status"] == "in-progress"
        fake_carriers[carrier].reset()
    assert fake_ultravox.data_messages == []


@pytest.mark.parametrize("carrier", MACHINE_DETECTING_CARRIERS)
def test_the_voicemail_policy_comes_from_the_request_the_route_or_the_config(make_gateway, fake_ultravox, fake_carriers,
                                                                             carrier):
    gateway = make_gateway(f"""
[[routes]]
number = "+15550006666"
name = "reminders"
agent_id = "{AGENT_ID}"
voicemail = "agent"

[[routes]]
number = "+15550007777"
name = "notes"
agent_id = "{AGENT_ID}"
voicemail_message = "This is the notes line, please call back."
""", config=BASE_CONFIG.replace("[outbound]\n", '[outbound]\nvoicemail = "message"\nvoicemail_message = "Config message."\n'))
    fake = fake_carriers[carrier]

    def machine_answers(**body):
        fake.reset()
        call, placed = answered_with_detection(gateway, fake_carriers, carrier, **body)
        fake.answered_by(placed, "machine")
        return call, placed

    call, placed = machine_answers(route="support")  # no policy of its own: the config's
    assert double(carrier).spoken(leaves_the_message(gateway, fake, carrier, call, placed)) == ["Config message."]
    call, placed = machine_answers(route="notes")  # the config's policy, the route's message
    assert double(carrier).spoken(leaves_the_message(gateway, fake, carrier, call, placed)) == [
        "This is the notes line, please call back."]
    call, _ = machine_answers(route="reminders")  # the route's policy
    assert call_of(gateway, call["id"])["status"] == "voicemail-left" and len(fake_ultravox.data_messages) == 1
    call, placed = machine_answers(route="reminders", voicemail="hangup")  # the request's
    assert call_of(gateway, call["id"])["status"] == "machine-detected" and hung_up(fake, placed)


@pytest.mark.parametrize("carrier", ANSWER_WEBHOOK_CARRIERS)
def test_a_repeated_answer_webhook_joins_the_same_ultravox_call(gateway, fake_ultravox, fake_carriers, carrier):
    dial(gateway, carrier=carrier)
    fake = fake_carriers[carrier]
    (placed,) = fake.calls
    fake_ultravox.delay = 0.3
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: double(carrier).pick_up(fake, placed), range(3)))
    assert len({answer.stream_url for answer in answers}) == 1
    assert fake_ultravox.calls_created == 1


@pytest.mark.parametrize("carrier", ANSWER_WEBHOOK_CARRIERS)
def test_ultravox_failure_at_answer_gives_the_callee_the_apology(gateway, fake_ultravox, fake_carriers, carrier):
    call = dial(gateway, carrier=carrier).json()
    fake_ultravox.script(FakeResponse(status=500))
    (placed,) = fake_carriers[carrier].calls
    answer = double(carrier).pick_up(fake_carriers[carrier], placed).answer
    assert answer.status_code == double(carrier).declined_status
    assert double(carrier).declined(answer.text) == Declined("Sorry, our assistant is unavailable.", None)
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "failed" and "500" in tracked["failure_reason"]


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_carrier_refusing_the_call_marks_it_failed(gateway, fake_ultravox, fake_carriers, carrier):
    fake_carriers[carrier].script(FakeResponse(status=400))  # in the carrier's own error format
    response = dial(gateway, carrier=carrier)
    assert response.status_code == 201
    assert response.json()["status"] == "failed" and "400" in response.json()["failure_reason"]
    assert len(fake_carriers[carrier].requests) == 1  # a refusal is final: never dial twice


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_carrier_rate_limit_is_retried_after_retry_after(gateway, fake_carriers, carrier):
    fake_carriers[carrier].script(FakeResponse(status=429, retry_after="0.2"))
    response = dial(gateway, carrier=carrier)
    assert response.json()["status"] == "queued"
    assert len(fake_carriers[carrier].requests) == 2 and len(fake_carriers[carrier].calls) == 1


def test_carrier_timing_out_after_the_request_is_not_retried(make_gateway, fake_carriers):
    gateway = make_gateway(config=BASE_CONFIG.replace("[telnyx]\n", "[telnyx]\nrequest_timeout_seconds = 0.5\n"))
    fake_carriers["telnyx"].script(FakeResponse(hang=True))
    response = dial(gateway, carrier="telnyx")
    assert response.json()["status"] == "failed"
    assert len(fake_carriers["telnyx"].requests) == 1  # it may have dialled: one attempt only


# --- via Ultravox: Ultravox dials with the credentials imported into the account ----------------------


@pytest.mark.parametrize("carrier", ULTRAVOX_DIAL_CARRIERS)
def test_ultravox_mode_creates_an_outgoing_call(gateway, fake_ultravox, fake_carriers, carrier):
    response = dial(gateway, carrier=carrier, via="ultravox", greeting="Hi, it's Example Co.")
    assert response.status_code == 201, response.text
    call = response.json()
    (created,) = fake_ultravox.requests
    outgoing = created.body["medium"][carrier]["outgoing"]
    assert outgoing["to"] == CALLEE and outgoing["from"] == double(carrier).own_number
    assert f"{PUBLIC_URL}/{carrier}/status?call={call['id']}&t=" in json.dumps(outgoing["additionalParams"])
    assert created.body["firstSpeakerSettings"]["user"]["fallback"]["text"] == "Hi, it's Example Co."
    assert not any(fake.calls for fake in fake_carriers.values())
    uuid.UUID(call["ultravox_call_id"])  # the id the fake Ultravox answered with

    ended = ultravox_event(gateway, "call.ended", {
        "callId": call["ultravox_call_id"], "endReason": "hangup", "summary": "Booked a table for two.",
        "joined": "2026-11-20T10:00:00Z", "ended": "2026-11-20T10:01:30Z",
    })
    assert ended.status_code == 204
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "completed" and tracked["summary"] == "Booked a table for two."
    assert tracked["end_reason"] == "hangup" and tracked["duration_seconds"] == 90


@pytest.mark.parametrize("carrier", ULTRAVOX_DIAL_CARRIERS)
def test_unjoined_ultravox_call_is_failed(gateway, fake_ultravox, carrier):
    call = dial(gateway, carrier=carrier, via="ultravox").json()
    ultravox_event(gateway, "call.ended", {"callId": call["ultravox_call_id"], "endReason": "unjoined"})
    assert call_of(gateway, call["id"])["status"] == "failed"


# --- authentication, idempotency, dial policy --------------------------------------------------------


def test_api_requires_a_known_key(gateway, fake_carriers):
    assert dial(gateway, key=None).status_code == 401
    assert dial(gateway, key="not-a-key-of-this-gateway").status_code == 401
    response = gateway.client.post("/v1/calls", json={"to": CALLEE, "route": "support"},
                                   headers={"Authorization": f"Basic {API_KEY}"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert gateway.client.get("/v1/calls").status_code == 401
    assert gateway.client.get("/v1/calls/x").status_code == 401
    assert not any(fake.calls for fake in fake_carriers.values())


def test_concurrent_retries_with_one_idempotency_key_dial_once(gateway, fake_carriers):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: dial(gateway, idempotency_key="order-1234"), range(6)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 5
    assert placed_calls(fake_carriers) == 1

    # The same key from another API key is another request; the same key with another body is an error.
    assert dial(gateway, key=OTHER_API_KEY, idempotency_key="order-1234").json()["id"] != responses[0].json()["id"]
    reused = dial(gateway, idempotency_key="order-1234", to="+15557650000")
    assert reused.status_code == 422 and "Idempotency-Key" in reused.text
    assert placed_calls(fake_carriers) == 2


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_retry_while_the_first_request_is_dialling_gets_its_outcome(gateway, fake_carriers, carrier):
    # The carrier takes its time and refuses: the retry must report the refusal, not "queued".
    fake_carriers[carrier].script(FakeResponse(status=400, delay=0.4))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(dial, gateway, carrier=carrier, idempotency_key="slow-1")
        time.sleep(0.15)
        retry = pool.submit(dial, gateway, carrier=carrier, idempotency_key="slow-1")
        responses = [first.result(), retry.result()]
    assert [r.json()["status"] for r in responses] == ["failed", "failed"]
    assert responses[1].headers.get("idempotent-replayed") == "true"
    assert len(fake_carriers[carrier].requests) == 1


def placed_calls(fake_carriers) -> int:
    """Calls placed on any carrier (a dial request that names none goes to the default carrier)."""
    return sum(len(fake.calls) for fake in fake_carriers.values())


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"route": None, "call": {"systemPrompt": "x", "selectedTools": [{"toolName": "coldTransfer"}]}}, 422,
         "selectedTools"),
        ({"via": "ultravox", "answering_machine_detection": True}, 422, "via=carrier"),
        ({"to": "+447700900123", "carrier": "twilio", "from": "+15550009999"}, 403, "from must be one"),
        ({"to": "+33612345678"}, 403, "outside the allowed"),
        ({"to": "+19005551234"}, 403, "+1900"),
        ({"to": "+18095551234"}, 403, "+1809"),
        ({"to": "555-1234"}, 422, "E.164"),
        ({"route": "nope"}, 422, "no route named"),
        ({"route": None, "agent_id": AGENT_ID, "call": {"systemPrompt": "x"}}, 422, "exactly one"),
        ({"metadata": {"ultravox.x": "1"}}, 422, "reserved"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_dial_policy_rejections_dial_nothing(gateway, fake_ultravox, fake_carriers, body, status, words):
    response = dial(gateway, **body)
    assert response.status_code == status, response.text
    assert words in response.text
    assert not any(fake.calls for fake in fake_carriers.values())
    assert fake_ultravox.requests == []
    assert gateway.records() == []


def test_dialling_rate_is_limited_per_key(gateway, fake_carriers):
    assert all(dial(gateway).status_code == 201 for _ in range(5))
    limited = dial(gateway)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "60"
    assert dial(gateway, key=OTHER_API_KEY).status_code == 201  # another key has its own budget
    assert placed_calls(fake_carriers) == 6


def test_malformed_api_requests(gateway):
    assert gateway.client.post("/v1/calls", content=b"to=+1555", headers={
        **AUTH, "content-type": "application/x-www-form-urlencoded"}).status_code == 415
    assert gateway.client.post("/v1/calls", content=b"{not json", headers={
        **AUTH, "content-type": "application/json"}).status_code == 422
    big = json.dumps({"to": CALLEE, "route": "support", "metadata": {"x": "y" * 10_000}})
    assert gateway.client.post("/v1/calls", content=big, headers={**AUTH, "content-type": "application/json"}).status_code == 413
    assert gateway.records() == []


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_carrier_without_rest_credentials_is_refused(make_gateway, fake_carriers, carrier):
    environ = double(carrier).environ(fake_carriers[carrier].base_url)
    gateway = make_gateway(**dict.fromkeys(environ, ""))  # an empty variable leaves the setting unset
    section = getattr(gateway.settings, carrier)
    for variable, key in CARRIERS[carrier].environment.items():
        if variable in environ:
            assert getattr(section, key) not in ("", environ[variable]), variable
    response = dial(gateway, carrier=carrier)
    assert response.status_code == 422 and "credentials" in response.text
    assert not fake_carriers[carrier].requests


# --- call tracking -----------------------------------------------------------------------------------


def test_status_callbacks_out_of_order_and_duplicated_never_go_backwards(gateway, fake_carriers):
    call = dial(gateway, carrier="twilio").json()
    fake = fake_carriers["twilio"]
    (placed,) = fake.calls
    fake.send_status(placed, "ringing")
    assert call_of(gateway, call["id"])["status"] == "ringing"
    fake.send_status(placed, "busy")
    fake.send_status(placed, "busy")
    fake.send_status(placed, "ringing")  # late
    fake.send_status(placed, "in-progress")  # later still
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "busy" and tracked["carrier_call_id"] == placed.call_id


@pytest.mark.parametrize("carrier", FORM_SIGNING_CARRIERS)
def test_forged_callbacks_are_refused_and_change_nothing(gateway, fake_ultravox, fake_carriers, carrier):
    carrier_double = double(carrier)
    call = dial(gateway, carrier=carrier).json()
    created = len(fake_ultravox.requests)  # none, unless the carrier dials into the stream
    form = carrier_double.inbound_form(to=CALLEE, from_=CALLEE, **carrier_double.status_fields("completed"))
    for path in (f"/{carrier}/status?call={call['id']}", f"/{carrier}/outbound/answer?call={call['id']}"):
        signed = carrier_double.inbound_request(PUBLIC_URL, path, form)
        forged = dict(form, **carrier_double.status_fields("no-answer"))  # signed one thing, sent another
        response = gateway.post(carrier, forged, path=path, sign=False, headers=signed.headers)
        assert response.status_code == carrier_double.unauthenticated_status
    assert call_of(gateway, call["id"])["status"] == "queued"
    assert len(fake_ultravox.requests) == created


def test_a_signed_callback_replayed_to_another_calls_url_is_refused(gateway, fake_ultravox, fake_carriers):
    """Telnyx signs only timestamp|body, not the URL: the gateway's own token names the call."""
    first = dial(gateway, carrier="telnyx").json()
    second = dial(gateway, carrier="telnyx").json()
    placed = fake_carriers["telnyx"].calls[0]
    stolen = placed.answer_url.replace(first["id"], second["id"])  # the first call's token, the second's id
    response = fake_carriers["telnyx"].callback(stolen, fake_carriers["telnyx"].form_for(placed.call_id))
    assert response.status_code == 403
    assert fake_ultravox.requests == []
    assert call_of(gateway, second["id"])["status"] == "queued"


def test_status_answered_before_the_answer_webhook_still_connects_the_agent(gateway, fake_ultravox, fake_carriers):
    """The `answered` callback may beat the answer webhook (detection used to hold it back): the agent still joins."""
    call = dial(gateway, carrier="twilio", answering_machine_detection=True).json()
    (placed,) = fake_carriers["twilio"].calls
    fake_carriers["twilio"].send_status(placed, "in-progress")
    answer = fake_carriers["twilio"].answer(placed, AnsweredBy="human")
    double("twilio").connected_url(answer.text)
    assert call_of(gateway, call["id"])["status"] == "in-progress"


def test_carrier_final_status_corrects_an_unjoined_ultravox_call(gateway, fake_ultravox, fake_carriers):
    call = dial(gateway, carrier="twilio", via="ultravox").json()
    ultravox_event(gateway, "call.ended", {"callId": call["ultravox_call_id"], "endReason": "unjoined"})
    assert call_of(gateway, call["id"])["status"] == "failed"
    # Ultravox placed the call through Twilio, which reports to the status URL the gateway gave it.
    status_url = fake_ultravox.requests[0].body["medium"]["twilio"]["outgoing"]["additionalParams"]["statusCallback"]
    twilio = fake_carriers["twilio"]
    twilio.callback(status_url, {**twilio.form_for("CA" + "1" * 32), "CallStatus": "busy"})
    tracked = call_of(gateway, call["id"])
    assert tracked["status"] == "busy" and tracked["end_reason"] == "unjoined"
    ultravox_event(gateway, "call.ended", {"callId": call["ultravox_call_id"], "endReason": "unjoined"})
    assert call_of(gateway, call["id"])["status"] == "busy"  # a repeated event changes nothing


def test_forged_and_stale_ultravox_events_are_refused(gateway, fake_ultravox):
    call = dial(gateway, carrier="twilio", via="ultravox").json()
    event = {"callId": call["ultravox_call_id"], "endReason": "hangup"}
    assert ultravox_event(gateway, "call.ended", event, secret="wrong-secret").status_code == 403
    stale = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).isoformat()
    assert ultravox_event(gateway, "call.ended", event, timestamp=stale).status_code == 403
    assert call_of(gateway, call["id"])["status"] == "queued"
    # Several signatures in one header (secret rotation): one valid is enough.
    body = json.dumps({"event": "call.ended", "call": event}).encode()
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    both = sign_ultravox_webhook("old-secret", body, now) + "," + sign_ultravox_webhook(WEBHOOK_SECRET, body, now)
    response = gateway.client.post("/ultravox/events", content=body, headers={
        "X-Ultravox-Webhook-Timestamp": now, "X-Ultravox-Webhook-Signature": both})
    assert response.status_code == 204
    assert call_of(gateway, call["id"])["status"] == "completed"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_inbound_calls_are_tracked_too(gateway, fake_ultravox, carrier):
    carrier_double = double(carrier)
    form = carrier_double.inbound_form(to=SUPPORT_NUMBER)
    gateway.post(carrier, form)
    (inbound,) = gateway.client.get("/v1/calls?direction=inbound", headers=AUTH).json()["calls"]
    assert inbound["status"] == "in-progress" and inbound["carrier_call_id"] == form[carrier_double.call_id_param]
    assert fake_ultravox.requests[0].body["callbacks"]["ended"]["url"] == f"{PUBLIC_URL}/ultravox/events"
    # A status callback configured on the number, without ?call=, finds the call by its carrier call id.
    status = dict(form, **carrier_double.status_fields("completed", 61))
    assert gateway.post(carrier, status, path=f"/{carrier}/status").status_code == 204
    tracked = call_of(gateway, inbound["id"])
    assert tracked["status"] == "completed" and tracked["duration_seconds"] == 61


def test_listing_filters_and_pages_with_a_cursor(gateway, fake_carriers):
    ids = [dial(gateway, key=key).json()["id"] for key in (API_KEY, API_KEY, API_KEY, OTHER_API_KEY)]
    dial(gateway, carrier="plivo")
    first = gateway.client.get("/v1/calls?carrier=twilio&limit=3", headers=AUTH).json()
    second = gateway.client.get(f"/v1/calls?carrier=twilio&limit=3&cursor={first['next_cursor']}", headers=AUTH).json()
    assert second["next_cursor"] is None
    listed = [c["id"] for c in first["calls"] + second["calls"]]
    assert sorted(listed) == sorted(ids) and len(set(listed)) == 4
    assert all(c["carrier"] == "twilio" for c in first["calls"] + second["calls"])
    assert len(gateway.client.get("/v1/calls?status=queued", headers=AUTH).json()["calls"]) == 5
    assert gateway.client.get("/v1/calls?status=bogus", headers=AUTH).status_code == 400
    assert gateway.client.get("/v1/calls?cursor=%%%", headers=AUTH).status_code == 400
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    assert gateway.client.get("/v1/calls", params={"created_after": later}, headers=AUTH).json()["calls"] == []
    assert gateway.client.get("/v1/calls/nope", headers=AUTH).status_code == 404


def test_openapi_document_describes_the_api(gateway):
    document = gateway.client.get("/v1/openapi.json").json()
    assert {"/v1/calls", "/v1/calls/{call_id}", "/v1/calls/{call_id}/recording"} <= set(document["paths"])
    assert "to" in document["components"]["schemas"]["DialRequest"]["properties"]
    assert {"from", "recording_url", "recording_parts"} <= set(document["components"]["schemas"]["Call"]["properties"])


@pytest.mark.parametrize("carrier", ULTRAVOX_DIAL_CARRIERS)
def test_requests_to_ultravox_validate_against_its_schema(gateway, fake_ultravox, fake_carriers, carrier):
    dial(gateway, carrier=carrier, via="ultravox", call={"systemPrompt": "Call to confirm.", "voice": "Mark"},
         route=None, max_duration=300)
    (created,) = fake_ultravox.requests
    assert created.path == "/api/calls"
    assert created.body["maxDuration"] == "300s"
    assert validate_ultravox_request(created.body, agent=False) == []


# --- the CLI -----------------------------------------------------------------------------------------


def test_gateway_dial_follows_the_call_until_it_ends(gateway, fake_carriers, capsys, monkeypatch):
    monkeypatch.setenv("GATEWAY_API_KEY", API_KEY)
    result = {}

    def run():
        result["code"] = cli_main(["dial", CALLEE, "--route", "support", "--carrier", "twilio",
                                   "--url", gateway.server.url, "--poll-seconds", "0.1"])

    thread = threading.Thread(target=run)
    thread.start()
    fake = fake_carriers["twilio"]
    for _ in range(100):
        if fake.calls:
            break
        time.sleep(0.05)
    (placed,) = fake.calls
    fake.send_status(placed, "ringing")
    time.sleep(0.3)
    fake.answer(placed)
    time.sleep(0.3)
    fake.send_status(placed, "completed", CallDuration="12")
    thread.join(10)
    output = capsys.readouterr().out
    assert result["code"] == 0
    for status in ("queued", "ringing", "in-progress", "completed"):
        assert status in output
    assert parse_qs(urlparse(placed.answer_url).query)["call"][0] in output


# --- a dial a dead process left unrecorded: the outbound sweep asks the carrier ----------------------

NEVER_PLACED = "the gateway stopped before the carrier placed the call"
ABANDONED_UNPLACED = "the gateway stopped while placing the call"
DEAD_PROCESS_NUMBER = "+15550009999"


def on_the_gateway(gateway, coroutine):
    """Run `coroutine` on the gateway's own loop (its HTTP clients live there)."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(coroutine, gateway.server.server._loop).result(10)


def sweep(gateway) -> None:
    """The outbound sweep, now (it runs every 30 s)."""
    on_the_gateway(gateway, gateway.server.app.state.gateway.webhooks.outbound_flow.settle_abandoned(None))


def new_dial(gateway, carrier: str, *, placed: bool = False) -> str:
    """The record of a dial, `queued` (placed: its dial sent, no carrier call id yet)."""
    import asyncio

    from gateway.security import api_key_id
    from gateway.store import CallStore, CallUpdate

    async def create():
        store = CallStore.open(gateway.settings.database_url)
        try:
            inserted = await store.create_outbound(
                dict(carrier=carrier, via="carrier", from_number=DEAD_PROCESS_NUMBER, to_number=CALLEE, route="support",
                     api_key_id=api_key_id(API_KEY), idempotency_key=f"killed-{uuid.uuid4().hex[:8]}", request_hash="x"),
                request={}, max_recent=100, window=dt.timedelta(seconds=60))
            if placed:
                await store.update(inserted.record.id, CallUpdate(placed=True))
            return inserted.record.id
        finally:
            await store.close()

    return asyncio.run(create())


def age_record(gateway, call_id: str, by: dt.timedelta) -> None:
    """Make the record as old as `by`: what waiting would do. (Only then may a sweep take it for
    one a dead process left: the gateway's own sweeps run too.)"""
    import asyncio

    import sqlalchemy as sa

    from gateway.store import CallStore
    from gateway.store.calls import utcnow
    from gateway.store.schema import calls

    async def update():
        store = CallStore.open(gateway.settings.database_url)
        try:
            await store.database.transaction(lambda connection: connection.execute(
                sa.update(calls).where(calls.c.id == call_id).values(created_at=utcnow() - by)))
        finally:
            await store.close()

    asyncio.run(update())


def leave_unplaced(gateway, carrier: str, *, age: dt.timedelta) -> str:
    """What a process killed between accepting a dial and placing it leaves: `queued`, never placed."""
    call_id = new_dial(gateway, carrier)
    age_record(gateway, call_id, age)
    return call_id


def dial_reaching_the_carrier(gateway, carrier: str, call_id: str):
    """The dial of record `call_id` as its process sent it (its callback URLs name the record),
    accepted by the carrier; what the carrier answered never recorded."""
    import time as clock

    from gateway.carriers.base import OutboundDial

    flow = gateway.server.app.state.gateway.webhooks.outbound_flow
    dial = OutboundDial(
        to=CALLEE, from_=DEAD_PROCESS_NUMBER, ring_timeout_seconds=25,
        answer_url=flow.urls.call_callback("outbound-answer", carrier, call_id),
        status_url=flow.urls.call_callback("status", carrier, call_id),
        stream_url="wss://media.example.test/stream" if CARRIERS[carrier].dials_into_stream else None,
    )
    on_the_gateway(gateway, flow.carriers[carrier].place_call(flow.http, dial, deadline=clock.monotonic() + 5))


def record_of(gateway, call_id):
    import asyncio

    from gateway.store import CallStore

    async def read():
        store = CallStore.open(gateway.settings.database_url)
        try:
            return await store.existing(call_id)
        finally:
            await store.close()

    return asyncio.run(read())


def lists_calls_going_on(carrier: str) -> bool:
    """Whether the carrier's call list shows calls still ringing or going on (Exotel's, ended ones only)."""
    return CARRIERS[carrier].lists_placed_calls_within is not None


# A call still going on, for carriers that list those; an ended one (unbeknown to the gateway) for the others.
def state_at_the_carrier(carrier: str) -> tuple[str, str]:
    return ("ringing", "ringing") if lists_calls_going_on(carrier) else ("busy", "busy")


def lookups(fake) -> list:
    """The carrier's call-list requests (GETs other than the account read)."""
    return [request for request in fake.requests if request.method == "GET"]


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_dial_a_dead_process_left_unplaced_and_the_carrier_never_placed_is_failed_so_that_it_may_be_dialled_again(
        gateway, fake_carriers, carrier):
    """The carrier's call list has no such call: never placed, so a campaign may dial the row again.
    A carrier whose list shows ended calls only (Exotel) cannot tell: asked again until the lookup
    gives up, then failed as possibly rung, never dialled again."""
    call_id = leave_unplaced(gateway, carrier, age=dt.timedelta(minutes=4))
    sweep(gateway)
    assert lookups(fake_carriers[carrier])  # the carrier was asked
    view = call_of(gateway, call_id)
    if lists_calls_going_on(carrier):
        assert view["status"] == "failed" and view["failure_reason"] == NEVER_PLACED
    else:
        assert view["status"] == "queued"  # asked again at the next sweep
        given_up = leave_unplaced(gateway, carrier, age=dt.timedelta(minutes=6))
        sweep(gateway)
        view = call_of(gateway, given_up)
        assert view["status"] == "failed" and view["failure_reason"] == ABANDONED_UNPLACED
    assert placed_calls(fake_carriers) == 0


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_dial_a_dead_process_left_unrecorded_is_adopted_from_the_carriers_call_list(gateway, fake_carriers, carrier):
    fake = fake_carriers[carrier]
    call_id = new_dial(gateway, carrier)
    dial_reaching_the_carrier(gateway, carrier, call_id)
    (placed,) = fake.calls
    state, status = state_at_the_carrier(carrier)
    fake.set_state(fake.live_id(placed), state)  # the callbacks saying so were lost with the process
    age_record(gateway, call_id, dt.timedelta(seconds=40))
    sweep(gateway)
    record = record_of(gateway, call_id)
    assert record.carrier_call_id == fake.live_id(placed) and record.status == status
    assert record.placed_at is not None
    assert len(fake.calls) == 1  # adopted, not dialled again


def test_a_dial_still_queued_at_plivo_is_adopted_and_named_by_its_first_callback(gateway, fake_carriers):
    """Plivo's queued calls have a request_uuid, not yet the CallUUID callbacks and call control use:
    the record is adopted without one and learns it from the call's first callback."""
    fake = fake_carriers["plivo"]
    call_id = new_dial(gateway, "plivo")
    dial_reaching_the_carrier(gateway, "plivo", call_id)
    (placed,) = fake.calls
    age_record(gateway, call_id, dt.timedelta(seconds=40))
    sweep(gateway)
    record = record_of(gateway, call_id)
    assert record.status == "queued" and record.placed_at is not None and record.carrier_call_id is None
    asked = len(lookups(fake))
    sweep(gateway)  # placed now: not looked up again
    assert len(lookups(fake)) == asked
    assert fake.send_status(placed, "ringing").status_code < 300
    record = record_of(gateway, call_id)
    assert record.status == "ringing" and record.carrier_call_id == placed.call_uuid


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_call_to_the_same_number_still_waiting_for_its_carrier_id_is_not_adopted_by_a_dead_dial(
        gateway, fake_carriers, carrier):
    """The carrier's list names calls by numbers and times only. Another dial between the same
    numbers, alive and not yet told its carrier call id (its first callback not in), may own the
    call found: the dead process's record waits rather than take it."""
    fake = fake_carriers[carrier]
    dead = new_dial(gateway, carrier)
    alive = new_dial(gateway, carrier, placed=True)
    dial_reaching_the_carrier(gateway, carrier, alive)
    (placed,) = fake.calls
    state, _ = state_at_the_carrier(carrier)
    fake.set_state(fake.live_id(placed), state)
    age_record(gateway, dead, dt.timedelta(seconds=40))
    sweep(gateway)
    assert lookups(fake)
    waiting = record_of(gateway, dead)
    assert waiting.status == "queued" and waiting.carrier_call_id is None and waiting.placed_at is None
    assert fake.send_status(placed, state).status_code < 300  # the live dial's callback names its call
    assert record_of(gateway, alive).carrier_call_id == fake.live_id(placed)
    sweep(gateway)
    assert record_of(gateway, dead).carrier_call_id is None
    assert len(fake.calls) == 1
