"""Tests of the public helpers in gateway.testing."""

from __future__ import annotations

import base64
import time
import uuid
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from plivo.utils.signature_v3 import validate_v3_signature
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from gateway.testing import (
    FakeResponse,
    FakeUltravox,
    ServerThread,
    TelnyxSigner,
    plivo_inbound_form,
    plivo_v3_headers,
    telnyx_inbound_form,
    twilio_inbound_form,
    twilio_signature,
    validate_ultravox_request,
)

KEY = {"X-API-Key": "test-ultravox-key"}
AGENT_ID = "7c1d1b7e-9a51-4c8e-9d0f-3b8d2a6f4e11"


@pytest.fixture(scope="module")
def served():
    # One server for the module keeps the suite fast; each test resets the fake.
    fake = FakeUltravox()
    with fake.serve() as server:
        yield fake, server


@pytest.fixture
def fake(served):
    fake, _ = served
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def client(served, fake):
    _, server = served
    with httpx.Client(base_url=server.url, timeout=5.0) as c:
        yield c


# -- ServerThread ------------------------------------------------------------


def test_server_thread_serves_and_stops():
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    with ServerThread(app) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.port > 0
        assert httpx.get(server.url + "/").text == "ok"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/", timeout=1.0)


# -- FakeUltravox: accepted requests ------------------------------------------


def test_accepts_start_call_request(fake, client):
    body = {
        "systemPrompt": "You are a helpful receptionist.",
        "medium": {"twilio": {}},
        "metadata": {"gateway.carrier": "twilio", "gateway.call_sid": "CA123"},
        "firstSpeakerSettings": {"agent": {"text": "Hello!"}},
        "maxDuration": "600s",
    }
    response = client.post("/api/calls", json=body, headers=KEY)

    assert response.status_code == 201, response.text
    call = response.json()
    uuid.UUID(call["callId"])
    join = urlparse(call["joinUrl"])
    assert join.scheme == "wss"
    assert call["callId"] in join.path
    assert parse_qs(join.query) == {"token": ["tok-1"], "region": ["us"]}
    assert call["medium"] == {"twilio": {}}
    assert call["metadata"] == body["metadata"]
    assert call["firstSpeakerSettings"] == body["firstSpeakerSettings"]
    assert fake.calls_created == 1
    assert fake.schema_errors == []
    [recorded] = fake.requests
    assert recorded.path == "/api/calls"
    assert recorded.agent_id is None
    assert recorded.body == body
    assert recorded.headers["x-api-key"] == "test-ultravox-key"


def test_accepts_start_agent_call_request(fake, client):
    body = {
        "templateContext": {"caller": {"number": "+15551230001"}},
        "medium": {"plivo": {}},
        "metadata": {"route": "main"},
        "toolOverrides": {"add": [{"toolName": "hangUp"}]},
    }
    response = client.post(f"/api/agents/{AGENT_ID}/calls", json=body, headers=KEY)

    assert response.status_code == 201, response.text
    assert response.json()["joinUrl"].startswith("wss://voice.fake-ultravox.test/calls/")
    assert fake.requests[0].agent_id == AGENT_ID
    assert fake.schema_errors == []


# -- FakeUltravox: rejected requests -------------------------------------------


def test_strict_validation_rejects_misspelt_field(fake, client):
    response = client.post(
        "/api/calls", json={"systemPrompt": "hi", "medium": {"twillio": {}}}, headers=KEY
    )

    assert response.status_code == 400
    assert "twillio" in response.json()["detail"]
    assert len(fake.schema_errors) == 1 and "twillio" in fake.schema_errors[0]
    assert fake.calls_created == 0
    # The same body passes without strict mode: the schema itself leaves objects open.
    assert validate_ultravox_request(
        {"medium": {"twillio": {}}}, agent=False, strict=False
    ) == []


def test_strict_validation_rejects_non_string_metadata(fake, client):
    response = client.post("/api/calls", json={"metadata": {"attempt": 2}}, headers=KEY)

    assert response.status_code == 400
    assert fake.schema_errors == ["metadata/attempt: 2 is not of type 'string'"]


