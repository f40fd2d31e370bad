"""What operators watch: the live gauges on /metrics and the X-Request-Id of every request."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import load_settings
from gateway.testing import CarrierStream, double

from .conftest import (
    AGENT_ID,
    API_KEY,
    BASE_CONFIG,
    CARRIER_NAMES,
    TOOL_SECRET,
    TRANSFER_CARRIERS,
    Gateway,
    gateway_environ,
    new_postgres_database,
)
from .test_bridge import bridged, local, wait_until  # noqa: F401 (bridged is a fixture)
from .test_logs import ServeProcess
from .test_transfer import LiveCall, live  # noqa: F401 (live is a fixture)


def samples(gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of metric `name` on /metrics, by their sorted labels."""
    response = gateway.client.get("/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def live_calls(gateway, carrier: str, mode: str) -> float | None:
    return samples(gateway, "gateway_live_calls").get((("carrier", carrier), ("mode", mode)))


def live_transfers(gateway, kind: str) -> float | None:
    return samples(gateway, "gateway_live_transfers").get((("kind", kind),))


# --- live calls, transfers and draining ------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_bridged_call_is_live_until_its_stream_ends(bridged, carrier):  # noqa: F811
    call = bridged(carrier)
    gateway = call.gateway
    assert live_calls(gateway, carrier, "bridge") == 1  # answered; the carrier is about to open the stream

    async def while_streaming():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await asyncio.to_thread(call.ultravox.wait_for_session)
            counts = await asyncio.to_thread(lambda: (live_calls(gateway, carrier, "bridge"),
                                                      live_calls(gateway, carrier, "direct")))
            await stream.stop()
            return counts

    assert asyncio.run(while_streaming()) == (1, 0)
    assert wait_until(lambda: call.record().status == "completed")
    assert set(samples(gateway, "gateway_live_calls").values()) == {0}


def test_direct_calls_count_until_ultravox_says_they_ended(gateway, fake_ultravox):
    from .test_outbound import ultravox_event

    carrier = CARRIER_NAMES[0]
    assert live_calls(gateway, carrier, "direct") == 0
    response = gateway.post(carrier, double(carrier).inbound_form(to="+15550001111"))
    assert response.status_code == 200
    assert live_calls(gateway, carrier, "direct") == 1
    ultravox_call = fake_ultravox.created_calls[-1]
    assert ultravox_event(gateway, "call.ended", {**ultravox_call, "endReason": "hangup"}).status_code == 204
    assert live_calls(gateway, carrier, "direct") == 0


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_warm_transfer_under_way_is_a_live_transfer(live, carrier):  # noqa: F811
    call: LiveCall = live(carrier)
    assert (live_transfers(call.gateway, "warm"), live_transfers(call.gateway, "cold")) == (0, 0)
    assert call.tool("sales", warm=True).status_code == 200
    (url,) = call.redirects()
    call.fetch(url)  # the caller on hold
    (leg,) = call.operator_legs()
    assert (live_transfers(call.gateway, "warm"), live_transfers(call.gateway, "cold")) == (1, 0)
    _, accept_url = call.briefing(leg)
    call.press(leg, accept_url, "1")  # the operator takes the caller: the transfer is done
    assert call.view()["transfers"][0]["status"] == "connected"
    assert live_transfers(call.gateway, "warm") == 0
    assert live_calls(call.gateway, carrier, "direct") == 1  # the phone call goes on, with the operator


def test_draining_shows_while_a_sigterm_lets_a_bridged_call_finish(tmp_path, fake_ultravox):
    carrier = CARRIER_NAMES[0]
    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG + f"""
[[routes]]
number = "+15550005555"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
""")
    environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'gateway.db'}")
    process = ServeProcess(config, environ, tmp_path, "--log-level", "info")
    gateway = Gateway(server=process, settings=load_settings(config, environ))
    try:
        form = double(carrier).inbound_form(to="+15550005555")
        answer = gateway.post(carrier, form).text
        stream_url, _ = double(carrier).connected_url(answer)
        assert samples(gateway, "gateway_draining") == {(): 0}

        async def call_through_the_drain():
            headers = double(carrier).stream_headers(stream_url)
            async with CarrierStream(carrier, local(gateway, stream_url), headers=headers,
                                     parameters=double(carrier).stream_parameters(answer)) as stream:
                await stream.start(call_id=form[double(carrier).call_id_param])
                await asyncio.to_thread(fake_ultravox.wait_for_session)
                process.terminate()
                # The call goes on; the process says it is draining, and is not ready.
                draining = await asyncio.to_thread(
                    wait_until, lambda: samples(gateway, "gateway_draining") == {(): 1})
                ready = (await asyncio.to_thread(gateway.client.get, "/readyz")).status_code
                live = await asyncio.to_thread(live_calls, gateway, carrier, "bridge")
                await stream.stop()
                return draining, ready, live

        assert asyncio.run(call_through_the_drain()) == (True, 503, 1)
        assert process.wait(30) == 0  # drained: the call ended, the process exits
    finally:
        gateway.close()


@pytest.fixture
def own_postgres_database():
    """A PostgreSQL database of this test's own, which it may take down."""
    with new_postgres_database("gateway_outage") as database:
        yield database


def test_metrics_answer_without_the_live_gauges_while_the_store_is_down(make_gateway, own_postgres_database):
    url, name, admin = own_postgres_database
    gateway = make_gateway(database_url=url)
    carrier = CARRIER_NAMES[0]
    assert gateway.post(carrier, double(carrier).inbound_form(to="+15550001111")).status_code == 200
    assert live_calls(gateway, carrier, "direct") == 1
    # The database refuses connections and drops those open.
    asyncio.run(admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
                      f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
    assert samples(gateway, "gateway_live_calls") == {}
    assert samples(gateway, "gateway_live_transfers") == {}
    assert samples(gateway, "gateway_draining") == {(): 0}  # the rest is there
    asyncio.run(admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    assert live_calls(gateway, carrier, "direct") == 1


# --- request ids -------------------------------------------------------------------------------------


def test_every_request_gets_a_request_id(gateway, fake_ultravox):
    carrier = CARRIER_NAMES[0]
    answered = gateway.post(carrier, double(carrier).inbound_form(to="+15550001111"))
    refused = gateway.post(carrier, double(carrier).inbound_form(to="+15550001111"), sign=False)
    api = gateway.client.get("/v1/calls", headers={"Authorization": f"Bearer {API_KEY}"})
    unauthorized = gateway.client.get("/v1/calls")
    tool = gateway.client.post("/tools/transfer", json={}, headers={"X-Gateway-Tool-Secret": TOOL_SECRET + "x"})
    missing = gateway.client.get("/no/such/route")
    responses = [answered, refused, api, unauthorized, tool, missing]
    assert [r.status_code for r in responses] == [200, double(carrier).unauthenticated_status, 200, 401, 403, 404]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(len(i) == 16 for i in ids)


@pytest.mark.parametrize("incoming, kept", [
    ("req-42.abc_DEF", True),
    ("a" * 64, True),
    ("a" * 65, False),  # too long
    ("two words", False),
    ("<script>", False),
    ("", False),
])
def test_an_incoming_request_id_is_kept_if_it_is_a_short_token(gateway, incoming, kept):
    response = gateway.client.get("/healthz", headers={"X-Request-Id": incoming})
    assert response.status_code == 200
    assert (response.headers["x-request-id"] == incoming) is kept
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
