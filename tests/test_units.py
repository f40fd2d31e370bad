"""Unit tests of the pieces with rules of their own: Retry-After, retries, request bodies, config."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from gateway.cli import main as cli_main
from gateway.carriers import CARRIERS
from gateway.flows.call_request import CallBodies, CallIdentity, duration, template_context
from gateway.settings import ConfigError, RouteSettings, UltravoxSettings, load_settings
from gateway.urls import Urls
from gateway.testing import validate_ultravox_request
from gateway.http import request_never_sent, retry_after_seconds
from gateway.ultravox import CallRequest, UltravoxClient, UltravoxError, create_http_client

AGENT = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= retry_after_seconds(in_ten) <= 10.5
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert retry_after_seconds(past) == 0.0


def test_durations_are_protobuf_text():
    assert duration(600) == "600s"
    assert duration(90.5) == "90.5s"
    assert duration(0.25) == "0.25s"


def test_template_context_nests_dotted_names_and_skips_missing_parameters():
    mapping = {"caller.number": "From", "caller.city": "FromCity", "line": "To", "absent": "Nope"}
    params = {"From": "+15551230001", "FromCity": "Paris", "To": "+15550001111"}
    assert template_context(mapping, params) == {
        "caller": {"number": "+15551230001", "city": "Paris"},
        "line": "+15550001111",
    }


@pytest.mark.parametrize("carrier_name", list(CARRIERS))
def test_outbound_style_request_lets_the_user_speak_first_and_validates(carrier_name):
    settings = load_settings(None, {})
    carrier = CARRIERS[carrier_name](settings)
    bodies = CallBodies(settings, Urls(settings))

    def outbound(route):
        return bodies.for_route(
            route, carrier=carrier, identity=CallIdentity(carrier.name, None, "call-1", "api"),
            medium=carrier.ultravox_medium(), webhook_params={}, agent_speaks_first=False,
        )

    inline = outbound(RouteSettings(number="*", call={"systemPrompt": "Hi"}, metadata={"campaign": "spring"}))
    assert inline.body["firstSpeakerSettings"] == {"user": {}}
    assert inline.body["metadata"] == {"campaign": "spring", "gateway.carrier": carrier.name,
                                       "gateway.call_id": "call-1", "gateway.route": "api"}
    assert validate_ultravox_request(inline.body, agent=False) == []
    # An agent route without a greeting keeps the agent's own first-speaker settings.
    agent = outbound(RouteSettings(number="*", agent_id=AGENT))
    assert "firstSpeakerSettings" not in agent.body
    assert validate_ultravox_request(agent.body, agent=True) == []


def test_route_settings_refuse_what_ultravox_would_refuse():
    with pytest.raises(ValueError, match="reserved prefix"):
        RouteSettings(number="*", agent_id=AGENT, metadata={"ultravox.x": "1"})
    with pytest.raises(ValueError, match="must not set medium"):
        RouteSettings(number="*", call={"medium": {"twilio": {}}})
    with pytest.raises(ValueError, match="both a value and a group"):
        RouteSettings(number="*", agent_id=AGENT, template_context={"caller": "From", "caller.city": "FromCity"})
    assert RouteSettings(number="*", agent_id=AGENT, metadata={"tier": 2}).metadata == {"tier": "2"}


def test_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[gateway]\npublic_url = "https://file.example"\n[ultravox]\nbase_url = "https://file.example"\n')
    settings = load_settings(path, {"GATEWAY_PUBLIC_URL": "https://env.example/", "ULTRAVOX_API_KEY": "k"})
    assert settings.public_url == "https://env.example"
    assert settings.ultravox.base_url == "https://file.example"
    assert settings.ultravox.api_key == "k"


def test_config_errors_are_sentences(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[gateway]\nverify = false\n[[routes]]\nnumber = "555"\nagent_id = "nope"\n[telnyx]\npublic_key = "abc"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(path, {})
    text = "\n".join(error.value.problems)
    assert "gateway.verify: is not a known setting" in text
    assert "routes[0] (number 555).number: must be an E.164 number" in text
    assert "agent's UUID" in text
    assert "telnyx.public_key" in text
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, {})


def test_gateway_check_reports_problems_and_exit_code(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(f'[[routes]]\nnumber = "+15550001111"\nagent_id = "{AGENT}"\n')
    assert cli_main(["check", "--config", str(good)]) == 0
    assert "Configuration is valid: 1 route(s)." in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routes]]\nnumber = "+15550001111"\n')
    assert cli_main(["check", str(bad)]) == 2
    assert "set exactly one of agent_id" in capsys.readouterr().err


def test_example_config_is_valid():
    settings = load_settings("config/gateway.example.toml", {})
    assert {r.name for r in settings.routes} == {"support", "reception"}


# --- Ultravox client retries, with an in-process transport -----------------------------------------


def client_with(handler, **settings) -> UltravoxClient:
    config = UltravoxSettings(api_key="k", base_url="https://ultravox.test", **settings)
    return UltravoxClient(create_http_client(config, transport=httpx.MockTransport(handler)), config)


CREATED = {"callId": "c1", "joinUrl": "wss://x/calls/c1/telephony"}


def test_connection_errors_are_retried_with_backoff():
    attempts = []

    def handler(request):
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise httpx.ConnectError("refused")
        return httpx.Response(201, json=CREATED)

    created = asyncio.run(client_with(handler).create_call(CallRequest(None, {}), deadline=time.monotonic() + 5))
    assert created.join_url == CREATED["joinUrl"]
    assert len(attempts) == 3
    assert attempts[2] - attempts[1] > attempts[1] - attempts[0] > 0.15  # doubling backoff


def test_read_timeouts_are_not_retried_because_the_call_may_exist():
    attempts = []

    def handler(request):
        attempts.append(1)
        raise httpx.ReadTimeout("slow")

    with pytest.raises(UltravoxError, match="ReadTimeout"):
        asyncio.run(client_with(handler).create_call(CallRequest(None, {}), deadline=time.monotonic() + 5))
    assert len(attempts) == 1


def test_attempts_are_capped():
    attempts = []

    def handler(request):
        attempts.append(1)
        return httpx.Response(503, headers={"Retry-After": "0"})

    with pytest.raises(UltravoxError, match="503"):
        asyncio.run(client_with(handler, max_attempts=3).create_call(CallRequest(None, {}), deadline=time.monotonic() + 5))
    assert len(attempts) == 3


def test_agent_calls_go_to_the_agent_path_with_the_api_key():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(201, json=CREATED)

    asyncio.run(client_with(handler).create_call(CallRequest(AGENT, {"a": 1}), deadline=time.monotonic() + 5))
    assert seen[0].url.path == f"/api/agents/{AGENT}/calls"
    assert seen[0].headers["x-api-key"] == "k"


def test_no_api_key_fails_without_a_request():
    config = UltravoxSettings(api_key=None)
    client = UltravoxClient(httpx.AsyncClient(transport=httpx.MockTransport(lambda r: 1 / 0)), config)
    with pytest.raises(UltravoxError, match="ULTRAVOX_API_KEY"):
        asyncio.run(client.create_call(CallRequest(None, {}), deadline=time.monotonic() + 5))


def test_only_errors_before_sending_count_as_never_sent():
    import aiohttp

    def mapped(httpx_error, aiohttp_error):
        try:
            raise httpx_error("x") from aiohttp_error
        except httpx.HTTPError as error:
            return error

    refused = aiohttp.ClientConnectorError(None, OSError(111, "refused"))
    assert request_never_sent(mapped(httpx.ConnectTimeout, refused))
    # httpx_aiohttp reports a disconnect after sending as ConnectTimeout too: the call may exist.
    assert not request_never_sent(mapped(httpx.ConnectTimeout, aiohttp.ServerDisconnectedError()))
    assert request_never_sent(httpx.ConnectError("refused"))
    assert request_never_sent(httpx.PoolTimeout("pool full"))
    assert not request_never_sent(httpx.ReadTimeout("slow"))
    assert not request_never_sent(httpx.RemoteProtocolError("disconnected"))
