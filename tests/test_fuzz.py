"""Fuzzing, bounded to a few seconds: the dialer API as its own OpenAPI document describes it
(schemathesis), and each carrier's webhook reader and verifier with random forms (hypothesis).
Zero 500s, and nothing but the carrier's own refusal from its parser."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import numbers
from gateway.api import openapi_document
from gateway.carriers import CARRIERS
from gateway.carriers.base import QUERY, RequestRejected, Webhook
from gateway.settings import load_settings
from gateway.testing import double
from gateway.webhooks import form_fields

from .conftest import API_KEY, PUBLIC_URL, SUPPORT_NUMBER

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Bounded for the suite (each API example is a request to the running gateway: ~15 ms); a deeper
# run: GATEWAY_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py.
EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "8"))
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
# The parsers run in-process (~0.1 ms an example): many more forms for the same time.
PARSER_BOUNDED = settings(BOUNDED, max_examples=EXAMPLES * 25)


# --- the OpenAPI document says what the API takes ------------------------------------------------------


def test_the_openapi_document_names_from_and_gives_e164_patterns():
    document = openapi_document()
    text = str(document)
    assert "from_" not in text
    schemas = document["components"]["schemas"]
    assert "from" in schemas["DialRequest"]["properties"] and "from" in schemas["Call"]["required"]
    for schema in (schemas["DialRequest"]["properties"]["to"], schemas["DialRequest"]["properties"]["from"],
                   schemas["CampaignRow"]["properties"]["to"]):
        assert schema["pattern"] == numbers.E164_PATTERN


# --- schemathesis against the running gateway ----------------------------------------------------------


def test_the_api_answers_schema_generated_requests_without_a_500(gateway):
    # schemathesis' strategies driven by hypothesis here: its pytest plugin does not run on this pytest.
    # Imported here, not when the suite is collected: every xdist worker collects every module.
    import schemathesis

    schema = schemathesis.openapi.from_dict(openapi_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    for operation in operations:
        @BOUNDED
        @given(case=operation.as_strategy())
        def answers(case):
            response = case.call(base_url=gateway.server.url, headers=AUTH)
            assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body,
                                                response.text[:300])

        answers()


# --- each carrier's webhook reader and verifier with random forms --------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=40)
_forms = st.dictionaries(st.sampled_from(["CallSid", "CallUUID", "call_sid", "From", "To", "CallStatus", "Duration",
                                          "CallDuration", "AnsweredBy", "Machine", "Digits", "DialCallStatus"]) | _text,
                         _text, max_size=8)


@pytest.mark.parametrize("carrier", list(CARRIERS))
@PARSER_BOUNDED
@given(form=_forms, tamper=st.booleans())
def test_a_carriers_parsers_refuse_random_forms_with_their_own_refusal_only(carrier, form, tamper):
    settings_ = load_settings(environ=double(carrier).environ("http://127.0.0.1:9"))
    instance = CARRIERS[carrier](settings_)
    base = double(carrier).inbound_form(to=SUPPORT_NUMBER)
    fields = {**base, **form}
    url = f"{PUBLIC_URL}/{carrier}/inbound"
    request = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", fields, body=None, signed=not tamper)
    try:
        raw = request.query if request.method == "GET" else request.body
        params = form_fields(raw if isinstance(raw, (bytes, str)) else b"", instance.webhook_max_fields)
    except RequestRejected:
        return
    webhook = Webhook(url=url + (f"?{request.query}" if request.query else ""), method=request.method,
                      headers=request.headers, body=request.body if request.method != "GET" else b"", params=params,
                      client="127.0.0.1", format=QUERY if request.method == "GET" else instance.formats(callback=False)[0])
    for step in (lambda: instance.verify(webhook), lambda: instance.parse_inbound(webhook),
                 lambda: instance.check_call_id(webhook), lambda: instance.parse_status(webhook),
                 lambda: instance.parse_machine_verdict(webhook)):
        try:
            step()
        except RequestRejected:
            pass
