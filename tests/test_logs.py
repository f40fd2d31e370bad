"""Log lines: JSON with the call's ids when asked for, and never a secret, from the real `gateway serve`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from gateway import logs
from gateway.carriers import CARRIERS
from gateway.settings import load_settings
from gateway.testing import CarrierStream, FakeResponse, double
from gateway.testing.processes import GatewayProcess

from .conftest import (
    AGENT_ID,
    API_KEY,
    BASE_CONFIG,
    CARRIER_NAMES,
    PUBLIC_URL,
    SUPPORT_NUMBER,
    TOOL_SECRET,
    TRANSFER_CARRIERS,
    Gateway,
    gateway_environ,
)
from .test_bridge import local, speech, wait_until
from .test_outbound import ultravox_event

BRIDGED_NUMBER = "+15550005555"
REQUIRED = ("time", "level", "logger", "message")
# Environment variables holding credentials, by their names (a carrier's variables included).
SECRET_VARIABLE = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|API_KEYS)$")


# --- the real `gateway serve`, as a process --------------------------------------------------------------


class ServeProcess(GatewayProcess):
    """The real `gateway serve` (gateway.testing's GatewayProcess), started, as conftest.Gateway drives it."""

    def __init__(self, config: Path, environ: dict[str, str], work_dir: Path, *args: str):
        super().__init__(config, environ, work_dir=work_dir, extra_args=args)
        self.start().wait_ready()

    def stop(self) -> None:
        self.close(grace_seconds=15)

    def output(self) -> tuple[str, str]:
        """(stderr, stdout), once stopped."""
        self.stop()
        return self.stderr_text(), self.stdout_text()


@pytest.fixture
def serve_json(tmp_path, fake_ultravox, fake_carriers):
    """The real `gateway serve --log-format json --log-level debug`, with a bridged route too."""
    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG + f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
""")
    environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'gateway.db'}", fake_carriers)
    process = ServeProcess(config, environ, tmp_path, "--log-format", "json", "--log-level", "debug")
    for fake in fake_carriers.values():
        fake.deliver_to = process.url
    gateway = Gateway(server=process, settings=load_settings(config, environ))
    yield gateway, environ, process
    gateway.close()


def secrets_of(environ: dict[str, str]) -> list[str]:
    """Every credential the gateway was given, found by the variables' names, not by the gateway."""
    values = []
    for name, value in environ.items():
        if SECRET_VARIABLE.search(name) and not name.endswith("PUBLIC_KEY") and value:
            values += [part for part in value.split(",") if part] if name == "GATEWAY_API_KEYS" else [value]
    return values


def query_value(url: str, name: str) -> str:
    (value,) = parse_qs(urlparse(url).query)[name]
    return value


# --- the end-to-end proof -------------------------------------------------------------------------------


def test_json_lines_carry_the_call_ids_and_no_secret_on_any_path(serve_json, fake_ultravox, fake_carriers):
    gateway, environ, process = serve_json
    credentials: list[str] = []  # per-call tokens the gateway handed out: as secret as the configured ones
    inbound: dict[str, httpx.Response] = {}

    # Signed inbound webhooks of every carrier: their ids must be on their lines.
    for carrier in CARRIER_NAMES:
        form = double(carrier).inbound_form(to=SUPPORT_NUMBER)
        response = gateway.post(carrier, form)
        assert response.status_code == 200, response.text
        inbound[form[double(carrier).call_id_param]] = response

    # Forged and unsigned webhooks, a wrong API key, a wrong tool secret, a forged Ultravox event.
    first = CARRIER_NAMES[0]
    for carrier in CARRIER_NAMES:
        forged = gateway.post(carrier, double(carrier).inbound_form(to=SUPPORT_NUMBER), sign=False)
        assert forged.status_code == double(carrier).unauthenticated_status
    assert gateway.client.post("/v1/calls", json={"to": "+15557654321", "route": "support"},
                               headers={"Authorization": "Bearer not-a-key-of-this-gateway"}).status_code == 401
    ultravox_call_id = fake_ultravox.created_calls[0]["callId"]
    wrong_tool = gateway.client.post("/tools/transfer", json={"callId": ultravox_call_id, "operator": "sales"},
                                     headers={"X-Gateway-Tool-Secret": "not-the-tool-secret"})
    assert wrong_tool.status_code == 403
    assert ultravox_event(gateway, "call.joined", fake_ultravox.created_calls[0], secret="forged").status_code == 403

    # A dial through the API: placed with the carrier, answered, completed.
    dialled = gateway.client.post("/v1/calls", json={"to": "+15557654321", "route": "support", "carrier": first},
                                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert dialled.status_code == 201, dialled.text
    (placed,) = fake_carriers[first].calls
    credentials += [query_value(placed.status_url, "t")] + ([query_value(placed.answer_url, "t")] if placed.answer_url else [])
    assert double(first).pick_up(fake_carriers[first], placed).answer.status_code == 200
    completed = fake_carriers[first].send_status(placed, "completed", **double(first).status_fields("completed", 7))
    assert completed.status_code in (200, 204)

    # A cold transfer the agent asks for, with the right secret: the carrier moves the call, the operator answers.
    if TRANSFER_CARRIERS:
        carrier = TRANSFER_CARRIERS[0]
        fake = fake_carriers[carrier]
        form = double(carrier).inbound_form(to=SUPPORT_NUMBER)
        fake.live_calls.add(form[double(carrier).call_id_param])
        assert gateway.post(carrier, form).status_code == 200
        tool = gateway.client.post("/tools/transfer", headers={"X-Gateway-Tool-Secret": TOOL_SECRET}, json={
            "callId": fake_ultravox.created_calls[-1]["callId"], "operator": "sales", "reason": "Wants a quote"})
        assert tool.status_code == 200, tool.text
        assert wait_until(lambda: fake.updates)
        redirect = double(carrier).redirect_url(fake.updates[-1])
        credentials.append(query_value(redirect, "t"))
        dial = double(carrier).dialled(fake.callback(redirect, fake.form_for(form[double(carrier).call_id_param])).text)
        credentials.append(query_value(dial.action, "t"))
        fake.callback(dial.action, fake.form_for(form[double(carrier).call_id_param],
                                                 **{double(carrier).dial_status_param: "completed"}))

    # Ultravox telling the gateway a call ended.
    assert ultravox_event(gateway, "call.ended", {**fake_ultravox.created_calls[0], "endReason": "hangup"}).status_code == 204

    # A bridged call: its media socket, with the single-use token in its URL (the server's line
    # about a socket whose URL takes no query, like Twilio's, cannot name the call: it is logged
    # before the start message says which call it is).
    streaming = next(name for name in CARRIER_NAMES if double(name).stream_url_takes_query)
    bridged = double(streaming)
    form = bridged.inbound_form(to=BRIDGED_NUMBER)
    answer = gateway.post(streaming, form)
    stream_url, _ = bridged.connected_url(answer.text)
    media_token = query_value(stream_url, "token")
    credentials.append(media_token)

    async def stream():
        async with CarrierStream(streaming, local(gateway, stream_url), headers=bridged.stream_headers(stream_url)) as s:
            await s.start(call_id=form[bridged.call_id_param])
            await s.play(speech(bridged.stream_rate, 0.2))
            await s.stop()

    asyncio.run(stream())
    assert wait_until(lambda: any(r.status == "completed" and r.route == "bridged" for r in gateway.records()))

    # Ultravox failing: the caller hears the apology.
    fake_ultravox.script(FakeResponse(status=500))
    failed = double(first).inbound_form(to=SUPPORT_NUMBER)
    assert double(first).declined(gateway.post(first, failed).text)

    stderr, stdout = process.output()
    assert stdout == ""
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON…
    assert len(lines) > 50
    for line in lines:  # …with the fields every line has
        assert isinstance(line, dict) and all(field in line for field in REQUIRED), line
        assert dt.datetime.fromisoformat(line["time"]).utcoffset() == dt.timedelta(0)
    levels = {line["level"] for line in lines}
    assert {"DEBUG", "INFO", "WARNING"} <= levels and levels <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}

    # No configured secret, and no token the gateway handed out, anywhere.
    secrets = secrets_of(environ)
    assert {TOOL_SECRET, API_KEY, fake_ultravox.api_key} <= set(secrets) and len(secrets) >= 5 + len(CARRIERS)
    for secret in secrets + credentials:
        assert secret not in stderr, f"{secret!r} was logged"

    # Each request's lines carry its id, and the call's ids once known.
    records = {record.carrier_call_id: record for record in gateway.records()}
    for carrier_call_id, response in inbound.items():
        record = records[carrier_call_id]
        mine = [line for line in lines if line.get("request_id") == response.headers["x-request-id"]]
        (access,) = [line for line in mine if line["logger"] == "uvicorn.access"]
        assert "/inbound" in access["message"] and " 200" in access["message"]
        assert {key: access.get(key) for key in ("call_id", "carrier_call_id", "ultravox_call_id", "carrier", "route")} == {
            "call_id": record.id, "carrier_call_id": carrier_call_id, "ultravox_call_id": record.ultravox_call_id,
            "carrier": record.carrier, "route": "support"}
    # Every line about a call, from the gateway's flows and the media socket, names it.
    about_calls = [line for line in lines if line["logger"] in ("gateway.inbound", "gateway.outbound", "gateway.transfer")
                   or (line["logger"] == "uvicorn.error" and "WebSocket /media" in line["message"])]
    assert len(about_calls) >= len(CARRIER_NAMES) + 2
    for line in about_calls:
        assert line.get("call_id") and line.get("carrier") and line.get("request_id"), line
    socket_lines = [line for line in lines if "WebSocket /media" in line["message"]]
    assert socket_lines and all(line["call_id"] == records[form[bridged.call_id_param]].id for line in socket_lines)
    assert all("token=[redacted]" in line["message"] for line in socket_lines)
    (apology,) = [line for line in lines if "apology" in line["message"] and line["logger"] == "gateway.inbound"]
    assert apology["level"] == "WARNING" and apology["call_id"] == records[failed[double(first).call_id_param]].id


def test_a_configuration_problem_is_a_json_line_too(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[gateway]\nport = 'eighty'\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--log-format", "json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "GATEWAY_LOG_FORMAT": "text"},
    )
    assert done.returncode == 2
    (line,) = [json.loads(text) for text in done.stderr.splitlines()]
    assert line["level"] == "ERROR" and "gateway.port" in line["message"]


