"""Errors that say how to fix them: refused signatures in the log, `gateway check` in one pass,
`gateway serve` without tracebacks, `gateway simulate` saying why it cannot play a route."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.carriers import CARRIERS
from gateway.cli import main as cli_main
from gateway.media.simulate import SimulationError, simulate_call
from gateway.testing import double, shipped_wav

from .conftest import CARRIER_NAMES, INLINE_NUMBER, PUBLIC_URL, UNREACHABLE, URL_SIGNING_CARRIERS

GATEWAY = str(Path(sys.executable).parent / "gateway")
BRIDGED_NUMBER = "+15550009999"
BRIDGED_ROUTE = f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
mode = "bridge"
[routes.call]
systemPrompt = "You are a receptionist."
"""


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]


# --- refused signatures: the response stays terse, the log says what to fix ---------------------------


@pytest.mark.parametrize("carrier", URL_SIGNING_CARRIERS)
def test_a_signature_for_another_url_logs_the_url_checked_and_the_setting(gateway, caplog, carrier):
    caplog.set_level(logging.WARNING, logger="gateway")
    tunnel = "https://abc123.tunnel.example"  # what the carrier was told to call, unlike public_url
    response = gateway.post(carrier, double(carrier).inbound_form(to=INLINE_NUMBER), public_url=tunnel)
    assert response.status_code == double(carrier).unauthenticated_status
    assert PUBLIC_URL not in response.text and "GATEWAY_PUBLIC_URL" not in response.text  # terse
    assert len(response.text) < 80
    (line,) = refusals(caplog)
    assert f"checked against {PUBLIC_URL}/{carrier}/inbound" in line
    assert "GATEWAY_PUBLIC_URL" in line and "public_url" in line and "Most likely cause" in line
    assert not gateway.records()


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_webhook_from_another_account_logs_the_credential_to_check(gateway, caplog, carrier):
    caplog.set_level(logging.WARNING, logger="gateway")
    other = double(carrier).for_session()  # same carrier, other credentials
    request = other.inbound_request(PUBLIC_URL, f"/{carrier}/inbound", other.inbound_form(to=INLINE_NUMBER))
    url = f"/{carrier}/inbound" + (f"?{request.query}" if request.query else "")
    response = gateway.client.request(request.method, url, content=request.body, headers=request.headers)
    assert response.status_code == double(carrier).unauthenticated_status
    (line,) = refusals(caplog)
    settings_carrier = CARRIERS[carrier](gateway.settings)
    for variable in settings_carrier.variables(settings_carrier.verification_keys):
        assert variable in line
    assert "Most likely cause" in line and len(line) > len(response.text) + 40
    assert not gateway.records()


def test_a_flood_of_refused_webhooks_logs_one_line_and_counts_each(gateway, caplog):
    """Issue 14: each forged request cost a warning line (about a sixth of its refusal)."""
    caplog.set_level(logging.WARNING, logger="gateway")
    for _ in range(20):
        response = gateway.post("twilio", double("twilio").inbound_form(to=INLINE_NUMBER),
                                public_url="https://forged.example")
        assert response.status_code == 403
    (line,) = refusals(caplog)
    assert "checked against" in line  # the first line says everything
    metrics = gateway.client.get("/metrics").text
    assert 'gateway_inbound_webhooks_total{carrier="twilio",outcome="http_403"} 20.0' in metrics
    assert not gateway.records()


# --- gateway check: every problem at once, in plain words ----------------------------------------------


def test_check_reports_every_problem_in_one_pass(tmp_path, capsys, monkeypatch):
    config = tmp_path / "gateway.toml"
    config.write_text("""
[gateway]
database_url = "mysql://root:hunter2@db.example/gateway"
publc_url = "https://gateway.example.com"
port = "eighty"

[ultravx]
api_key = "k"

[operators.sales]
number = "+15557770001"
description = "Sales"

[[routes]]
number = "+15550001111"
agent_id = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
operators = ["sale"]
mode = "bridged"
""")
    monkeypatch.setenv("ULTRAVOX_BASE_URL", "ftp://api.ultravox.example")
    assert cli_main(["check", str(config)]) == 2
    problems = [line.removeprefix("  - ") for line in capsys.readouterr().err.splitlines()[1:]]
    text = "\n".join(problems)
    assert any(p.startswith("gateway.database_url: must be sqlite:///PATH or postgresql://") for p in problems), text
    assert "got a mysql:// URL" in text and "hunter2" not in text  # the scheme only: the URL holds a password
    assert "ultravox.base_url: must be an absolute http(s) URL" in text and "(set by ULTRAVOX_BASE_URL)" in text
    assert "gateway.publc_url: is not a known setting; did you mean 'public_url'?" in text
    assert "ultravx: is not a known setting; did you mean 'ultravox'?" in text
    assert "gateway.port: must be a whole number, got 'eighty'" in text
    assert "mode: must be one of 'direct' or 'bridge', got 'bridged'" in text
    assert "names operators that are not configured: sale (did you mean 'sales'?)" in text
    assert len(problems) == 7
    assert "Input should" not in text and "Extra inputs" not in text and "Value error" not in text