def test_validate_ultravox_request_directly():
    assert validate_ultravox_request({"systemPrompt": "hi"}, agent=False) == []
    # templateContext exists only on agent calls.
    assert validate_ultravox_request({"templateContext": {}}, agent=True) == []
    [error] = validate_ultravox_request({"templateContext": {}}, agent=False)
    assert "templateContext" in error
    # Open objects stay open in strict mode.
    assert validate_ultravox_request(
        {"experimentalSettings": {"anything": [1, 2]}}, agent=True
    ) == []
    errors = validate_ultravox_request({"metadata": {"ultravox.x": "1"}}, agent=True)
    assert errors and "ultravox." in errors[0]
    [error] = validate_ultravox_request({"joinTimeout": "30 seconds"}, agent=True)
    assert error.startswith("joinTimeout:")


def test_rejects_missing_or_wrong_api_key(fake, client):
    assert client.post("/api/calls", json={}).status_code == 401
    assert client.post("/api/calls", json={}, headers={"X-API-Key": "nope"}).status_code == 401
    assert fake.calls_created == 0
    assert len(fake.requests) == 2


def test_rejects_agent_id_that_is_not_a_uuid(fake, client):
    response = client.post("/api/agents/not-a-uuid/calls", json={}, headers=KEY)
    assert response.status_code == 400


# -- FakeUltravox: scripted behaviour ------------------------------------------


def test_scripted_429_with_retry_after_then_success(fake, client):
    fake.script(FakeResponse(status=429, retry_after="2"))

    first = client.post("/api/calls", json={}, headers=KEY)
    second = client.post("/api/calls", json={}, headers=KEY)

    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    assert second.status_code == 201
    assert "joinUrl" in second.json()
    assert fake.calls_created == 1
    assert len(fake.requests) == 2


def test_scripted_body_missing_join_url_and_delay(fake, client):
    fake.script(
        FakeResponse(omit_join_url=True),
        FakeResponse(status=503, body={"error": "down"}),
        FakeResponse(delay=0.2),
    )

    assert "joinUrl" not in client.post("/api/calls", json={}, headers=KEY).json()
    down = client.post("/api/calls", json={}, headers=KEY)
    assert (down.status_code, down.json()) == (503, {"error": "down"})
    started = time.monotonic()
    assert client.post("/api/calls", json={}, headers=KEY).status_code == 201
    assert time.monotonic() - started >= 0.2


def test_scripted_hang_times_out_the_client(fake, client):
    fake.script(FakeResponse(hang=True))
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/calls", json={}, headers=KEY, timeout=0.3)
    assert client.post("/api/calls", json={}, headers=KEY).status_code == 201


def test_connections_seen_counts_tcp_connections(served, fake):
    _, server = served
    with httpx.Client(base_url=server.url) as one:
        for _ in range(3):
            assert one.post("/api/calls", json={}, headers=KEY).status_code == 201
    assert fake.connections_seen == 1

    with httpx.Client(base_url=server.url) as two:
        two.post("/api/calls", json={}, headers=KEY)
    assert fake.connections_seen == 2


# -- carrier signers -----------------------------------------------------------


def test_twilio_signature_matches_documented_vector():
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    signature = twilio_signature("12345", url, params)
    assert signature == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert RequestValidator("12345").validate(url, params, signature)


