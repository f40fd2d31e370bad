"""Inbound calls end to end: real gateway, fake Ultravox, webhooks signed as each carrier signs them."""

from __future__ import annotations

import concurrent.futures
import time
from urllib.parse import urlencode

import httpx
import pytest

from gateway.testing import (
    Declined,
    FakeResponse,
    SharedKeySigning,
    TelnyxSigner,
    double,
    plivo_v3_headers,
    twilio_signature,
)

from .conftest import (
    AGENT_ID,
    API_KEY,
    BASE_CONFIG,
    CARRIER_NAMES,
    FORM_SIGNING_CARRIERS,
    INLINE_NUMBER,
    PUBLIC_URL,
    SUPPORT_NUMBER,
    UNREACHABLE,
    URL_SIGNING_CARRIERS,
    gateway_environ,
)

APOLOGY = Declined("Sorry, our assistant is unavailable.", None)


def form_for(carrier: str, **kwargs) -> dict[str, str]:
    kwargs.setdefault("to", SUPPORT_NUMBER)
    return double(carrier).inbound_form(**kwargs)


def stream_of(carrier: str, answer: str) -> tuple[str, dict[str, str]]:
    """The join URL the answer connects to, and the stream's other attributes."""
    return double(carrier).connected_url(answer)


# --- happy paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_each_carrier_connects_the_call_to_the_join_url(gateway, fake_ultravox, carrier):
    carrier_double = double(carrier)
    form = form_for(carrier, FromCity="SPRINGFIELD")
    response = gateway.post(carrier, form)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] in carrier_double.answer_media_types
    join_url, attributes = stream_of(carrier, response.text)
    assert attributes == carrier_double.stream_attributes  # what the carrier's stream needs besides the URL
    (request,) = fake_ultravox.requests
    assert request.agent_id == AGENT_ID
    assert "&" in join_url  # the fake's join URLs carry a query: the XML must escape it
    assert request.body["medium"] == {carrier: {}}
    assert request.body["firstSpeakerSettings"] == {"agent": {"text": "Hello, thanks for calling."}}
    assert request.body["maxDuration"] == "600s"
    assert request.body["recordingEnabled"] is True
    metadata = request.body["metadata"]
    assert metadata["gateway.carrier"] == carrier
    assert metadata["gateway.carrier_call_id"] == form[carrier_double.call_id_param]
    assert metadata["team"] == "support"
    assert request.body["templateContext"] == {"caller": {"number": "+15551230001", "city": "SPRINGFIELD"}}

    (record,) = gateway.records()
    assert record.status == "in-progress"
    assert record.join_url == join_url
    assert record.carrier_call_id == form[carrier_double.call_id_param]
    assert (record.from_number, record.to_number) == ("+15551230001", SUPPORT_NUMBER)
    assert metadata["gateway.call_id"] == record.id
    assert record.ultravox_call_id and record.route == "support"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_inline_route_creates_a_call_with_the_configured_prompt(gateway, fake_ultravox, carrier):
    response = gateway.post(carrier, form_for(carrier, to=INLINE_NUMBER))

    assert response.status_code == 200
    stream_of(carrier, response.text)
    (request,) = fake_ultravox.requests
    assert request.path == "/api/calls" and request.agent_id is None
    assert request.body["systemPrompt"] == "You are a helpful receptionist."
    assert request.body["voice"] == "Mark"
    assert request.body["medium"] == {carrier: {}}
    assert "firstSpeakerSettings" not in request.body  # no greeting of its own: the call's settings apply
    assert "templateContext" not in request.body


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_withheld_caller_id_is_still_connected(gateway, fake_ultravox, carrier):
    response = gateway.post(carrier, form_for(carrier, from_=""))
    stream_of(carrier, response.text)
    (record,) = gateway.records()
    assert record.from_number == "" and record.status == "in-progress"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_default_route_catches_other_numbers(make_gateway, fake_ultravox, carrier):
    gateway = make_gateway(f'\n[[routes]]\nnumber = "*"\nname = "main"\nagent_id = "{AGENT_ID}"\n')
    response = gateway.post(carrier, form_for(carrier, to="+15559990000"))
    stream_of(carrier, response.text)
    assert fake_ultravox.requests[0].body["metadata"]["gateway.route"] == "main"


# --- signatures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_missing_signature_is_refused_and_changes_nothing(gateway, fake_ultravox, carrier):
    response = gateway.post(carrier, form_for(carrier), sign=False)
    assert response.status_code == double(carrier).unauthenticated_status
    assert fake_ultravox.requests == []
    assert gateway.records() == []