# --- the configuration, applied in a process of its own ---------------------------------------------------

CONFIGURED_PROCESS = """
import logging, sys, threading, warnings
from gateway import logs
from gateway.logs import bind
logs.configure(sys.argv[1], "info", ["s3cr3t-value"])
log = logging.getLogger("gateway.example")
with bind(call_id="call-1", carrier="twilio"):
    try:
        raise RuntimeError("failed talking to https://user:pw@host/x?token=1234567890.HEX32 (key s3cr3t-value)")
    except RuntimeError:
        log.exception("it broke for %s", "s3cr3t-value")
    log.info("extra fields too", extra={"detail": {"url": "wss://h/media?call=1&token=abc"}})
logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/media?t=abc", "1.1", 200)
warnings.warn("a warning is a log line too")
threading.Thread(target=lambda: 1 / 0).start()
""".replace("HEX32", "ab" * 16)


def run_configured(log_format: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CONFIGURED_PROCESS, log_format], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "s3cr3t" not in done.stderr and "pw@" not in done.stderr and "ab" * 16 not in done.stderr
    assert "token=abc" not in done.stderr and "t=abc" not in done.stderr
    return done.stderr.splitlines()


def test_json_exceptions_are_one_line_with_the_traceback_redacted():
    broke, extra, access, warning, thread = [json.loads(line) for line in run_configured("json")]
    assert broke["level"] == "ERROR" and broke["logger"] == "gateway.example"
    assert broke["message"] == "it broke for [redacted]"
    assert (broke["call_id"], broke["carrier"]) == ("call-1", "twilio")
    assert broke["traceback"].startswith("Traceback") and "RuntimeError: failed talking to" in broke["traceback"]
    assert "token=[redacted]" in broke["traceback"] and "user:[redacted]@host" in broke["traceback"]
    assert extra["detail"] == {"url": "wss://h/media?call=1&token=[redacted]"} and extra["call_id"] == "call-1"
    assert access["logger"] == "uvicorn.access" and "/media?t=[redacted]" in access["message"] and "call_id" not in access
    assert warning["logger"] == "py.warnings" and "a warning is a log line too" in warning["message"]
    assert thread["level"] == "CRITICAL" and "ZeroDivisionError" in thread["traceback"]