def test_telnyx_signer_verifies_and_detects_tampering():
    signer = TelnyxSigner.generate()
    body = b"CallSid=v3%3Aabc&From=%2B15551230001"
    headers = signer.headers(body, timestamp=1_700_000_000)

    assert headers["telnyx-timestamp"] == "1700000000"
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signer.public_key_b64))
    signature = base64.b64decode(headers["telnyx-signature-ed25519"])
    public.verify(signature, b"1700000000|" + body)
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"1700000000|" + body + b"&To=x")
    assert abs(int(signer.headers(body)["telnyx-timestamp"]) - time.time()) < 5


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_plivo_v3_headers_verify_with_plivo_sdk(method):
    url = "https://gateway.example.com/plivo/inbound?tenant=a"
    params = plivo_inbound_form()
    headers = plivo_v3_headers("plivo-token", url, params, method=method)

    assert validate_v3_signature(
        method,
        url,
        headers["X-Plivo-Signature-V3-Nonce"],
        "plivo-token",
        headers["X-Plivo-Signature-V3"],
        dict(params),
    )
    assert not validate_v3_signature(
        method,
        url,
        headers["X-Plivo-Signature-V3-Nonce"],
        "other-token",
        headers["X-Plivo-Signature-V3"],
        dict(params),
    )
    assert plivo_v3_headers("t", url, params, nonce="n1")["X-Plivo-Signature-V3-Nonce"] == "n1"


# -- inbound forms -------------------------------------------------------------


def test_inbound_forms_look_like_carrier_webhooks():
    twilio = twilio_inbound_form(Digits="1")
    assert twilio["CallSid"].startswith("CA") and len(twilio["CallSid"]) == 34
    assert twilio["AccountSid"].startswith("AC") and len(twilio["AccountSid"]) == 34
    assert (twilio["From"], twilio["Caller"], twilio["Digits"]) == ("+15551230001",) * 2 + ("1",)

    telnyx = telnyx_inbound_form(to="+15550002222")
    assert telnyx["CallSid"].startswith("v3:")
    uuid.UUID(telnyx["AccountSid"])
    assert (telnyx["To"], telnyx["Direction"]) == ("+15550002222", "inbound")

    plivo = plivo_inbound_form(from_="+15551230009")
    uuid.UUID(plivo["CallUUID"])
    assert (plivo["From"], plivo["To"]) == ("15551230009", "15550001111")
    assert plivo["Event"] == "StartApp"


def test_validation_can_be_switched_off_for_benchmarks():
    fake = FakeUltravox(validate=False)
    with fake.serve() as server:
        response = httpx.post(
            server.url + "/api/calls",
            json={"medium": {"twillio": {}}},
            headers={"X-API-Key": fake.api_key},
        )
    assert response.status_code == 201
    assert fake.schema_errors == []


# -- FakeUltravox: priorCallId and created calls --------------------------------


def test_prior_call_id_is_accepted_and_recorded(fake, client):
    first = client.post("/api/calls", json={"systemPrompt": "hi"}, headers=KEY).json()

    response = client.post(
        "/api/calls", params={"priorCallId": first["callId"]}, json={"medium": {"twilio": {}}}, headers=KEY
    )

    assert response.status_code == 201, response.text
    assert fake.requests[0].query == {}
    assert fake.requests[1].query == {"priorCallId": first["callId"]}
    assert [call["callId"] for call in fake.created_calls] == [first["callId"], response.json()["callId"]]
    assert fake.created_calls[1]["joinUrl"] == response.json()["joinUrl"]
    assert fake.call_ids == {first["callId"], response.json()["callId"]}
    assert fake.schema_errors == []


@pytest.mark.parametrize(
    "path, params, body",
    [
        ("/api/calls", {"priorCallId": "CA123"}, {}),
        ("/api/calls", {"priorCallId": AGENT_ID}, {"initialMessages": []}),
        (f"/api/agents/{AGENT_ID}/calls", {"priorCallId": AGENT_ID}, {}),
        ("/api/calls", {"priorcallid": AGENT_ID}, {}),
    ],
)
def test_bad_prior_call_id_is_rejected(fake, client, path, params, body):
    response = client.post(path, params=params, json=body, headers=KEY)

    assert response.status_code == 400
    assert len(fake.schema_errors) == 1
    assert fake.created_calls == []


def test_scripted_call_body_is_kept_in_created_calls(fake, client):
    fake.script(FakeResponse(body={"callId": AGENT_ID, "joinUrl": "wss://x.test/"}))
    client.post("/api/calls", json={}, headers=KEY)
    assert fake.created_calls == [{"callId": AGENT_ID, "joinUrl": "wss://x.test/"}]


