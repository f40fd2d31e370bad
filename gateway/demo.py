"""`gateway demo`: the gateway with everything it talks to faked on loopback, to try it with no
account and no configuration.

It runs the real gateway, a stand-in for Ultravox (`FakeUltravox.converse()`: it greets, listens and
answers with WAVs shipped in gateway/testing/sounds) and each carrier's fake REST API, whose callees
pick up the calls the gateway places. Every credential is made up for the session and written,
with two routes (one bridged, one direct), to a configuration file in a temporary directory, so
`gateway simulate --config …` signs exactly as the demo's carriers do. It prints the commands to
try next, and removes the directory when stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .carriers import CARRIERS
from .settings import Settings, environment, load_settings
from .testing.callees import Callees
from .testing.carrier import CarrierDouble, FakeCarrier, double
from .testing.server import ServerThread
from .testing.speech import PAUSE_MS, Speech, shipped_wav
from .testing.ultravox import FakeUltravox

BRIDGE_ROUTE, BRIDGE_NUMBER = "demo-bridge", "+15550001111"
DIRECT_ROUTE, DIRECT_NUMBER = "demo-direct", "+15550002222"
CALLEE_NUMBER = "+15557654321"  # whom the dialer example phones
CALLER_NUMBER = "+15551230001"
# How long a callee the demo phones stays on the line before hanging up.
CALLEE_HOLD_SECONDS = 8.0
SYSTEM_PROMPT = "You are the demo agent of an Ultravox telephony gateway. Greet the caller and help them."


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


@dataclasses.dataclass
class Demo:
    """A running demo: the gateway on `url`, its fakes, and the directory holding its configuration."""

    directory: Path
    config_path: Path
    settings: Settings
    url: str
    ultravox: FakeUltravox
    fakes: dict[str, FakeCarrier]
    doubles: dict[str, CarrierDouble]
    servers: list[ServerThread]
    callees: list[Callees]
    pace: float = 1.0  # times real time, for the stand-in agent and the printed simulate commands

    @property
    def api_key(self) -> str:
        return self.settings.api_keys[0].key

    def stop(self) -> None:
        _stop(self.servers, self.callees, self.fakes, self.directory)

    # --- what to try next ----------------------------------------------------------------------
    def simulate_command(self, carrier: str, output: str = "agent.wav") -> list[str]:
        """`gateway simulate` playing the shipped caller into the bridged route as `carrier`'s call."""
        answer = self.ultravox.answer
        # After the caller's last word: the pause that ends the utterance, the answer (both at the
        # demo's pace), and some slack.
        answer_seconds = answer.seconds if isinstance(answer, Speech) else 0.0
        tail = math.ceil((PAUSE_MS / 1000 + answer_seconds) / self.pace + 1.5)
        pace = ["--pace", f"{self.pace:g}"] if self.pace != 1 else []
        return [*_unset_environment(), *gateway_command(), "simulate", "--config", str(self.config_path),
                "--url", self.url, "--carrier", carrier, "--to", BRIDGE_NUMBER,
                "--input", str(shipped_wav("caller")), "--output", output, "--tail-seconds", str(tail), *pace,
                *self.doubles[carrier].simulate_arguments()]

    def inbound_curl(self, carrier: str) -> list[str]:
        """A curl of `carrier`'s inbound webhook for a call to the direct route, signed as it signs."""
        d = self.doubles[carrier]
        form = d.inbound_form(to=DIRECT_NUMBER, from_=CALLER_NUMBER)
        request = d.inbound_request(self.url, f"/{carrier}/inbound", form)
        command = ["curl", "-sS", f"{self.url}/{carrier}/inbound" + (f"?{request.query}" if request.query else "")]
        for name, value in request.headers.items():
            command += ["-H", f"{name}: {value}"]
        if request.method == "POST":
            command += ["--data-raw", request.body.decode("ascii")]
        return command

    def dial_curl(self, carrier: str) -> list[str]:
        body = json.dumps({"to": CALLEE_NUMBER, "route": DIRECT_ROUTE, "carrier": carrier})
        return ["curl", "-sS", "-X", "POST", f"{self.url}/v1/calls", "-H", f"Authorization: Bearer {self.api_key}",
                "-H", "Content-Type: application/json", "-d", body]

    def calls_curl(self) -> list[str]:
        return ["curl", "-sS", "-H", f"Authorization: Bearer {self.api_key}", f"{self.url}/v1/calls"]

    def next_steps(self) -> str:
        first, *others = CARRIERS
        title = CARRIERS[first].title
        return "\n".join([
            f"The gateway is running on {self.url} with a local stand-in for Ultravox and the carriers' APIs "
            "faked on loopback: nothing leaves this machine, and every credential is made up for this session "
            f"({self.config_path}).",
            f"Routes: {BRIDGE_NUMBER} {BRIDGE_ROUTE} (bridge mode: the audio passes the gateway and is recorded), "
            f"{DIRECT_NUMBER} {DIRECT_ROUTE} (direct: the carrier streams to Ultravox itself).",
            "",
            f"1. Call the bridged route as a {title} caller; what the agent said (its greeting, then its answer) "
            "goes to agent.wav:",
            "",
            "   " + shlex.join(self.simulate_command(first)),
            "",
            f"2. A signed {title} webhook announcing a call to the direct route; the answer connects it to Ultravox:",
            "",
            "   " + shlex.join(self.inbound_curl(first)),
            "",
            "3. Phone someone through the dialer API (the fake callee picks up, and hangs up after "
            f"{CALLEE_HOLD_SECONDS:g} s), then list the calls:",
            "",
            "   " + shlex.join(self.dial_curl(first)),
            "   " + shlex.join(self.calls_curl()),
            "",
            "   or place one and follow it to its end: " + shlex.join(
                [*gateway_command(), "dial", CALLEE_NUMBER, "--route", DIRECT_ROUTE, "--carrier", first,
                 "--url", self.url, "--api-key", self.api_key]),
            "",
            "The same call as another carrier's caller:",
            *["   " + shlex.join(self.simulate_command(name, f"agent-{name}.wav")) for name in others],
            "",
            "Stop with Ctrl-C.",
        ])


