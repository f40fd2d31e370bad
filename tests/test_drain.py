"""SIGTERM on the real `gateway serve`: bridged calls go on, the process leaves the load balancer and
exits 0 when they end; calls still live at the drain deadline are handed over to another replica."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.testing import CarrierStream, double
from gateway.testing.processes import GatewayProcess

from .conftest import AGENT_ID, BASE_CONFIG, PUBLIC_URL, TRANSFER_CARRIERS, gateway_environ

BRIDGED_NUMBER = "+15550005555"
ROUTE = f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
"""


def tone(rate: int, seconds: float) -> bytes:
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


class Replica:
    """One `gateway serve` process, reached on its own port."""

    def __init__(self, process: GatewayProcess):
        self.process = process

    @classmethod
    def start(cls, tmp_path, name, fake_ultravox, fake_carriers, database_url, drain_seconds=60, *extra_args):
        config = tmp_path / f"{name}.toml"
        config.write_text(BASE_CONFIG.replace("[gateway]\n", f"[gateway]\ndrain_seconds = {drain_seconds}\n", 1) + ROUTE)
        environ = gateway_environ(fake_ultravox, database_url, fake_carriers)
        return cls(GatewayProcess(config, environ, work_dir=tmp_path, name=name,
                                  extra_args=[*extra_args, "--log-level", "info"]).start())

    def ready(self) -> "Replica":
        self.process.wait_ready()
        return self

    @property
    def url(self) -> str:
        return self.process.url

    def local(self, public_stream_url: str) -> str:
        return public_stream_url.replace(PUBLIC_URL.replace("https", "wss"), self.url.replace("http", "ws"))

    def webhook(self, carrier: str, form: dict[str, str]) -> httpx.Response:
        request = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", form)
        url = f"{self.url}/{carrier}/inbound" + (f"?{request.query}" if request.query else "")
        return httpx.request(request.method, url, content=request.body, headers=request.headers, timeout=10)

    def readiness(self) -> int:
        return httpx.get(self.url + "/readyz", timeout=5).status_code


@pytest.fixture
def start_replica(tmp_path, fake_ultravox, fake_carriers):
    """Start a `Replica` (name, database URL, drain seconds, extra `gateway serve` arguments); every
    one still running is stopped after the test, so none works on the next test's database."""
    started: list[Replica] = []

    def start(name, database_url, drain_seconds=60, *extra_args) -> Replica:
        replica = Replica.start(tmp_path, name, fake_ultravox, fake_carriers, database_url, drain_seconds, *extra_args)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.process.close()


def answered_stream(replica: Replica, carrier: str) -> tuple[str, str, str]:
    """An inbound bridged call answered by `replica`: (carrier call id, public stream URL, answer)."""
    form = double(carrier).inbound_form(to=BRIDGED_NUMBER)
    response = replica.webhook(carrier, form)
    assert response.status_code == 200, response.text
    url, _ = double(carrier).connected_url(response.text)
    return form[double(carrier).call_id_param], url, response.text


def open_stream(replica: Replica, carrier: str, answer: str) -> CarrierStream:
    """The carrier opening the stream `answer` connects to, on `replica`."""
    public_url, _ = double(carrier).connected_url(answer)
    return CarrierStream(carrier, replica.local(public_url), headers=double(carrier).stream_headers(public_url),
                         parameters=double(carrier).stream_parameters(answer))