def test_unknown_path_is_recorded_and_404(fake, client):
    assert client.get("/api/nope", headers=KEY).status_code == 404
    assert (fake.requests[0].method, fake.requests[0].path) == ("GET", "/api/nope")


# -- FakeUltravox: send_data_message --------------------------------------------


def _new_call(client) -> str:
    return client.post("/api/calls", json={}, headers=KEY).json()["callId"]


@pytest.mark.parametrize(
    "message",
    [
        {"type": "hang_up", "message": "Goodbye."},
        {"type": "forced_agent_message", "content": "Transferring you now."},
        {"type": "user_text_message", "text": "the operator did not answer"},
    ],
)
def test_data_message_is_accepted_and_recorded(fake, client, message):
    call_id = _new_call(client)

    response = client.post(f"/api/calls/{call_id}/send_data_message", json=message, headers=KEY)

    assert response.status_code == 204, response.text
    assert fake.data_messages == [(call_id, message)]
    recorded = fake.requests[-1]
    assert (recorded.path, recorded.body) == (f"/api/calls/{call_id}/send_data_message", message)
    assert fake.schema_errors == []


def test_data_message_errors(fake, client):
    call_id = _new_call(client)
    path = f"/api/calls/{call_id}/send_data_message"

    assert client.post(path, json={"type": "hang_up"}).status_code == 401
    assert client.post(path, json={"type": "hangup"}, headers=KEY).status_code == 400
    assert client.post(path, json={"message": "bye"}, headers=KEY).status_code == 400
    assert len(fake.schema_errors) == 2 and "hangup" in fake.schema_errors[0]
    unknown = f"/api/calls/{uuid.uuid4()}/send_data_message"
    assert client.post(unknown, json={"type": "hang_up"}, headers=KEY).status_code == 404
    fake.ended_calls.add(call_id)
    assert client.post(path, json={"type": "hang_up"}, headers=KEY).status_code == 422
    assert fake.data_messages == []
    assert len(fake.requests) == 1 + 5


def test_data_messages_have_their_own_script(fake, client):
    fake.script_data_messages(FakeResponse(status=503))
    call_id = _new_call(client)  # does not consume the data-message script
    path = f"/api/calls/{call_id}/send_data_message"

    assert client.post(path, json={"type": "hang_up"}, headers=KEY).status_code == 503
    assert client.post(path, json={"type": "hang_up"}, headers=KEY).status_code == 204
    assert fake.data_messages == [(call_id, {"type": "hang_up"})]


# -- FakeUltravox: durable tools -------------------------------------------------

TRANSFER_DEFINITION = {
    "modelToolName": "transferToOperator",
    "description": "Transfer the caller to a human operator.",
    "dynamicParameters": [
        {
            "name": "reason",
            "location": "PARAMETER_LOCATION_BODY",
            "schema": {"type": "string"},
            "required": True,
        }
    ],
    "automaticParameters": [
        {"name": "callId", "location": "PARAMETER_LOCATION_BODY", "knownValue": "KNOWN_PARAM_CALL_ID"}
    ],
    "http": {"baseUrlPattern": "https://gateway.example.test/tools/transfer", "httpMethod": "POST"},
}


