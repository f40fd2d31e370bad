"""Callback URLs the gateway hands out are good for one carrier and one route only: a captured one
replayed on another carrier's path, or against another route, is refused (Telnyx signs only its
body and Exotel nothing, so the URL's token must carry the difference)."""

from __future__ import annotations

import itertools

import pytest

from gateway.carriers import CARRIERS
from gateway.testing import double

from .conftest import CARRIER_NAMES
from .test_outbound import call_of, dial

CARRIER_PAIRS = [pair for pair in itertools.permutations(CARRIER_NAMES, 2)]


def _placed(gateway, fake_carriers, carrier):
    response = dial(gateway, carrier=carrier)
    assert response.status_code == 201, response.text
    (placed,) = fake_carriers[carrier].calls
    return response.json(), placed


@pytest.mark.parametrize("issued_for, replayed_on", CARRIER_PAIRS)
def test_a_status_url_replayed_on_another_carriers_path_is_refused(gateway, fake_carriers, issued_for, replayed_on):
    call, placed = _placed(gateway, fake_carriers, issued_for)
    path_and_query = placed.status_url.split("/status", 1)[1]
    other = double(replayed_on)
    form = {**fake_carriers[replayed_on].form_for("someone"), **other.status_fields("completed", 1)}
    response = gateway.post(replayed_on, form, path=f"/{replayed_on}/status", query=path_and_query.lstrip("?"))
    assert response.status_code in (401, 403)
    assert call_of(gateway, call["id"])["status"] != "completed"


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_status_url_does_not_open_the_answer_route(gateway, fake_carriers, fake_ultravox, carrier):
    call, placed = _placed(gateway, fake_carriers, carrier)
    created = len(fake_ultravox.requests)
    query = placed.status_url.split("?", 1)[1]
    answer_path = f"{gateway.settings.public_url}/{carrier}/outbound/answer?{query}"
    response = fake_carriers[carrier].callback(answer_path, fake_carriers[carrier].form_for(placed.call_id))
    assert response.status_code in (401, 403)
    assert len(fake_ultravox.requests) == created  # no agent created, no join URL handed out
    assert "wss://" not in response.text


@pytest.mark.parametrize("carrier", [name for name, c in CARRIERS.items() if not c.can_transfer])
def test_carriers_that_cannot_transfer_serve_no_transfer_step(gateway, carrier):
    for method in ("GET", "POST"):
        response = gateway.client.request(method, f"/{carrier}/transfer/accept?transfer=x&t=y&leg=0&Digits=1")
        assert response.status_code == 404


@pytest.mark.parametrize("carrier", [name for name, c in CARRIERS.items() if c.callback_formats
                                     and all(f.method != "GET" for f in c.callback_formats)])
def test_callbacks_of_carriers_that_post_them_refuse_a_get(gateway, fake_carriers, carrier):
    call, placed = _placed(gateway, fake_carriers, carrier)
    path = placed.status_url.replace(gateway.settings.public_url, "")
    for url in (f"{path}&Status=completed", f"/{carrier}/status?Status=completed&CallSid={placed.call_id}"):
        assert gateway.client.get(url, headers=double(carrier).sign(url, {}, b"")).status_code == 405
    assert call_of(gateway, call["id"])["status"] == "queued"