@pytest.mark.parametrize("carrier", FORM_SIGNING_CARRIERS)
def test_body_changed_after_signing_is_refused(gateway, fake_ultravox, carrier):
    form = form_for(carrier)
    # Signed for the original form, sent with another caller number.
    signed = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", form)
    response = gateway.post(carrier, dict(form, From="+19005550000"), sign=False, headers=signed.headers)
    assert response.status_code == double(carrier).unauthenticated_status
    assert fake_ultravox.requests == [] and gateway.records() == []


def test_twilio_signature_with_another_token_is_refused(gateway, fake_ultravox):
    form = form_for("twilio")
    forged = twilio_signature("not-the-auth-token", PUBLIC_URL + "/twilio/inbound", form)
    response = gateway.post("twilio", form, sign=False, headers={"X-Twilio-Signature": forged})
    assert response.status_code == 403
    assert fake_ultravox.requests == []


SHARED_KEY = "twilio-webhooks-shared-key-secret"


@pytest.mark.parametrize("algorithm", ["HMAC_SHA256", "HMAC_SHA1"])
def test_twilio_webhooks_signed_with_a_shared_key_are_checked_with_it_and_the_algorithm_named(
        make_gateway, fake_ultravox, fake_carriers, algorithm):
    """A Webhook Rule's SharedKey signs instead of the auth token, with the algorithm its settings
    header names; webhooks without that header are still checked with the auth token."""
    gateway = make_gateway(TWILIO_WEBHOOK_SHARED_KEY=SHARED_KEY)
    url = PUBLIC_URL + "/twilio/inbound"

    def post(headers):
        return gateway.post("twilio", form, sign=False, headers=headers)

    signing = SharedKeySigning(SHARED_KEY, algorithm)
    form = form_for("twilio")
    assert post(signing.headers(url, form)).status_code == 200
    assert double("twilio").connected_url(post(signing.headers(url, form)).text)
    # The same header with the auth token's signature, or the other algorithm's, or one unknown: refused.
    other = "HMAC_SHA1" if algorithm == "HMAC_SHA256" else "HMAC_SHA256"
    settings = signing.headers(url, form)["X-Twilio-Webhooks-Signature-Settings"]
    for forged in (
        {"X-Twilio-Signature": twilio_signature(double("twilio").auth_token, url, form, algorithm)},
        {"X-Twilio-Signature": twilio_signature(SHARED_KEY, url, form, other)},
        {**SharedKeySigning(SHARED_KEY, "HMAC_SHA1").headers(url, form),
         "X-Twilio-Webhooks-Signature-Settings": settings.replace(algorithm, "HMAC_MD5")},
    ):
        assert post({"X-Twilio-Webhooks-Signature-Settings": settings, **forged}).status_code == 403
    assert gateway.post("twilio", form_for("twilio")).status_code == 200  # the auth token's, no header

    # The callbacks of a call the gateway placed, signed by the same rule.
    twilio = fake_carriers["twilio"]
    twilio.shared_key = signing
    dialled = gateway.client.post("/v1/calls", json={"to": "+15557654321", "route": "support", "carrier": "twilio"},
                                  headers={"Authorization": f"Bearer {API_KEY}"})
    (placed,) = twilio.calls
    assert double("twilio").pick_up(twilio, placed).stream_url
    assert twilio.send_status(placed, "completed").status_code == 204
    view = gateway.client.get(f"/v1/calls/{dialled.json()['id']}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert view.json()["status"] == "completed"


def test_a_shared_key_signature_is_refused_while_no_shared_key_is_configured(gateway, fake_ultravox, caplog):
    form = form_for("twilio")
    headers = SharedKeySigning(double("twilio").auth_token).headers(PUBLIC_URL + "/twilio/inbound", form)
    response = gateway.post("twilio", form, sign=False, headers=headers)
    assert response.status_code == 403 and "TWILIO_WEBHOOK_SHARED_KEY is not configured" in response.text
    assert fake_ultravox.requests == []


def test_twilio_signature_over_the_wrong_scheme_is_refused(gateway, fake_ultravox):
    response = gateway.post("twilio", form_for("twilio"), public_url="http://gateway.example.test")
    assert response.status_code == 403


def test_telnyx_stale_timestamp_is_refused(gateway, fake_ultravox):
    form = form_for("telnyx")
    raw = urlencode(form).encode()
    stale = double("telnyx").signer.headers(raw, timestamp=int(time.time()) - 301)
    response = gateway.post("telnyx", form, sign=False, headers=stale, body=raw)
    assert response.status_code == 403
    assert "window" in response.text
    assert fake_ultravox.requests == []


def test_telnyx_signature_from_another_key_is_refused(gateway, fake_ultravox):
    form = form_for("telnyx")
    raw = urlencode(form).encode()
    response = gateway.post("telnyx", form, sign=False, headers=TelnyxSigner.generate().headers(raw), body=raw)
    assert response.status_code == 403
    assert fake_ultravox.requests == []


def test_plivo_accepts_one_valid_signature_among_several(gateway, fake_ultravox):
    form = form_for("plivo")
    headers = plivo_v3_headers(double("plivo").auth_token, PUBLIC_URL + "/plivo/inbound", form, nonce="n0nce")
    headers["X-Plivo-Signature-V3"] = "c29tZXRoaW5nIGVsc2U=," + headers["X-Plivo-Signature-V3"]
    assert gateway.post("plivo", form, sign=False, headers=headers).status_code == 200

    forged = plivo_v3_headers("wrong-token", PUBLIC_URL + "/plivo/inbound", form, nonce="n0nce")
    assert gateway.post("plivo", form_for("plivo"), sign=False, headers=forged).status_code == 403
    assert len(fake_ultravox.requests) == 1


@pytest.mark.parametrize("carrier", URL_SIGNING_CARRIERS)
def test_proxy_style_public_url_with_port_path_and_query(make_gateway, fake_ultravox, carrier):
    public = "https://voice.example.test:8443/gw"
    gateway = make_gateway(GATEWAY_PUBLIC_URL=public)
    response = gateway.post(carrier, form_for(carrier), query="tenant=acme&line=2")
    assert response.status_code == 200, response.text
    stream_of(carrier, response.text)
    # Signed without the path prefix the proxy adds: not what the carrier requested.
    response = gateway.post(carrier, form_for(carrier), query="tenant=acme&line=2", public_url="https://voice.example.test:8443")
    assert response.status_code == double(carrier).unauthenticated_status


def test_verification_can_be_switched_off_for_local_development(make_gateway, fake_ultravox):
    gateway = make_gateway("\n", config=None)  # baseline: refused
    assert gateway.post("twilio", form_for("twilio"), sign=False).status_code == 403
    insecure = make_gateway(
        config=BASE_CONFIG.replace("[gateway]\n", "[gateway]\ninsecure_skip_signature_verification = true\n")
    )
    response = insecure.post("twilio", form_for("twilio"), sign=False)
    assert response.status_code == 200
    stream_of("twilio", response.text)


# --- carrier retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_retried_webhook_gets_the_same_join_url(gateway, fake_ultravox, carrier):
    form = form_for(carrier)
    first = stream_of(carrier, gateway.post(carrier, form).text)[0]
    second = stream_of(carrier, gateway.post(carrier, form).text)[0]
    assert first == second
    assert fake_ultravox.calls_created == 1
    assert len(gateway.records()) == 1


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_concurrent_deliveries_create_one_ultravox_call(gateway, fake_ultravox, carrier):
    fake_ultravox.delay = 0.3
    form = form_for(carrier)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: gateway.post(carrier, form), range(6)))
    urls = {stream_of(carrier, r.text)[0] for r in responses}
    assert len(urls) == 1
    assert fake_ultravox.calls_created == 1