def test_text_lines_show_the_ids_after_the_message():
    lines = run_configured("text")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR gateway.example: it broke for \[redacted\] "
                    r"\[carrier=twilio call_id=call-1\]$", lines[0])
    assert lines[1] == "Traceback (most recent call last):"


# --- the pieces ---------------------------------------------------------------------------------------------


def test_bind_adds_ids_and_a_block_takes_them_back():
    assert logs.current_ids() == {}
    with logs.bind(carrier="telnyx", call_id=None):
        with logs.bind(call_id="c-1", route=""):
            assert logs.current_ids() == {"carrier": "telnyx", "call_id": "c-1"}
        assert logs.current_ids() == {"carrier": "telnyx"}
    assert logs.current_ids() == {}


def test_the_redacting_filter_knows_credentials_by_value_and_by_shape():
    redacting = logs.RedactingFilter(["tok/en+1", "key-123"])
    cases = {
        "auth tok/en+1 and tok%2Fen%2B1 (encoded)": "auth [redacted] and [redacted] (encoded)",
        "wss://gw/media/twilio?call=c1&token=1767225600.0123456789abcdef0123456789abcdef": "wss://gw/media/twilio?call=c1&token=[redacted]",
        "https://gw/plivo/status?call=c1&amp;t=0123456789abcdef0123456789abcdef": "https://gw/plivo/status?call=c1&amp;t=[redacted]",
        '<Parameter name="token" value="1767225600.0123456789abcdef0123456789abcdef"/>':
            '<Parameter name="token" value="[redacted]"/>',
        "Authorization: Bearer abc.DEF-123": "Authorization: Bearer [redacted]",
        "authorization=sk_live_51": "authorization=[redacted]",
        "sent Basic ZXhvdGVsOmhvb2s=": "sent Basic [redacted]",
        "wrong Basic credentials": "wrong Basic credentials",
        "https://user:pass@api.example.com/v1": "https://user:[redacted]@api.example.com/v1",
        "{'x-twilio-signature': 'abc='}": "{'x-twilio-signature': '[redacted]'}",
        "X-Gateway-Tool-Secret: hunter2": "X-Gateway-Tool-Secret: [redacted]",
        "the media token has expired": "the media token has expired",
        "twilio call CA0123 joined Ultravox call 6f1c2d3e": "twilio call CA0123 joined Ultravox call 6f1c2d3e",
    }
    for text, expected in cases.items():
        assert redacting.redact(text) == expected, text
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "%s used %d times", ("key-123", 2), None)
    record.headers = {"authorization": "key-123", "nested": ["key-123"]}
    assert redacting.filter(record)
    assert record.getMessage() == "[redacted] used 2 times"
    assert record.headers == {"authorization": "[redacted]", "nested": ["[redacted]"]}