def test_check_refuses_base_urls_that_are_not_http(tmp_path, capsys, monkeypatch):
    config = tmp_path / "gateway.toml"
    first = next(iter(CARRIERS))
    config.write_text(f'[{first}]\napi_base_url = "api.example.com"\n')
    assert cli_main(["check", str(config)]) == 2
    assert f"{first}.api_base_url: must be an absolute http(s) URL" in capsys.readouterr().err


# --- gateway serve: a clear line and exit 2, never a traceback ------------------------------------------


@pytest.mark.parametrize("environ, expected", [
    ({"GATEWAY_DATABASE_URL": "mysql://root:hunter2@db.example/gateway"}, "got a mysql:// URL"),
    ({"ULTRAVOX_BASE_URL": "ftp://api.ultravox.example"}, "ultravox.base_url: must be an absolute http(s) URL"),
    ({"GATEWAY_DATABASE_URL": "sqlite:////nonexistent-dir/gateway.db"}, "the directory /nonexistent-dir does not exist"),
    ({"GATEWAY_DATABASE_URL": f"postgresql://postgres:hunter2@{UNREACHABLE.removeprefix('http://')}/gateway"},
     "connection refused. Check GATEWAY_DATABASE_URL"),
])
def test_serve_says_what_is_wrong_without_a_traceback(tmp_path, environ, expected):
    import os

    clean = {name: value for name, value in os.environ.items() if not name.startswith(("GATEWAY_", "ULTRAVOX_"))}
    served = subprocess.run([GATEWAY, "serve", "--port", "0"], cwd=tmp_path, env={**clean, **environ},
                            capture_output=True, text=True, timeout=60, check=False)
    assert served.returncode == 2
    assert expected in served.stderr
    assert "Traceback" not in served.stderr and "hunter2" not in served.stderr
    assert len(served.stderr.strip().splitlines()) == 1, served.stderr


# --- gateway simulate: why a route cannot be played -----------------------------------------------------


def simulate(gateway, to: str) -> str:
    with pytest.raises(SimulationError) as error:
        asyncio.run(simulate_call(gateway.settings, carrier=CARRIER_NAMES[0], to=to, from_="+15551230001",
                                  input_path=str(shipped_wav("caller")), output_path="unused.wav",
                                  gateway_url=gateway.server.url, tail_seconds=0))
    return str(error.value)


def test_simulate_says_a_route_is_not_bridged(gateway):
    why = simulate(gateway, INLINE_NUMBER)
    assert "is in direct mode" in why and 'mode = "bridge"' in why
    assert "no route for +15559990000" in simulate(gateway, "+15559990000")
    assert not gateway.records()  # said before anything was sent


def test_simulate_says_the_gateway_has_no_ultravox_key(make_gateway):
    gateway = make_gateway(BRIDGED_ROUTE, ULTRAVOX_API_KEY="")
    why = simulate(gateway, BRIDGED_NUMBER)
    assert "no Ultravox API key" in why and "ULTRAVOX_API_KEY" in why


def test_simulate_says_ultravox_cannot_be_reached(make_gateway):
    gateway = make_gateway(BRIDGED_ROUTE, ULTRAVOX_BASE_URL=UNREACHABLE)
    why = simulate(gateway, BRIDGED_NUMBER)
    assert "could not create the Ultravox call (cannot reach Ultravox" in why
    assert f"from here, cannot reach {UNREACHABLE} (connection refused)" in why


def test_simulate_says_the_gateway_refused_its_signature(make_gateway):
    gateway = make_gateway(BRIDGED_ROUTE)
    other = gateway.settings.model_copy(update={"public_url": "https://elsewhere.example"})
    gateway.settings = other
    why = simulate(gateway, BRIDGED_NUMBER)
    assert "refused" in why and "https://elsewhere.example" in why