def test_deliveries_racing_on_two_replicas_create_one_ultravox_call(make_gateway, fake_ultravox, tmp_path):
    """Two gateway processes sharing one database: the store, not process memory, decides."""
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    replicas = [make_gateway(database_url=database_url), make_gateway(database_url=database_url)]
    fake_ultravox.delay = 0.3
    form = form_for("twilio")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: replicas[i % 2].post("twilio", form), range(4)))
    urls = {stream_of("twilio", r.text)[0] for r in responses}
    assert len(urls) == 1
    assert fake_ultravox.calls_created == 1


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_retry_after_a_failed_attempt_tries_again(gateway, fake_ultravox, carrier):
    fake_ultravox.script(FakeResponse(status=500))
    form = form_for(carrier)
    assert double(carrier).declined(gateway.post(carrier, form).text) == APOLOGY
    (record,) = gateway.records()
    assert record.status == "failed" and "500" in record.failure_reason

    stream_of(carrier, gateway.post(carrier, form).text)
    (record,) = gateway.records()
    assert record.status == "in-progress" and record.attempts == 2


# --- Ultravox trouble ------------------------------------------------------------------------------


def test_429_with_retry_after_is_retried_after_the_wait(gateway, fake_ultravox):
    fake_ultravox.script(FakeResponse(status=429, retry_after="0.4"))
    response = gateway.post("twilio", form_for("twilio"))
    stream_of("twilio", response.text)
    first, second = fake_ultravox.requests
    assert second.received_at - first.received_at >= 0.4
    assert fake_ultravox.calls_created == 1


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_503_with_retry_after_is_retried(gateway, fake_ultravox, carrier):
    fake_ultravox.script(FakeResponse(status=503, retry_after="0"), FakeResponse(status=503, retry_after="0"))
    stream_of(carrier, gateway.post(carrier, form_for(carrier)).text)
    assert len(fake_ultravox.requests) == 3