def test_a_short_secret_is_redacted_where_it_stands_alone_not_inside_words():
    redacting = logs.RedactingFilter(["x", "k3y"])
    assert (redacting.redact("Bearer x, key=x; the k3y x-ray exists k3ys")
            == "Bearer [redacted], key=[redacted]; the [redacted] [redacted]-ray exists k3ys")
    assert redacting.redact("exotel proxy next") == "exotel proxy next"


def test_every_worker_process_writes_json_lines(tmp_path, fake_ultravox):
    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG)
    environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'gateway.db'}")
    process = ServeProcess(config, environ, tmp_path, "--workers", "2", "--log-format", "json")
    carrier = CARRIER_NAMES[0]
    ids = []
    for _ in range(4):
        form = double(carrier).inbound_form(to=SUPPORT_NUMBER)
        request = double(carrier).inbound_request(PUBLIC_URL, f"/{carrier}/inbound", form)
        response = httpx.post(process.url + f"/{carrier}/inbound", content=request.body, headers=request.headers)
        assert response.status_code == 200
        ids.append(response.headers["x-request-id"])
    stderr, stdout = process.output()
    assert stdout == ""
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert all(all(field in line for field in REQUIRED) for line in lines)
    started = {line["pid"] for line in lines if line["message"].startswith("Started server process")}
    assert len(started) == 2  # both workers configured alike
    answered = [line for line in lines if line["logger"] == "uvicorn.access" and "/inbound" in line["message"]]
    assert [line["request_id"] for line in answered] == ids and all(line["call_id"] for line in answered)
    assert {line["pid"] for line in answered} <= started
    for secret in secrets_of(environ):
        assert secret not in stderr


