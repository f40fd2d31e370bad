"""`gateway serve` sends events from a delivery process of its own ([events] delivery_process)."""

from __future__ import annotations

import json
import os
import re
import signal

import httpx
import pytest

from gateway.delivery_process import DeliveryReport
from gateway.metrics import Metrics
from gateway.testing import GatewayProcess, double

from .conftest import BASE_CONFIG, PUBLIC_URL, SUPPORT_NUMBER, gateway_environ
from .test_events import _wait, receiver, webhooks_config  # noqa: F401  (receiver: a fixture)

STARTED = re.compile(r"delivery process (\d+) started")
DELIVERING = re.compile(r"delivering events to crm")
# A delivery process imports the gateway before its first delivery: seconds on a busy machine.
STARTUP = 30.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def delivery_pids(gateway: GatewayProcess) -> list[int]:
    """The delivery processes the server started, in order (from its log)."""
    return [int(pid) for pid in STARTED.findall(gateway.stderr_text())]


def call_in(gateway: GatewayProcess, carrier: str = "twilio") -> str:
    form = double(carrier).inbound_form(to=SUPPORT_NUMBER)
    request = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", form)
    url = f"{gateway.url}/{carrier}/inbound" + (f"?{request.query}" if request.query else "")
    assert httpx.request(request.method, url, content=request.body, headers=request.headers).status_code == 200
    return form[double(carrier).call_id_param]


@pytest.fixture
def serve(tmp_path, fake_ultravox, fake_carriers, receiver):  # noqa: F811
    config = tmp_path / "events.toml"
    config.write_text(BASE_CONFIG + webhooks_config(("crm", receiver)))
    environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'gateway.db'}", fake_carriers)
    started: list[GatewayProcess] = []

    def start(name: str = "gateway", *extra_args: str) -> GatewayProcess:
        gateway = GatewayProcess(config, environ, work_dir=tmp_path, name=name,
                                 extra_args=("--log-level", "info", *extra_args)).start().wait_ready()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close(grace_seconds=20)


def test_the_delivery_process_sends_counts_in_metrics_and_is_restarted_when_it_dies(serve, receiver):  # noqa: F811
    gateway = serve("gateway", "--log-format", "json")
    (first,) = _wait(lambda: delivery_pids(gateway), timeout=STARTUP)
    assert alive(first) and first != gateway.pid
    # It logs as the server does (here JSON, as the server was told on its command line).
    line = json.loads(_wait(lambda: next((line for line in gateway.stderr_text().splitlines()
                                          if DELIVERING.search(line)), None), timeout=STARTUP))
    assert (line["logger"], line["pid"]) == ("gateway.deliveries", first)
    call_in(gateway)
    receiver.wait_for(lambda r: len(r.order) >= 2, timeout=STARTUP)
    assert [receiver.events[id].type for id in receiver.order] == ["call.started", "call.status_changed"]
    # Its attempts, counted in the server's /metrics (relayed about once a second).
    _wait(lambda: gateway.metric("gateway_event_deliveries_total", endpoint="crm", result="delivered") == 2,
          timeout=STARTUP)
    assert gateway.metric("gateway_event_delivery_lag_seconds_count", endpoint="crm") == 2

    os.kill(first, signal.SIGKILL)
    (_, second) = _wait(lambda: delivery_pids(gateway)[:2] if len(delivery_pids(gateway)) >= 2 else None,
                        timeout=STARTUP)
    assert alive(second) and not alive(first)
    call_in(gateway, "telnyx")
    receiver.wait_for(lambda r: len(r.order) >= 4, timeout=STARTUP)
    assert receiver.repeats == 0

    gateway.terminate()  # a drain, then the delivery process is stopped, then the server exits 0
    assert gateway.wait(30) == 0
    assert not alive(second)


def test_a_server_killed_outright_takes_its_delivery_process_along(serve):
    gateway = serve()
    (pid,) = _wait(lambda: delivery_pids(gateway), timeout=STARTUP)
    gateway.kill()
    gateway.wait(10)
    _wait(lambda: not alive(pid), timeout=20)  # PR_SET_PDEATHSIG: SIGTERM, and it stops as on any


def test_a_report_counts_into_metrics_as_the_attempts_would_have():
    report, direct = DeliveryReport(), Metrics(["twilio"])
    for metrics in (report, direct):
        metrics.delivery_counted("crm", "delivered")
        metrics.delivery_counted("crm", "delivered")
        metrics.delivery_counted("crm", "retrying")
        metrics.delivery_lag_seen("crm", 0.3)
    relayed = Metrics(["twilio"])
    report.count_into(relayed)
    for name, labels in (("gateway_event_deliveries_total", {"endpoint": "crm", "result": "delivered"}),
                         ("gateway_event_deliveries_total", {"endpoint": "crm", "result": "retrying"}),
                         ("gateway_event_delivery_lag_seconds_sum", {"endpoint": "crm"})):
        assert relayed.registry.get_sample_value(name, labels) == direct.registry.get_sample_value(name, labels)
    assert not DeliveryReport() and report