def test_retry_after_beyond_the_deadline_gives_the_apology_at_once(gateway, fake_ultravox):
    fake_ultravox.script(FakeResponse(status=429, retry_after="30"))
    started = time.monotonic()
    response = gateway.post("twilio", form_for("twilio"))
    assert time.monotonic() - started < 1.0  # no point waiting: 30 s is past the 2 s deadline
    assert double("twilio").declined(response.text) == APOLOGY
    assert len(fake_ultravox.requests) == 1
    (record,) = gateway.records()
    assert record.status == "failed" and "429" in record.failure_reason


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_hanging_ultravox_gets_the_apology_inside_the_deadline(gateway, fake_ultravox, carrier):
    fake_ultravox.script(FakeResponse(hang=True))
    started = time.monotonic()
    response = gateway.post(carrier, form_for(carrier))
    elapsed = time.monotonic() - started
    assert response.status_code == double(carrier).declined_status
    assert double(carrier).declined(response.text) == APOLOGY
    assert elapsed < gateway.settings.ultravox.inbound_deadline_seconds + 0.5
    (record,) = gateway.records()
    # Not left `creating`: a carrier retry must get a fresh attempt, not wait on a dead one.
    assert record.status == "failed" and "in time" in record.failure_reason


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_unreachable_ultravox_is_retried_then_apologised_for(make_gateway, fake_ultravox, carrier):

    # Port 9 (discard), which nothing here listens on: a port picked free and closed again could be
    # taken by another worker's server before the gateway tries it.
    gateway = make_gateway(ULTRAVOX_BASE_URL=UNREACHABLE)
    started = time.monotonic()
    response = gateway.post(carrier, form_for(carrier))
    assert time.monotonic() - started < gateway.settings.ultravox.inbound_deadline_seconds + 0.5
    assert double(carrier).declined(response.text) == APOLOGY
    (record,) = gateway.records()
    assert record.status == "failed" and "cannot reach Ultravox" in record.failure_reason


@pytest.mark.parametrize(
    "scripted, reason",
    [
        (FakeResponse(status=400, body={"detail": "bad request"}), "400"),
        (FakeResponse(status=402, body={"detail": "out of credits"}), "402"),
        (FakeResponse(status=500), "500"),
        (FakeResponse(omit_join_url=True), "joinUrl"),
    ],
)
def test_ultravox_errors_give_the_apology(gateway, fake_ultravox, scripted, reason):
    fake_ultravox.script(scripted)
    response = gateway.post("twilio", form_for("twilio"))
    assert response.status_code == 200
    assert double("twilio").declined(response.text) == APOLOGY
    (record,) = gateway.records()
    assert record.status == "failed" and reason in record.failure_reason
    assert len(fake_ultravox.requests) == 1  # errors that are not "try later" are not retried


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_apology_can_dial_a_fallback_number(make_gateway, fake_ultravox, carrier):
    gateway = make_gateway(config=_config_with_fallback_dial())
    fake_ultravox.script(FakeResponse(status=500))
    answer = gateway.post(carrier, form_for(carrier)).text
    assert double(carrier).declined(answer) == APOLOGY._replace(dials="+15557770000")


def _config_with_fallback_dial() -> str:
    return BASE_CONFIG.replace('[fallback]\n', '[fallback]\ndial_number = "+15557770000"\n')