def test_tools_create_list_search_and_update(fake, client):
    created = client.post(
        "/api/tools", json={"name": "gateway-transfer", "definition": TRANSFER_DEFINITION}, headers=KEY
    )
    other = client.post(
        "/api/tools",
        json={"name": "lookup", "definition": {**TRANSFER_DEFINITION, "modelToolName": "lookup"}},
        headers=KEY,
    )

    assert created.status_code == 201, created.text
    assert other.status_code == 201, other.text
    tool = created.json()
    uuid.UUID(tool["toolId"])
    assert (tool["name"], tool["definition"]) == ("gateway-transfer", TRANSFER_DEFINITION)
    assert tool["created"].endswith("Z")
    assert fake.tools[tool["toolId"]] == tool

    listed = client.get("/api/tools", headers=KEY).json()
    assert (len(listed["results"]), listed["next"]) == (2, None)
    found = client.get("/api/tools", params={"search": "Transfer"}, headers=KEY).json()
    assert [t["toolId"] for t in found["results"]] == [tool["toolId"]]
    assert fake.requests[-1].query == {"search": "Transfer"}

    changed = {**TRANSFER_DEFINITION, "description": "Hand the caller to a person."}
    updated = client.put(
        f"/api/tools/{tool['toolId']}", json={"name": "gateway-transfer", "definition": changed}, headers=KEY
    )
    assert updated.status_code == 200, updated.text
    assert updated.json() | {"definition": None} == tool | {"definition": None}
    assert fake.tools[tool["toolId"]]["definition"] == changed
    assert client.get(f"/api/tools/{tool['toolId']}", headers=KEY).json()["definition"] == changed
    assert fake.schema_errors == []


def test_tools_errors(fake, client):
    body = {"name": "gateway-transfer", "definition": TRANSFER_DEFINITION}
    assert client.post("/api/tools", json=body).status_code == 401
    assert client.put(f"/api/tools/{uuid.uuid4()}", json=body, headers=KEY).status_code == 404
    assert client.post("/api/tools", json=body, headers=KEY).status_code == 201
    assert client.post("/api/tools", json=body, headers=KEY).status_code == 400  # name taken
    assert fake.schema_errors == []
    assert len(fake.tools) == 1


@pytest.mark.parametrize(
    "definition, expected",
    [
        ({**TRANSFER_DEFINITION, "timeout": "ten seconds"}, "definition/timeout"),
        ({**TRANSFER_DEFINITION, "httpp": {}}, "httpp"),
        ({**TRANSFER_DEFINITION, "modelToolName": "transfer to operator"}, "modelToolName"),
        ({k: v for k, v in TRANSFER_DEFINITION.items() if k != "http"}, "exactly one implementation"),
        ({**TRANSFER_DEFINITION, "http": {"baseUrlPattern": "https://x.test"}}, "httpMethod"),
        ({**TRANSFER_DEFINITION, "dynamicParameters": [{"nam": "x"}]}, "nam"),
    ],
)
def test_tool_definition_is_validated_strictly(fake, client, definition, expected):
    response = client.post("/api/tools", json={"name": "t", "definition": definition}, headers=KEY)

    assert response.status_code == 400
    assert fake.schema_errors and expected in fake.schema_errors[0]
    assert fake.tools == {}


def test_a_gateway_process_without_a_port_binds_its_own_and_says_which(tmp_path):
    """`gateway serve --port 0`, the port read from uvicorn's line (text or JSON): none is picked
    free here and closed for another process to take before the gateway binds it."""
    import json

    from gateway.testing.processes import GatewayProcess

    process = GatewayProcess(tmp_path / "gateway.toml", {}, work_dir=tmp_path, name="portless")
    assert process.command[process.command.index("--port") + 1] == "0"
    with pytest.raises(RuntimeError, match="wait_ready first"):
        _ = process.url
    process.stderr_path.write_text("INFO uvicorn.error: Uvicorn running on http://127.0.0.1:43210 (Press CTRL+C to quit)\n")
    assert process.url == "http://127.0.0.1:43210"
    as_json = GatewayProcess(tmp_path / "gateway.toml", {}, work_dir=tmp_path, name="json")
    as_json.stderr_path.write_text(json.dumps({"message": "Uvicorn running on http://127.0.0.1:43211 (Press CTRL+C to quit)"}))
    assert as_json.port == 43211
    assert GatewayProcess(tmp_path / "gateway.toml", {}, work_dir=tmp_path, name="fixed", port=8123).url.endswith(":8123")
    quiet = GatewayProcess(tmp_path / "gateway.toml", {}, work_dir=tmp_path, name="quiet", extra_args=["--log-level", "warning"])
    assert quiet.port > 0 and quiet.command[quiet.command.index("--port") + 1] == str(quiet.port)  # it would not say
