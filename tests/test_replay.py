"""Replays of signed webhooks (issue 14, item 5), and calls made unrecorded while the store is
out (item 3): a repeat gets exactly the first answer, never a fresh media token or Ultravox call."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from gateway.security import media_token
from gateway.store import CallStore
from gateway.store.calls import utcnow
from gateway.testing import double

from .conftest import SUPPORT_NUMBER
from .test_bridge import BRIDGED_NUMBER, _refused, bridged, local  # noqa: F401 (bridged: a fixture)

REMEMBERING = ["plivo", "telnyx"]  # carriers that sign a one-time part (nonce, timestamp)


def send_twice(gateway, carrier: str, form: dict[str, str], *, pause: float = 0.0):
    """The same signed request, byte for byte, twice: a replay of a captured webhook."""
    request = double(carrier).inbound_request(gateway.settings.public_url, f"/{carrier}/inbound", form)
    url = f"/{carrier}/inbound" + (f"?{request.query}" if request.query else "")
    first = gateway.client.request(request.method, url, content=request.body, headers=request.headers)
    time.sleep(pause)
    again = gateway.client.request(request.method, url, content=request.body, headers=request.headers)
    return first, again


@pytest.mark.parametrize("carrier", REMEMBERING)
def test_a_replayed_signed_webhook_gets_exactly_the_first_answer(bridged, fake_ultravox, carrier):  # noqa: F811
    call = bridged(carrier)  # one call connected already: the gateway is warm
    form = double(carrier).inbound_form(to=BRIDGED_NUMBER)
    # A second apart: a fresh answer would carry a media token with another expiry.
    first, replay = send_twice(call.gateway, carrier, form, pause=1.1)
    assert first.status_code == replay.status_code == 200
    assert replay.text == first.text
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert fake_ultravox.calls_created == 2  # the warm-up call and this one, not a third


@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "plivo"])
def test_every_delivery_of_one_bridged_call_carries_its_one_media_token(bridged, carrier):  # noqa: F811
    """A carrier re-sending the webhook, or (Twilio signs nothing one-time) a replay of it, gets
    the token the first answer gave: its socket opens once, so no second socket reaches the call."""
    call = bridged(carrier)
    time.sleep(1.1)
    again = call.gateway.post(carrier, call.form)  # signed anew: not a byte-for-byte replay
    stream_url, _ = call.double.connected_url(again.text)
    assert stream_url == call.public_stream_url
    assert call.double.stream_parameters(again.text) == call.parameters


def test_a_second_socket_for_a_live_call_is_refused_and_the_live_call_goes_on(bridged, fake_carriers):  # noqa: F811
    call = bridged("plivo")
    api_key = call.gateway.settings.ultravox.api_key
    record = call.record()
    other_token = media_token(api_key, "plivo", record.id, int(time.time()) + 30)  # valid, never used
    second = local(call.gateway, call.public_stream_url).split("?")[0] + f"?call={record.id}&token={other_token}"

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            refused = await asyncio.to_thread(_refused, second)
            await stream.play(b"\x00\x10" * 1600)
            heard = await asyncio.to_thread(session.wait_for_audio, 1)
            return refused, heard

    refused, heard = asyncio.run(scenario())
    assert refused == 403
    assert heard  # the live call still relays
    assert not [u for u in fake_carriers["plivo"].updates if u.call_id == call.carrier_call_id]  # nobody hung it up


def test_the_replay_memory_is_shared_and_pruned(database_url):
    from gateway.store.calls import StoredAnswer

    async def scenario():
        store = CallStore.open(database_url)
        await store.migrate()
        try:
            keep = dt.timedelta(minutes=5)
            firsts = await asyncio.gather(*(store.remember_delivery("plivo", "k1", keep_for=keep) for _ in range(5)))
            assert sum(r.first for r in firsts) == 1 and all(r.answer is None for r in firsts)
            await store.remember_answer("plivo", "k1", StoredAnswer(200, "application/xml", "<Response/>"))
            again = await store.remember_delivery("plivo", "k1", keep_for=keep)
            assert not again.first and again.answer == StoredAnswer(200, "application/xml", "<Response/>")
            assert (await store.remember_delivery("telnyx", "k1", keep_for=keep)).first  # per carrier
            assert await store.forget_deliveries(before=utcnow()) == 0
            assert await store.forget_deliveries(before=utcnow() + dt.timedelta(minutes=6)) == 2
            assert (await store.remember_delivery("plivo", "k1", keep_for=keep)).first
        finally:
            await store.close()

    asyncio.run(scenario())


# --- item 3: the store out, the caller connected unrecorded, once per carrier call ------------------


@pytest.mark.parametrize("carrier", ["twilio"])
def test_deliveries_of_one_call_during_a_store_outage_create_one_ultravox_call(make_gateway, fake_ultravox, carrier):
    gateway = make_gateway()
    store = gateway.server.app.state.gateway.store
    form = double(carrier).inbound_form(to=SUPPORT_NUMBER)

    async def broken(*args, **kwargs):
        raise OSError("the store is down")

    store.claim_inbound = broken  # every claim fails: connected unrecorded
    answers = [gateway.post(carrier, form) for _ in range(5)]
    assert all(a.status_code == 200 for a in answers)
    assert len({a.text for a in answers}) == 1
    assert fake_ultravox.calls_created == 1


def test_a_bridged_call_adopted_after_a_crash_keeps_one_media_token_for_every_retry(bridged, fake_ultravox):  # noqa: F811
    """Issue 14 items 5 and 7: a record a dead process left `creating` (its Ultravox call made) is
    adopted by the carrier's retry, once Ultravox can say it has the call (until then, the apology and
    no second call); the retries after it carry the adopted call's one token."""
    import sqlalchemy as sa

    call = bridged("twilio")
    record = call.record()
    left = utcnow() - dt.timedelta(minutes=5)

    async def as_a_dead_process_left_it():
        store = CallStore.open(call.gateway.settings.database_url)
        try:
            await store.database.transaction(lambda connection: connection.execute(
                sa.text("UPDATE calls SET status = 'creating', status_rank = 0, join_url = NULL, "
                        "ultravox_call_id = NULL, stream_expires = NULL, lease_owner = 'dead', "
                        "lease_until = :left WHERE id = :id"), {"left": left, "id": record.id}))
        finally:
            await store.close()

    asyncio.run(as_a_dead_process_left_it())
    fake_ultravox.list_status = 503  # Ultravox cannot say whether the call exists: nothing is made
    unsure = call.gateway.post("twilio", call.form)
    assert unsure.status_code == 200
    assert call.double.spoken(unsure.text) == [call.gateway.settings.fallback.message]  # the apology
    assert call.record().status == "creating" and fake_ultravox.calls_created == 1
    fake_ultravox.list_status = None
    answers = []
    for _ in range(2):
        time.sleep(1.1)  # a fresh token would carry another expiry
        retry = call.gateway.post("twilio", call.form)
        assert retry.status_code == 200
        answers.append((call.double.connected_url(retry.text)[0], call.double.stream_parameters(retry.text)))
    assert answers[0] == answers[1]
    assert fake_ultravox.calls_created == 1  # adopted, not made again
    adopted = call.record()
    assert adopted.status == "in-progress" and adopted.stream_expires is not None


def test_deliveries_to_two_replicas_during_a_store_outage_create_one_ultravox_call(make_gateway, fake_ultravox):
    """Issue 14 item 3: the carrier retries on another replica while the store is out; that replica
    finds the call made unrecorded for it at Ultravox (by its carrier call id) and joins it."""
    replicas = [make_gateway(), make_gateway()]

    async def broken(*args, **kwargs):
        raise OSError("the store is down")

    for replica in replicas:
        replica.server.app.state.gateway.store.claim_inbound = broken
    form = double("twilio").inbound_form(to=SUPPORT_NUMBER)
    other = double("twilio").inbound_form(to=SUPPORT_NUMBER)  # another caller, on the second replica
    answers = [replicas[0].post("twilio", form), replicas[1].post("twilio", form), replicas[1].post("twilio", other)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].text == answers[1].text
    assert fake_ultravox.calls_created == 2  # one per carrier call
    fake_ultravox.list_status = 503  # Ultravox cannot say: a call is still made, never silence
    third = double("twilio").inbound_form(to=SUPPORT_NUMBER)
    assert double("twilio").spoken(replicas[0].post("twilio", third).text) == []
    assert fake_ultravox.calls_created == 3