# --- routing and malformed input -------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_unknown_number_without_default_route_is_politely_rejected(gateway, fake_ultravox, carrier):
    response = gateway.post(carrier, form_for(carrier, to="+15559990000"))
    assert response.status_code == double(carrier).declined_status
    assert double(carrier).declined(response.text) == Declined("This number is not in service.", None)
    assert fake_ultravox.requests == []
    (record,) = gateway.records()
    assert record.status == "rejected" and record.route is None


def test_wrong_content_type_is_415(gateway, fake_ultravox):
    response = gateway.post("twilio", {}, body=b'{"CallSid": "CA1"}', headers={"content-type": "application/json"})
    assert response.status_code == 415


def test_oversized_body_is_413(gateway, fake_ultravox):
    form = form_for("twilio", Padding="x" * 10_000)
    assert gateway.post("twilio", form).status_code == 413
    assert gateway.records() == []


def test_body_that_is_not_a_form_is_400(gateway, fake_ultravox):
    assert gateway.post("twilio", {}, body=b"\xff\xfe\x00garbage").status_code == 400
    assert gateway.post("twilio", {}, body=b"CallSid").status_code in (400, 403)


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_signed_webhook_without_call_id_is_400(gateway, fake_ultravox, carrier):
    call_id_param = double(carrier).call_id_param
    form = form_for(carrier)
    del form[call_id_param]
    response = gateway.post(carrier, form)
    assert response.status_code == 400
    assert call_id_param in response.text
    assert fake_ultravox.requests == [] and gateway.records() == []


def test_get_is_not_allowed(gateway):
    assert gateway.client.get("/twilio/inbound").status_code == 405


# --- health ----------------------------------------------------------------------------------------


def test_health_and_readiness(gateway):
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    assert gateway.client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_without_routes(make_gateway):
    gateway = make_gateway(config="")
    response = gateway.client.get("/readyz")
    assert response.status_code == 503
    assert "no routes configured" in response.json()["problems"]


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_metrics_count_outcomes(gateway, fake_ultravox, carrier):
    gateway.post(carrier, form_for(carrier))
    gateway.post(carrier, form_for(carrier), sign=False)
    text = gateway.client.get("/metrics").text
    refused = f"http_{double(carrier).unauthenticated_status}"
    assert f'gateway_inbound_webhooks_total{{carrier="{carrier}",outcome="connected"}} 1.0' in text
    assert f'gateway_inbound_webhooks_total{{carrier="{carrier}",outcome="{refused}"}} 1.0' in text


# --- PostgreSQL ------------------------------------------------------------------------------------


def test_replicas_on_postgresql_answer_retries_with_one_ultravox_call(make_gateway, fake_ultravox, postgres_database_url):
    replicas = [make_gateway(database_url=postgres_database_url) for _ in range(2)]
    fake_ultravox.delay = 0.3
    form = form_for("telnyx")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: replicas[i % 2].post("telnyx", form), range(4)))
    assert len({stream_of("telnyx", r.text)[0] for r in responses}) == 1
    assert fake_ultravox.calls_created == 1
    records = [r for r in replicas[0].records() if r.carrier_call_id == form["CallSid"]]
    assert len(records) == 1 and records[0].status == "in-progress"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_store_outage_still_connects_the_caller(gateway, fake_ultravox, carrier):
    async def unavailable(**kwargs):
        raise ConnectionError("database is down")

    gateway.server.app.state.gateway.store.claim_inbound = unavailable
    form = form_for(carrier)
    response = gateway.post(carrier, form)
    stream_of(carrier, response.text)
    lookup, request = fake_ultravox.requests  # was a call made unrecorded elsewhere? no: one is made
    assert lookup.method == "GET"
    assert lookup.query["metadata.gateway.carrier_call_id"] == form[double(carrier).call_id_param]
    assert "gateway.call_id" not in request.body["metadata"]  # nothing was recorded to point at


# --- the real command ------------------------------------------------------------------------------


def test_gateway_serve_command_answers_a_signed_webhook(tmp_path, fake_ultravox):
    from gateway.testing.processes import GatewayProcess

    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG)
    environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'cli.db'}")
    # `gateway serve --port 0`: the port it bound is read from its log (none picked free here first).
    with GatewayProcess(config, environ, work_dir=tmp_path, name="serve") as process:
        process.start().wait_ready()
        request = double("twilio").inbound_request(PUBLIC_URL, "/twilio/inbound", form_for("twilio"))
        response = httpx.post(process.url + "/twilio/inbound", content=request.body, headers=request.headers)
        assert response.status_code == 200
        stream_of("twilio", response.text)