async def echoed(stream: CarrierStream, audio: bytes, timeout: float = 5.0) -> None:
    """Play `audio`; the fake agent echoes it: wait until its echo has come back."""
    before = len(stream.agent_audio())
    await stream.play(audio)
    deadline = time.monotonic() + timeout
    while len(stream.agent_audio()) - before < len(audio) // 2:
        assert time.monotonic() < deadline, "the agent's audio stopped"
        await asyncio.sleep(0.02)


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_sigterm_lets_a_bridged_call_go_on_and_exits_0_when_it_ends(tmp_path, start_replica):
    carrier = "twilio"
    replica = start_replica("a", f"sqlite:///{tmp_path / 'g.db'}").ready()
    call_id, _, answer = answered_stream(replica, carrier)

    async def scenario():
        async with open_stream(replica, carrier, answer) as stream:
            await stream.start(call_id=call_id)
            await echoed(stream, tone(stream.rate, 0.4))
            replica.process.terminate()
            await until(lambda: replica.readiness() == 503, "/readyz to fail")
            # Still served while draining: what the load balancer had already routed here.
            assert answered_stream(replica, carrier)[2]
            await echoed(stream, tone(stream.rate, 0.6))  # both ways, after the SIGTERM
            assert replica.process.running
            await stream.stop()
            assert stream.close_code in (None, 1000)

    asyncio.run(scenario())
    assert replica.process.wait(15) == 0
    assert "1012" not in replica.process.stderr_text()


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_call_live_at_the_deadline_is_handed_over_to_another_replica(start_replica, fake_ultravox, fake_carriers,
                                                                       postgres_database_url, carrier):
    # Two replicas on one database: A drains (1 s), B takes over its call.
    a = start_replica("a", postgres_database_url, 1)
    b = start_replica("b", postgres_database_url)
    a.ready(), b.ready()
    fake = fake_carriers[carrier]
    fake.deliver_to = b.url  # the load balancer's choice once A is not ready
    call_id, _, first_answer = answered_stream(a, carrier)
    fake.live_calls.add(call_id)
    first_agent = fake_ultravox.created_calls[-1]["callId"]

    async def scenario():
        old = open_stream(a, carrier, first_answer)
        await old.connect()
        await old.start(call_id=call_id)
        await echoed(old, tone(old.rate, 0.4))
        a.process.terminate()
        await until(lambda: any(u.call_id == call_id for u in fake.updates), "the carrier to be asked to move the call")
        (update,) = [u for u in fake.updates if u.call_id == call_id]
        assert fake_ultravox.requests[-1].query["priorCallId"] == first_agent
        # The carrier fetches the new instructions (on B), ends the old stream, opens the new one.
        answer = fake.callback(double(carrier).redirect_url(update), fake.form_for(call_id))
        assert answer.status_code == 200, answer.text
        await old.stop()
        await old.close()
        async with open_stream(b, carrier, answer.text) as new:
            await new.start(call_id=call_id)
            await echoed(new, tone(new.rate, 0.6))
            await new.stop()

    asyncio.run(scenario())
    assert a.process.wait(20) == 0
    assert fake_ultravox.created_calls[-1]["callId"] != first_agent
    assert not [u for u in fake.updates if u.call_id == call_id and "hangup" in str(u).lower()]


def test_two_workers_serve_one_port_and_restart_a_killed_one(tmp_path, start_replica, fake_ultravox):
    import os
    import re
    import signal

    replica = start_replica("workers", f"sqlite:///{tmp_path / 'w.db'}", 60, "--workers", "2").ready()
    process = replica.process

    def started() -> set[str]:
        return set(re.findall(r"Started server process \[(\d+)\]", process.stderr_text()))

    try:
        deadline = time.monotonic() + 20
        while len(started()) < 2:
            assert time.monotonic() < deadline, process.stderr_text()
            time.sleep(0.1)
        calls = [answered_stream(replica, "telnyx")[0] for _ in range(12)]
        assert len({c["callId"] for c in fake_ultravox.created_calls}) == len(calls)
        # A worker killed outright is replaced; the port keeps answering meanwhile.
        os.kill(int(sorted(started())[0]), signal.SIGKILL)
        while len(started()) < 3:
            assert time.monotonic() < deadline + 20, process.stderr_text()
            assert replica.readiness() == 200
            time.sleep(0.1)
    finally:
        process.terminate()
    assert process.wait(20) == 0