def _stop(servers: list[ServerThread], callees: list[Callees], fakes: dict[str, FakeCarrier], directory: Path) -> None:
    for server in reversed(servers):  # the gateway first: it was started last
        server.stop()
    for people in callees:
        people.__exit__(None, None, None)
    for fake in fakes.values():
        fake.close()
    shutil.rmtree(directory, ignore_errors=True)


def gateway_command() -> list[str]:
    """This installation's `gateway`, spelt so that it runs from any directory without a venv on PATH."""
    script = Path(sys.executable).parent / "gateway"  # the console script beside this interpreter
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gateway"]


def _unset_environment() -> list[str]:
    """`env -u VAR …` for the gateway's variables set in this environment: they would win over the
    demo's configuration file (and sign with other credentials) in a command run from here."""
    present = sorted(name for name in [*environment(), "GATEWAY_CONFIG", "GATEWAY_URL"] if os.environ.get(name))
    return ["env", *[part for name in present for part in ("-u", name)]] if present else []


def _carrier_section(name: str, d: CarrierDouble, api_base_url: str) -> dict[str, Any]:
    """The [name] table configuring the gateway for the double's credentials and REST API."""
    keys = CARRIERS[name].environment
    section = {keys[variable]: value for variable, value in d.environ(api_base_url).items() if variable in keys}
    section.update(tomllib.loads(d.config_toml()).get(name, {}))
    return section


def start_demo(port: int = 8080, host: str = "127.0.0.1", *, pace: float = 1.0) -> Demo:
    """Start the fakes and the gateway; raises DemoError (with everything stopped) when it cannot.
    `pace`: the stand-in agent speaks that many times faster than real time (see FakeUltravox.converse)."""
    from .app import create_app

    directory = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    url = f"http://{host}:{port}"
    # Without schema validation: its validator is in the [test] extra, and the suite checks the very
    # bodies the gateway sends.
    ultravox = FakeUltravox(api_key="uv_demo_" + secrets.token_urlsafe(24), validate=False).converse(pace=pace)
    doubles = {name: double(name).for_session() for name in CARRIERS}
    fakes = {name: d.fake_api(public_url=url, deliver_to=url) for name, d in doubles.items()}
    servers: list[ServerThread] = []
    callees: list[Callees] = []
    try:
        servers.append(ultravox.serve())
        servers += [fake.serve() for fake in fakes.values()]
        config_path = directory / "gateway.toml"
        config_path.write_text("# gateway demo: made up for one session, deleted when it stops.\n"
                               + tomli_w.dumps(_configuration(directory, url, host, port, ultravox, doubles, fakes)))
        # Only the file: variables of this shell must not mix real credentials into the demo.
        settings = load_settings(config_path, environ={})
        try:
            servers.append(ServerThread(create_app(settings), host=host, port=port).start())
        except OSError as error:
            raise DemoError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                            f"try another port: gateway demo --port {port + 1}") from None
        for name, d in doubles.items():
            callees.append(Callees(fakes[name], hold=lambda: CALLEE_HOLD_SECONDS, answer_with=d).__enter__())
    except BaseException:
        _stop(servers, callees, fakes, directory)
        raise
    return Demo(directory, config_path, settings, url, ultravox, fakes, doubles, servers, callees, pace)


def _configuration(directory: Path, url: str, host: str, port: int, ultravox: FakeUltravox,
                   doubles: dict[str, CarrierDouble], fakes: dict[str, FakeCarrier]) -> dict[str, Any]:
    """The demo's config file: its fakes' URLs and credentials, a bridged and a direct route."""
    return {
        "gateway": {
            "public_url": url, "host": host, "port": port, "database_url": f"sqlite:///{directory / 'gateway.db'}",
            "api_keys": ["demo_" + secrets.token_urlsafe(24)], "tool_secret": secrets.token_urlsafe(24),
            "drain_seconds": 0,
        },
        "ultravox": {"api_key": ultravox.api_key, "base_url": ultravox.base_url,
                     "webhook_secret": secrets.token_urlsafe(24)},
        **{name: _carrier_section(name, d, fakes[name].base_url or "") for name, d in doubles.items()},
        "outbound": {"numbers": {name: [d.own_number] for name, d in doubles.items()}},
        "routes": [
            {"number": BRIDGE_NUMBER, "name": BRIDGE_ROUTE, "mode": "bridge",
             "recording_dir": str(directory / "recordings"), "call": {"systemPrompt": SYSTEM_PROMPT}},
            {"number": DIRECT_NUMBER, "name": DIRECT_ROUTE, "call": {"systemPrompt": SYSTEM_PROMPT}},
        ],
    }


def run_demo(port: int = 8080, *, pace: float = 1.0) -> int:
    """`gateway demo`: start, print what to try, run until Ctrl-C or SIGTERM."""
    from . import logs

    try:
        demo = start_demo(port, pace=pace)
    except DemoError as error:
        print(f"gateway demo: {error}", file=sys.stderr)
        return 2
    logs.configure("text", "info", demo.settings.secrets())
    # The fakes' own requests (the callees' callbacks) would fill the terminal otherwise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stopped = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopped.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(demo.next_steps(), flush=True)
        stopped.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("Stopping the demo.", file=sys.stderr, flush=True)
        demo.stop()
    return 0


__all__ = ["Demo", "DemoError", "run_demo", "start_demo"]