def test_request_lines_never_show_a_media_or_callback_token_however_it_is_spelled(serve_json):
    """uvicorn's own lines name the request target with its query: the token in a media socket's
    URL must not reach the log, even spelled so that no pattern of the redactor recognises it."""
    import websockets

    gateway, _, process = serve_json
    streaming = next(name for name in CARRIER_NAMES if double(name).stream_url_takes_query)
    bridged = double(streaming)
    answer = gateway.post(streaming, bridged.inbound_form(to=BRIDGED_NUMBER))
    stream_url, _ = bridged.connected_url(answer.text)
    token = query_value(stream_url, "token")
    expiry, _, signature = token.partition(".")
    # The same token, percent-encoded (decoded, the gateway reads it as `token=...`).
    respelled = local(gateway, stream_url).replace(f"token={token}", f"%74oken={expiry}%2E{signature}")

    async def open_and_close():
        with contextlib.suppress(Exception):  # accepted or refused: either way uvicorn logs the line
            async with websockets.connect(respelled, open_timeout=10, additional_headers=bridged.stream_headers(
                    stream_url)):
                pass

    asyncio.run(open_and_close())
    callback = gateway.client.get(f"/{streaming}/status?call=c1&%74={signature}")
    assert callback.status_code < 500
    stderr, _ = process.output()
    assert "WebSocket /media" in stderr and f"/{streaming}/status" in stderr
    assert signature not in stderr and token not in stderr


def test_throttled_lines_are_logged_once_per_interval_per_kind_saying_how_many_were_left_out(caplog):
    from gateway.logs import Throttled

    now = [100.0]
    throttled = Throttled(logging.getLogger("gateway.test-throttled"), every=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="gateway.test-throttled")
    for _ in range(500):  # a flood of one kind, and one line of another
        throttled.warning(("twilio", 403), "refused %s", "twilio")
    throttled.warning(("plivo", 403), "refused %s", "plivo")
    now[0] += 10.5
    throttled.warning(("twilio", 403), "refused %s", "twilio")
    throttled.warning(("twilio", 403), "refused %s", "twilio")
    assert [r.getMessage() for r in caplog.records] == [
        "refused twilio", "refused plivo", "refused twilio (and 499 more like it in the 10 s before, not logged)"]
