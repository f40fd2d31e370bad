"""Tests of the fake carrier REST APIs in gateway.testing."""

from __future__ import annotations

import base64
import threading
from urllib.parse import parse_qsl

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from plivo.utils.signature_v3 import validate_v3_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from gateway.carriers import CARRIERS
from gateway.testing import (
    CarrierDouble,
    FakeCarrier,
    FakePlivo,
    FakeResponse,
    FakeTelnyx,
    FakeTwilio,
    ServerThread,
    TelnyxSigner,
    double,
)

PUBLIC = "https://gateway.example.test"
TWILIO_SID = "AC" + "1" * 32
TWILIO_TOKEN = "twilio-token"
TELNYX_KEY = "KEY-telnyx"
TELNYX_ACCOUNT = "0b7c3f9e-5a4d-4b8e-9c1f-2d3e4f5a6b7c"
PLIVO_ID = "MA" + "1" * 18
PLIVO_TOKEN = "plivo-token"


class Echo:
    """A stand-in gateway that records each callback it receives."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> PlainTextResponse:
        raw = await request.body()
        with self._lock:
            self.received.append(
                {
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "raw": raw,
                    "form": dict(parse_qsl(raw.decode(), keep_blank_values=True)),
                }
            )
        return PlainTextResponse("ok")


@pytest.fixture(scope="module")
def echo():
    echo = Echo()
    with ServerThread(echo.app) as server:
        echo.url = server.url
        yield echo


@pytest.fixture(scope="module")
def telnyx_signer():
    return TelnyxSigner.generate()


def _served(fake: FakeCarrier, echo: Echo):
    fake.public_url = PUBLIC
    fake.deliver_to = echo.url
    with fake.serve():
        yield fake
    fake.close()


@pytest.fixture(scope="module")
def twilio_served(echo):
    yield from _served(FakeTwilio(TWILIO_SID, TWILIO_TOKEN), echo)


@pytest.fixture(scope="module")
def telnyx_served(echo, telnyx_signer):
    yield from _served(FakeTelnyx(TELNYX_KEY, telnyx_signer, TELNYX_ACCOUNT), echo)


@pytest.fixture(scope="module")
def plivo_served(echo):
    yield from _served(FakePlivo(PLIVO_ID, PLIVO_TOKEN), echo)


def _fresh(fake: FakeCarrier, echo: Echo) -> FakeCarrier:
    fake.reset()
    echo.received.clear()
    return fake


@pytest.fixture
def twilio(twilio_served, echo):
    return _fresh(twilio_served, echo)


@pytest.fixture
def telnyx(telnyx_served, echo):
    return _fresh(telnyx_served, echo)


@pytest.fixture
def plivo(plivo_served, echo):
    return _fresh(plivo_served, echo)


# -- Twilio -------------------------------------------------------------------

TWILIO_PATH = f"/2010-04-01/Accounts/{TWILIO_SID}/Calls.json"


def twilio_params(**overrides) -> dict:
    params = {
        "To": "+15557654321",
        "From": "+15550001111",
        "Url": f"{PUBLIC}/twilio/outbound/answer?call=abc",
        "Method": "POST",
        "StatusCallback": f"{PUBLIC}/twilio/status?call=abc",
        "StatusCallbackMethod": "POST",
        "Timeout": "30",
        "MachineDetection": "Enable",
        **overrides,
    }
    # A list is sent as a repeated field, which is how Twilio takes StatusCallbackEvent.
    params["StatusCallbackEvent"] = ["initiated", "ringing", "answered", "completed"]
    return {k: v for k, v in params.items() if v is not None}


def twilio_create(fake, auth=(TWILIO_SID, TWILIO_TOKEN), path=TWILIO_PATH, **overrides):
    return httpx.post(fake.base_url + path, data=twilio_params(**overrides), auth=auth)


def test_twilio_creates_call(twilio):
    response = twilio_create(twilio)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sid"].startswith("CA") and len(body["sid"]) == 34
    assert body | {"sid": None} == body | {
        "sid": None,
        "status": "queued",
        "to": "+15557654321",
        "from": "+15550001111",
        "direction": "outbound-api",
    }
    [call] = twilio.calls
    assert call.call_id == body["sid"]
    assert (call.to, call.from_) == ("+15557654321", "+15550001111")
    assert call.answer_url == f"{PUBLIC}/twilio/outbound/answer?call=abc"
    assert call.status_url == f"{PUBLIC}/twilio/status?call=abc"
    assert call.params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert call.params["MachineDetection"] == "Enable"
    [request] = twilio.requests
    assert (request.method, request.path) == ("POST", TWILIO_PATH)
    assert request.headers["authorization"].startswith("Basic ")
    assert request.form_or_json["To"] == "+15557654321"


@pytest.mark.parametrize(
    "auth, path",
    [
        ((TWILIO_SID, "wrong"), TWILIO_PATH),
        (None, TWILIO_PATH),
        ((TWILIO_SID, TWILIO_TOKEN), f"/2010-04-01/Accounts/AC{'2' * 32}/Calls.json"),
    ],
)
def test_twilio_rejects_bad_auth(twilio, auth, path):
    response = twilio_create(twilio, auth=auth, path=path)

    assert response.status_code == 401
    assert response.json()["code"] == 20003
    assert twilio.calls == []
    assert len(twilio.requests) == 1


@pytest.mark.parametrize("missing", ["To", "From", "Url"])
def test_twilio_rejects_missing_field(twilio, missing):
    response = twilio_create(twilio, **{missing: None})

    assert response.status_code == 400
    assert response.json()["status"] == 400
    assert twilio.calls == []


def test_twilio_rejects_json_body(twilio):
    response = httpx.post(
        twilio.base_url + TWILIO_PATH,
        json=dict(twilio_params()),
        auth=(TWILIO_SID, TWILIO_TOKEN),
    )
    assert response.status_code == 400


def test_script_then_default_success(twilio):
    twilio.script(FakeResponse(status=429, retry_after="2"), FakeResponse(status=503))

    first, second, third = (twilio_create(twilio) for _ in range(3))

    assert (first.status_code, first.headers["retry-after"]) == (429, "2")
    assert first.json()["code"] == 20429
    assert second.status_code == 503
    assert third.status_code == 201
    assert len(twilio.calls) == 1
    assert len(twilio.requests) == 3


def test_script_hang_is_released_by_timeout(twilio):
    twilio.script(FakeResponse(hang=True))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            twilio.base_url + TWILIO_PATH,
            data=twilio_params(),
            auth=(TWILIO_SID, TWILIO_TOKEN),
            timeout=0.2,
        )
    assert twilio_create(twilio).status_code == 201


def test_unknown_path_is_recorded_and_404(twilio):
    response = httpx.post(twilio.base_url + "/2010-04-01/Nope", data={"a": "1"})
    assert response.status_code == 404
    assert twilio.requests[0].path == "/2010-04-01/Nope"
    assert twilio.requests[0].form_or_json == {"a": "1"}


def test_twilio_answer_and_status_are_signed_over_public_url(twilio, echo):
    twilio_create(twilio)
    [call] = twilio.calls

    answered = twilio.answer(call, AnsweredBy="machine_start")
    ringing = twilio.send_status(call, "ringing")
    completed = twilio.send_status(call, "completed", CallDuration="42")

    assert [r.status_code for r in (answered, ringing, completed)] == [200, 200, 200]
    validator = RequestValidator(TWILIO_TOKEN)
    first, second, third = echo.received
    assert (first["path"], first["query"]) == ("/twilio/outbound/answer", "call=abc")
    assert first["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert first["form"] | {
        "CallSid": call.call_id,
        "AccountSid": TWILIO_SID,
        "From": "+15550001111",
        "To": "+15557654321",
        "CallStatus": "in-progress",
        "Direction": "outbound-api",
        "ApiVersion": "2010-04-01",
        "AnsweredBy": "machine_start",
    } == first["form"]
    assert validator.validate(call.answer_url, first["form"], first["headers"]["x-twilio-signature"])
    for received in (second, third):
        assert (received["path"], received["query"]) == ("/twilio/status", "call=abc")
        assert validator.validate(call.status_url, received["form"], received["headers"]["x-twilio-signature"])
        assert received["form"]["CallbackSource"] == "call-progress-events"
        assert received["form"]["Timestamp"]
    assert (second["form"]["CallStatus"], second["form"]["SequenceNumber"]) == ("ringing", "0")
    assert (third["form"]["CallStatus"], third["form"]["SequenceNumber"]) == ("completed", "1")
    assert third["form"]["CallDuration"] == "42"
    # The signature is over the public URL, not the loopback one it was sent to.
    assert not validator.validate(
        echo.url + "/twilio/outbound/answer?call=abc", first["form"], first["headers"]["x-twilio-signature"]
    )


def test_delivery_refuses_url_outside_public_url(twilio):
    twilio_create(twilio, Url="https://elsewhere.example.test/answer")
    with pytest.raises(ValueError, match="public_url"):
        twilio.answer(twilio.calls[0])


# -- Telnyx -------------------------------------------------------------------

TELNYX_PATH = f"/v2/texml/Accounts/{TELNYX_ACCOUNT}/Calls"


def telnyx_body(**overrides):
    body = {
        "ApplicationSid": "1293384261075731499",
        "To": "+15557654321",
        "From": "+15550001111",
        "Url": f"{PUBLIC}/telnyx/outbound/answer?call=abc",
        "UrlMethod": "POST",
        "StatusCallback": f"{PUBLIC}/telnyx/status?call=abc",
        "StatusCallbackEvent": "initiated ringing answered completed",
        "StatusCallbackMethod": "POST",
        "Timeout": 30,
        "MachineDetection": "Enable",
        **overrides,
    }
    return {k: v for k, v in body.items() if v is not None}


def telnyx_create(fake, key=TELNYX_KEY, path=TELNYX_PATH, **overrides):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(fake.base_url + path, json=telnyx_body(**overrides), headers=headers)


def test_telnyx_creates_call(telnyx):
    response = telnyx_create(telnyx)

    assert response.status_code == 200, response.text
    assert response.json() == {"from": "+15550001111", "to": "+15557654321", "status": "queued"}
    [call] = telnyx.calls
    assert call.call_id.startswith("v3:")
    assert call.answer_url == f"{PUBLIC}/telnyx/outbound/answer?call=abc"
    assert call.status_url == f"{PUBLIC}/telnyx/status?call=abc"
    assert call.params == telnyx_body()
    assert telnyx.requests[0].form_or_json == telnyx_body()


@pytest.mark.parametrize(
    "key, path",
    [("wrong", TELNYX_PATH), (None, TELNYX_PATH), (TELNYX_KEY, "/v2/texml/Accounts/other/Calls")],
)
def test_telnyx_rejects_bad_auth(telnyx, key, path):
    response = telnyx_create(telnyx, key=key, path=path)
    assert response.status_code == 401
    assert response.json()["errors"]
    assert telnyx.calls == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"ApplicationSid": None},
        {"To": None},
        {"From": None},
        {"StatusCallbackEvent": ["initiated", "completed"]},  # must be one string
        {"Timeout": 600},
    ],
)
def test_telnyx_rejects_invalid_body(telnyx, overrides):
    response = telnyx_create(telnyx, **overrides)
    assert response.status_code == 422
    assert telnyx.calls == []


def test_telnyx_answer_and_status_are_signed(telnyx, echo, telnyx_signer):
    telnyx_create(telnyx)
    [call] = telnyx.calls

    telnyx.answer(call)
    telnyx.send_status(call, "completed", CallDuration="7")

    public_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(telnyx_signer.public_key_b64))
    answered, completed = echo.received
    for received in (answered, completed):
        headers = received["headers"]
        signature = base64.b64decode(headers["telnyx-signature-ed25519"])
        public_key.verify(signature, f"{headers['telnyx-timestamp']}|".encode() + received["raw"])
        assert received["form"]["CallSid"] == call.call_id
        assert received["form"]["AccountSid"] == TELNYX_ACCOUNT
        assert received["form"]["ConnectionId"] == "1293384261075731499"
        assert received["form"]["Direction"] == "outbound-api"
    assert (answered["path"], answered["query"]) == ("/telnyx/outbound/answer", "call=abc")
    assert answered["form"]["CallStatus"] == "in-progress"
    assert (completed["path"], completed["query"]) == ("/telnyx/status", "call=abc")
    assert completed["form"] | {
        "CallStatus": "completed",
        "CallbackSource": "call-progress-events",
        "SequenceNumber": "0",
        "CallDuration": "7",
    } == completed["form"]


# -- Plivo --------------------------------------------------------------------

PLIVO_PATH = f"/v1/Account/{PLIVO_ID}/Call/"


def plivo_body(**overrides):
    body = {
        "from": "15550001111",
        "to": "+15557654321",
        "answer_url": f"{PUBLIC}/plivo/outbound/answer?call=abc",
        "answer_method": "POST",
        "ring_url": f"{PUBLIC}/plivo/ring?call=abc",
        "ring_method": "POST",
        "hangup_url": f"{PUBLIC}/plivo/status?call=abc",
        "hangup_method": "POST",
        "ring_timeout": 30,
        "machine_detection": "true",
        **overrides,
    }
    return {k: v for k, v in body.items() if v is not None}


def plivo_create(fake, auth=(PLIVO_ID, PLIVO_TOKEN), path=PLIVO_PATH, **overrides):
    return httpx.post(fake.base_url + path, json=plivo_body(**overrides), auth=auth)


def test_plivo_creates_call(plivo):
    response = plivo_create(plivo)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["message"] == "call fired"
    [call] = plivo.calls
    assert call.call_id == body["request_uuid"]
    assert call.call_uuid and call.call_uuid != call.call_id
    assert (call.to, call.from_) == ("+15557654321", "15550001111")  # stored as given
    assert call.answer_url == f"{PUBLIC}/plivo/outbound/answer?call=abc"
    assert call.status_url == f"{PUBLIC}/plivo/status?call=abc"
    assert call.params["ring_url"] == f"{PUBLIC}/plivo/ring?call=abc"


@pytest.mark.parametrize(
    "auth, path",
    [((PLIVO_ID, "wrong"), PLIVO_PATH), (None, PLIVO_PATH), ((PLIVO_ID, PLIVO_TOKEN), "/v1/Account/MAOTHER/Call/")],
)
def test_plivo_rejects_bad_auth(plivo, auth, path):
    response = plivo_create(plivo, auth=auth, path=path)
    assert response.status_code == 401
    assert "error" in response.json()
    assert plivo.calls == []


@pytest.mark.parametrize("missing", ["from", "to", "answer_url"])
def test_plivo_rejects_missing_field(plivo, missing):
    response = plivo_create(plivo, **{missing: None})
    assert response.status_code == 400
    assert plivo.calls == []


def test_plivo_callbacks_are_signed_and_routed(plivo, echo):
    plivo_create(plivo)
    [call] = plivo.calls

    plivo.send_status(call, "ringing")
    plivo.answer(call, Machine="true")
    plivo.send_status(call, "busy")

    ringing, answered, hung_up = echo.received
    for received, url in ((ringing, plivo_body()["ring_url"]), (answered, call.answer_url), (hung_up, call.status_url)):
        headers = received["headers"]
        assert validate_v3_signature(
            "POST",
            url,
            headers["x-plivo-signature-v3-nonce"],
            PLIVO_TOKEN,
            headers["x-plivo-signature-v3"],
            received["form"],
        )
        assert received["form"]["RequestUUID"] == call.call_id
        assert received["form"]["CallUUID"] == call.call_uuid
        assert received["form"]["To"] == "15557654321"  # Plivo reports bare digits
    assert ringing["path"] == "/plivo/ring"
    assert (ringing["form"]["CallStatus"], ringing["form"]["Event"]) == ("ringing", "Ring")
    assert answered["path"] == "/plivo/outbound/answer"
    assert answered["form"] | {
        "ALegUUID": call.call_uuid,
        "ALegRequestUUID": call.call_id,
        "CallStatus": "in-progress",
        "Direction": "outbound",
        "Event": "StartApp",
        "Machine": "true",
    } == answered["form"]
    assert hung_up["path"] == "/plivo/status"
    assert hung_up["form"] | {
        "CallStatus": "busy",
        "HangupCause": "USER_BUSY",
        "Duration": "0",
        "BillDuration": "0",
    } == hung_up["form"]


def test_plivo_rejects_status_it_never_sends(plivo):
    plivo_create(plivo)
    with pytest.raises(ValueError):
        plivo.send_status(plivo.calls[0], "answered")


# -- live-call updates ------------------------------------------------------------


def twilio_update(fake, call_sid, data, auth=(TWILIO_SID, TWILIO_TOKEN)):
    path = f"/2010-04-01/Accounts/{TWILIO_SID}/Calls/{call_sid}.json"
    return httpx.post(fake.base_url + path, data=data, auth=auth)


def test_twilio_update_redirects_a_placed_call(twilio):
    sid = twilio_create(twilio).json()["sid"]

    response = twilio_update(twilio, sid, {"Url": f"{PUBLIC}/twilio/transfer?call=abc", "Method": "POST"})

    assert response.status_code == 200, response.text
    # Not answered yet: the redirect leaves it queued.
    assert response.json() | {"sid": sid, "status": "queued", "to": "+15557654321"} == response.json()
    [update] = twilio.updates
    assert (update.call_id, update.action) == (sid, "update")
    assert update.params == {"Url": f"{PUBLIC}/twilio/transfer?call=abc", "Method": "POST"}
    assert twilio.requests[-1].path.endswith(f"/Calls/{sid}.json")


def test_twilio_update_of_inbound_call_and_hang_up(twilio):
    inbound = "CA" + "7" * 32
    twilio.live_calls.add(inbound)

    twiml = twilio_update(twilio, inbound, {"Twiml": "<Response><Dial>+15550009999</Dial></Response>"})
    hangup = twilio_update(twilio, inbound, {"Status": "completed"})

    assert (twiml.status_code, hangup.status_code) == (200, 200)
    assert hangup.json()["status"] == "completed"
    assert [u.params for u in twilio.updates] == [
        {"Twiml": "<Response><Dial>+15550009999</Dial></Response>"},
        {"Status": "completed"},
    ]


def test_twilio_update_errors(twilio):
    sid = twilio_create(twilio).json()["sid"]

    unknown = twilio_update(twilio, "CA" + "9" * 32, {"Status": "completed"})
    assert unknown.status_code == 404
    assert unknown.json() | {"code": 20404, "status": 404} == unknown.json()
    assert "was not found" in unknown.json()["message"]
    assert twilio_update(twilio, sid, {"Status": "completed"}, auth=(TWILIO_SID, "x")).status_code == 401
    for bad in ({"Status": "busy"}, {"Method": "PUT", "Url": f"{PUBLIC}/x"}, {"Uri": f"{PUBLIC}/x"}, {}):
        response = twilio_update(twilio, sid, bad)
        assert response.status_code == 400, bad
    assert twilio.updates == []


def test_update_script_is_separate_from_create_script(twilio):
    twilio.script_updates(FakeResponse(status=503, retry_after="1"))
    sid = twilio_create(twilio).json()["sid"]  # does not consume the update script

    first = twilio_update(twilio, sid, {"Status": "completed"})
    second = twilio_update(twilio, sid, {"Status": "completed"})

    assert (first.status_code, first.headers["retry-after"]) == (503, "1")
    assert second.status_code == 200
    assert len(twilio.updates) == 1


def telnyx_update(fake, call_sid, body, key=TELNYX_KEY, form=False):
    url = f"{fake.base_url}/v2/texml/Accounts/{TELNYX_ACCOUNT}/Calls/{call_sid}"
    headers = {"Authorization": f"Bearer {key}"}
    if form:
        return httpx.post(url, data=body, headers=headers)
    return httpx.post(url, json=body, headers=headers)


def test_telnyx_update(telnyx):
    telnyx_create(telnyx)
    [call] = telnyx.calls

    redirect = telnyx_update(telnyx, call.call_id, {"Url": f"{PUBLIC}/telnyx/transfer", "Method": "POST"})
    texml = telnyx_update(telnyx, call.call_id, {"Texml": "<Response><Hangup/></Response>"}, form=True)

    assert (redirect.status_code, texml.status_code) == (200, 200)
    assert redirect.json()["sid"] == call.call_id
    assert [u.params for u in telnyx.updates] == [
        {"Url": f"{PUBLIC}/telnyx/transfer", "Method": "POST"},
        {"Texml": "<Response><Hangup/></Response>"},
    ]


def test_telnyx_update_errors(telnyx):
    telnyx_create(telnyx)
    [call] = telnyx.calls

    unknown = telnyx_update(telnyx, "v3:unknown", {"Status": "completed"})
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["code"] == "10005"
    assert telnyx_update(telnyx, call.call_id, {"Status": "completed"}, key="wrong").status_code == 401
    assert telnyx_update(telnyx, call.call_id, {"url": f"{PUBLIC}/x"}).status_code == 422  # not CamelCase
    assert telnyx_update(telnyx, call.call_id, {"Status": "ended"}).status_code == 422
    telnyx.live_calls.add("v3:inbound")
    assert telnyx_update(telnyx, "v3:inbound", {"Status": "completed"}).status_code == 200
    assert [u.call_id for u in telnyx.updates] == ["v3:inbound"]


def plivo_update(fake, call_uuid, body, auth=(PLIVO_ID, PLIVO_TOKEN), method="POST"):
    url = f"{fake.base_url}/v1/Account/{PLIVO_ID}/Call/{call_uuid}/"
    if method == "DELETE":
        return httpx.delete(url, auth=auth)
    return httpx.post(url, json=body, auth=auth)


def test_plivo_transfer_uses_call_uuid(plivo):
    plivo_create(plivo)
    [call] = plivo.calls
    body = {"legs": "aleg", "aleg_url": f"{PUBLIC}/plivo/transfer", "aleg_method": "POST"}

    response = plivo_update(plivo, call.call_uuid, body)

    assert response.status_code == 202, response.text
    assert response.json()["message"] == "call transferred"
    assert [(u.call_id, u.params) for u in plivo.updates] == [(call.call_uuid, body)]
    # The request_uuid is not a live call's id.
    not_found = plivo_update(plivo, call.call_id, body)
    assert not_found.status_code == 404
    assert not_found.json()["error"] == "not found"


def test_plivo_update_errors_and_hangup(plivo):
    inbound = "b3a7c6e2-0000-4000-8000-000000000001"
    plivo.live_calls.add(inbound)

    assert plivo_update(plivo, inbound, {"legs": "aleg"}).status_code == 400  # no aleg_url
    assert plivo_update(plivo, inbound, {"legs": "cleg", "aleg_url": "x"}).status_code == 400
    assert plivo_update(plivo, inbound, {"legs": "aleg", "aleg_url": "x"}, auth=(PLIVO_ID, "no")).status_code == 401
    assert plivo_update(plivo, inbound, None, method="DELETE").status_code == 204
    assert [(u.call_id, u.action) for u in plivo.updates] == [(inbound, "hangup")]


# -- form_for and callback -------------------------------------------------------------


def test_twilio_form_for_and_callback(twilio, echo):
    twilio_create(twilio)
    [call] = twilio.calls

    placed = twilio.form_for(call.call_id, DialCallStatus="no-answer")
    inbound = twilio.form_for("CA" + "5" * 32, From="+15551112222")
    response = twilio.callback(f"{PUBLIC}/twilio/dial-action?call=abc", placed)

    assert placed | {
        "CallSid": call.call_id,
        "AccountSid": TWILIO_SID,
        "From": "+15550001111",
        "To": "+15557654321",
        "Direction": "outbound-api",
        "CallStatus": "in-progress",
        "DialCallStatus": "no-answer",
    } == placed
    assert inbound | {
        "CallSid": "CA" + "5" * 32,
        "AccountSid": TWILIO_SID,
        "From": "+15551112222",
        "Caller": "+15551112222",
        "Direction": "inbound",
    } == inbound
    assert response.status_code == 200
    [received] = echo.received
    assert (received["path"], received["query"]) == ("/twilio/dial-action", "call=abc")
    assert received["form"] == placed
    assert RequestValidator(TWILIO_TOKEN).validate(
        f"{PUBLIC}/twilio/dial-action?call=abc", received["form"], received["headers"]["x-twilio-signature"]
    )


def test_telnyx_form_for_and_callback(telnyx, echo, telnyx_signer):
    telnyx_create(telnyx)
    [call] = telnyx.calls

    placed = telnyx.form_for(call.call_id)
    inbound = telnyx.form_for("v3:inbound", ConnectionId="42")
    telnyx.callback(f"{PUBLIC}/telnyx/conference-status", {**inbound, "StatusCallbackEvent": "participant-join"})

    assert placed["ConnectionId"] == "1293384261075731499"
    assert (placed["CallSid"], placed["Direction"]) == (call.call_id, "outbound-api")
    assert inbound | {"CallSid": "v3:inbound", "AccountSid": TELNYX_ACCOUNT, "ConnectionId": "42"} == inbound
    [received] = echo.received
    assert received["path"] == "/telnyx/conference-status"
    assert received["form"]["StatusCallbackEvent"] == "participant-join"
    public_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(telnyx_signer.public_key_b64))
    headers = received["headers"]
    public_key.verify(
        base64.b64decode(headers["telnyx-signature-ed25519"]),
        f"{headers['telnyx-timestamp']}|".encode() + received["raw"],
    )


def test_plivo_form_for_and_callback(plivo, echo):
    plivo_create(plivo)
    [call] = plivo.calls

    placed = plivo.form_for(call.call_uuid)
    inbound = plivo.form_for("b3a7c6e2-0000-4000-8000-000000000002", From="+15551112222")
    plivo.callback(f"{PUBLIC}/plivo/transfer?call=abc", inbound)

    assert (placed["CallUUID"], placed["RequestUUID"], placed["Direction"]) == (call.call_uuid, call.call_id, "outbound")
    assert plivo.form_for(call.call_id)["CallUUID"] == call.call_uuid  # request_uuid finds the leg too
    assert inbound | {
        "CallUUID": "b3a7c6e2-0000-4000-8000-000000000002",
        "From": "15551112222",
        "Direction": "inbound",
        "CallStatus": "in-progress",
    } == inbound
    [received] = echo.received
    assert (received["path"], received["query"]) == ("/plivo/transfer", "call=abc")
    headers = received["headers"]
    assert validate_v3_signature(
        "POST",
        f"{PUBLIC}/plivo/transfer?call=abc",
        headers["x-plivo-signature-v3-nonce"],
        PLIVO_TOKEN,
        headers["x-plivo-signature-v3"],
        received["form"],
    )


# -- the doubles --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CARRIERS))
def test_every_registered_carrier_has_a_double_that_agrees_with_it(name):
    import importlib

    carrier, carrier_double = CARRIERS[name], double(name)
    assert isinstance(carrier_double, CarrierDouble) and carrier_double.name == name
    assert carrier_double.call_id_param == carrier.call_id_param
    assert carrier_double.stream_rate == carrier.media_rate
    assert carrier_double.own_number.startswith("+") and carrier_double.own_number[1:].isdigit()
    environ = carrier_double.environ("http://127.0.0.1:9")
    assert set(environ) <= set(carrier.environment) and "http://127.0.0.1:9" in environ.values()
    fake = carrier_double.fake_api()
    assert isinstance(fake, importlib.import_module(f"gateway.testing.{name}").FAKE_API)
    if carrier.can_transfer:
        assert carrier_double.dial_status_param
    form = carrier_double.inbound_form(to="+15550001111")
    assert form[carrier_double.call_id_param]


def test_double_refuses_unknown_carriers():
    for name in ("vonage", "carrier", "../x", ""):
        with pytest.raises(ValueError):
            double(name)


def test_a_get_carrier_sends_its_form_in_the_signed_query():
    class QueryCarrier(type(double("twilio"))):
        webhook_method = "GET"

        def sign(self, url, form, raw):
            return {"x-signed-url": url, "x-raw": raw.decode()}

    form = {"CallSid": "CA1", "To": "+15550001111"}
    request = QueryCarrier().inbound_request(PUBLIC, "/exo/inbound?tenant=acme", form)
    assert (request.method, request.body) == ("GET", b"")
    assert request.query == "tenant=acme&CallSid=CA1&To=%2B15550001111"
    assert request.headers == {"x-signed-url": f"{PUBLIC}/exo/inbound?{request.query}", "x-raw": ""}
    unsigned = QueryCarrier().inbound_request(PUBLIC, "/exo/inbound", form, signed=False)
    assert unsigned.headers == {} and unsigned.query == "CallSid=CA1&To=%2B15550001111"
