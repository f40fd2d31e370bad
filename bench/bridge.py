"""Bridge-mode media benchmark: the gateway's media relay against a bare websockets relay.

    python bench/bridge.py [--calls 200] [--seconds 20] [--carrier NAME] [--load-processes 2]

Any carrier of gateway.carriers.CARRIERS (by default the registry's first) is played by its test
double (gateway.testing.double) and its media-stream dialect (`CarrierStream`). Each target runs in
its own process against its own fake Ultravox process, which echoes every binary frame back (so the
agent "speaks" 20 ms frames at the caller's real-time pace). First the real `gateway serve` with
one bridge-mode route: each simulated call sends the carrier's inbound webhook, built and signed by
the double, opens the stream URL the answer connects to (on loopback; whatever the carrier signs
on the upgrade stays on the public wss:// URL) and plays a speech-like signal as 20 ms frames in
real time with `CarrierStream`. Then the baseline: a minimal websockets relay (JSON + base64 both
ways, no codec, no counters), whose Ultravox calls the load generator creates itself. Calls start
staggered over the first 2 s.

Every frame carries its number in its first two samples (mu-law code points, which survive both
G.711 and L16), so each echoed frame is matched to the frame the caller sent. Figures are printed,
never asserted; the exit status is 1 only when a run had errors.

The same file is also the entry point of the child processes (`_fake`, `_relay`, `_load`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

# bench/ is sys.path[0] when this file runs as a script (parent and children alike), so the
# inbound benchmark's process management and constants are shared rather than copied.
from inbound import (  # noqa: E402
    ANSWER_ERRORS,
    CALLED_NUMBER,
    DEAD_API,
    PUBLIC_URL,
    ULTRAVOX_KEY,
    Child,
    _die_with_parent,
    child_env,
    cpu_seconds,
    free_port,
    inbound_path,
    percentile,
    run_async,
)

from gateway.carriers import CARRIERS

with warnings.catch_warnings():  # deprecated in 3.11-3.12; audioop-lts provides it from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

HERE = os.path.abspath(__file__)
DEFAULT_CARRIER = next(iter(CARRIERS))  # the registry's first
FRAME_SECONDS = 0.020
LATE_SECONDS = 0.060  # same threshold as the gateway's own late-frame counter
RAMP_SECONDS = 2.0  # call starts are spread over this
SETUP_MARGIN = 0.5  # after the last start, before the measured window opens (webhook + connect)
DRAIN_SECONDS = 2.0  # after its last frame, a call waits this long at most for the last echoes

# Targets from the issue, printed next to the figures.
TARGET_CALLS = 200
TARGET_CARRIER = DEFAULT_CARRIER  # the calls target is for the registry's first carrier
TARGET_ADDED_P99_MS = 5.0
TARGET_CPU_RATIO = 1.5
# Machine busy fraction from which latencies measure CPU contention: on the 2-core dev VM the
# bare relay's p99 was a steady 2-5 ms up to 76-79 % busy (150 calls) and swung 7-37 ms between
# runs at 84-86 % (200 calls).
SATURATED = 0.80


# =============================================================================================
# Frame numbering: a frame counter that survives mu-law
# =============================================================================================
# The first two samples of frame k are mu-law code points (ulaw2lin of one byte each) holding k in
# base 255. Decoding and re-encoding G.711 returns every code byte except 0x7F (negative zero,
# which comes back as 0xFF), so 0x7F is skipped. L16 paths carry the samples unchanged.


def _code(digit: int) -> int:
    return digit if digit < 0x7F else digit + 1


def _digit(code: int) -> int:
    return code if code < 0x7F else code - 1


def marker_samples(k: int) -> bytes:
    """Two s16le samples carrying k (k < 255**2, i.e. 21 minutes of frames)."""
    return audioop.ulaw2lin(bytes((_code(k // 255 % 255), _code(k % 255))), 2)


def marker_of(stream, message: dict) -> int:
    """The frame number in an audio message from the target: its first two samples, as the
    carrier's stream dialect decodes them (to s16le), read back as mu-law code points."""
    pcm, _ = stream.dialect.decode(stream, message)  # format errors: the stream has them already
    codes = audioop.lin2ulaw(pcm[:4], 2)
    if len(codes) < 2:
        return -1  # too short to carry a number: counted as out of order
    return _digit(codes[0]) * 255 + _digit(codes[1])


def speech_frames(rate: int, count: int) -> list[bytes]:
    """`count` 20 ms s16le frames of voiced-speech-like audio, frame k numbered k.

    A gliding pitch with harmonics under a syllable envelope; one second of it, repeated, so the
    frames cost the load generator nothing while it runs.
    """
    import numpy as np

    t = np.arange(rate) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12) if h * 180 < 3400)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    second = (voice / np.max(np.abs(voice)) * envelope * 12000).astype("<i2").tobytes()
    size = rate // 50 * 2
    base = [second[offset:offset + size] for offset in range(0, len(second), size)]
    return [marker_samples(k) + base[k % len(base)][4:] for k in range(count)]


# =============================================================================================
# Child process: fake Ultravox (echo)
# =============================================================================================


def serve_fake(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from gateway.testing import FakeUltravox

    # Validation off: the fake shares the machine with the server being measured.
    fake = FakeUltravox(ULTRAVOX_KEY, validate=False)
    fake.media_mode = "echo"

    async def stats(request):
        sessions = list(fake.sessions.values())
        return JSONResponse({
            "calls_created": fake.calls_created,
            "sessions": len(sessions),
            "open": sum(not session.closed.is_set() for session in sessions),
            "frames_in": sum(session.frames_in for session in sessions),
            "frames_out": sum(session.frames_out for session in sessions),
        })

    app = Starlette(routes=[Route("/_bench/stats", stats), Mount("/", app=fake.app)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# =============================================================================================
# Child process: the bare relay (baseline)
# =============================================================================================


async def relay_main(port: int, carrier: str) -> None:
    """The bare relay. The carrier's own module reads the start message (its stream id) and writes
    the agent's audio (`media_audio`, the JSON the gateway sends too); the caller's audio takes the
    bare path (json.loads + base64) whenever it comes as a JSON "media" event with media.payload,
    the shape of every carrier's stream today, and the carrier's parser otherwise."""
    from http import HTTPStatus

    import websockets
    from websockets.asyncio.server import serve

    from gateway.carriers.base import (
        MalformedFrame,
        StreamAudio,
        StreamStart,
        StreamStop,
    )
    from gateway.settings import load_settings

    speaker = CARRIERS[carrier](load_settings(environ={}))  # its wire format needs none of its settings
    # The gateway's libraries, loaded for the carrier's module, never die: kept out of the collector's
    # full passes, as the gateway keeps its own (gateway/app.py), lest they cost the bare relay
    # pauses the old relay, without them, did not have.
    gc.freeze()

    def parsed(message):
        try:
            return speaker.parse_media(message)
        except MalformedFrame:
            return None

    def health(connection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    async def handler(carrier_ws) -> None:
        # /media/<carrier>?join=<Ultravox join URL>, or a `join` stream parameter for a carrier whose
        # stream URLs take no query: the load generator created the call.
        join = parse_qs(urlsplit(carrier_ws.request.path).query).get("join", [None])[0]
        sid = None
        async for message in carrier_ws:
            event = parsed(message)
            if isinstance(event, StreamStart):
                sid, join = event.stream_id, join or event.parameters.get("join")
                break
        if sid is None or join is None:
            return
        async with websockets.connect(join, compression=None, max_size=2**20) as ultravox:
            async def caller_to_agent():
                async for message in carrier_ws:
                    try:
                        data = json.loads(message)
                    except ValueError:
                        data = None
                    if isinstance(data, dict) and data.get("event") == "media":
                        await ultravox.send(base64.b64decode(data["media"]["payload"]))
                        continue
                    event = parsed(message)
                    if isinstance(event, StreamAudio):
                        await ultravox.send(event.payload)
                    elif isinstance(event, StreamStop):
                        return

            async def agent_to_caller():
                async for message in ultravox:
                    if isinstance(message, bytes):
                        await carrier_ws.send(speaker.media_audio(sid, message))

            tasks = {asyncio.create_task(caller_to_agent()), asyncio.create_task(agent_to_caller())}
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await carrier_ws.close()

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**20, process_request=health):
        await asyncio.Event().wait()


# =============================================================================================
# Child process: load generator
# =============================================================================================


@dataclasses.dataclass
class CallResult:
    index: int
    errors: list[str] = dataclasses.field(default_factory=list)
    frames_sent: int = 0
    echoes: int = 0
    mismatched: int = 0  # echoes whose frame number is not the next one expected
    late_sends: int = 0  # caller frames sent > 60 ms behind schedule (load generator lagging)
    late_echoes: int = 0  # echoes arriving > 60 ms after their frame's schedule
    streaming_from: float = math.nan  # time.monotonic() of the first and last frame sent
    streaming_to: float = math.nan


class _KeyPickler(pickle.Pickler):
    """Pickles private keys (which cryptography's objects refuse) as PEM, so a double's generated
    signing key travels with it."""

    def reducer_override(self, obj):
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
        except ImportError:
            return NotImplemented
        if isinstance(obj, PrivateKeyTypes):
            pem = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            return _private_key, (pem,)
        return NotImplemented


def _private_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(pem, None)


def freeze_double(carrier_double) -> str:
    """The double, credentials included (also those it generated, like a key pair), for the spec:
    the load processes sign with exactly what the gateway was configured for."""
    buffer = io.BytesIO()
    _KeyPickler(buffer).dump(carrier_double)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def thaw_double(frozen: str):
    return pickle.loads(base64.b64decode(frozen))  # written by the parent for this run only


def build_setups(spec: dict, carrier_double) -> dict[int, dict]:
    """Per call, what its setup sends: signed before the clock starts so signing costs the run nothing."""
    if spec["target"] != "gateway":
        return {index: {"call_id": f"bench-{uuid.uuid4().hex}"} for index in spec["indices"]}
    setups = {}
    path = inbound_path(carrier_double.name)
    for index in spec["indices"]:
        form = carrier_double.inbound_form(to=CALLED_NUMBER)
        webhook = carrier_double.inbound_request(PUBLIC_URL, path, form)
        setups[index] = {
            "call_id": form[carrier_double.call_id_param], "method": webhook.method,
            "target": f"{path}?{webhook.query}" if webhook.query else path,
            "body": webhook.body, "headers": webhook.headers,
        }
    return setups


async def open_call(spec: dict, setup: dict, http, carrier_double) -> tuple[str, dict | None, dict[str, str]]:
    """The stream URL to connect to (on loopback), its headers and its parameters, as the carrier
    would open it."""
    carrier = carrier_double.name
    if spec["target"] == "gateway":
        response = await http.request(setup["method"], spec["target_url"] + setup["target"],
                                      content=setup["body"] or None, headers=setup["headers"])
        if response.status_code != 200:
            raise RuntimeError(f"webhook: HTTP {response.status_code}: {response.text[:200]}")
        try:
            public, _ = carrier_double.connected_url(response.text)
        except ANSWER_ERRORS as error:
            raise RuntimeError(f"webhook: no stream in the answer ({error}): {response.text[:200]}") from None
        public_base = PUBLIC_URL.replace("https://", "wss://", 1)
        if not public.startswith(public_base + "/"):
            raise RuntimeError(f"stream URL {public!r} is not under {public_base}")
        local = "ws://" + spec["target_url"].split("://", 1)[1] + public[len(public_base):]
        # A carrier signing the upgrade signs the URL as written in its answer, not the loopback one.
        return local, carrier_double.stream_headers(public), carrier_double.stream_parameters(response.text)
    # Baseline: create the Ultravox call ourselves, as the gateway does for a bridged route.
    rate = CARRIERS[carrier].media_rate
    response = await http.post(
        f"{spec['fake_url']}/api/agents/{spec['agent_id']}/calls",
        headers={"X-API-Key": ULTRAVOX_KEY},
        json={"medium": {"serverWebSocket": {
            "inputSampleRate": rate, "outputSampleRate": rate, "clientBufferSizeMs": 30000,
        }}},
    )
    if response.status_code != 201:
        raise RuntimeError(f"fake Ultravox: HTTP {response.status_code}: {response.text[:200]}")
    join = response.json()["joinUrl"]
    base = "ws://" + spec["target_url"].split("://", 1)[1] + f"/media/{carrier}"
    if not carrier_double.stream_url_takes_query:
        return base, None, {"join": join}
    return f"{base}?join={quote(join, safe='')}", None, {}


async def run_call(spec: dict, setup: dict, frames: list[bytes], start_at: float, http, samples: dict[str, list],
                   carrier_double):
    """One call; appends to `samples`: rtt (s) and its frame's send time, send lag (s) and its time,
    and the send time of each frame whose echo came late."""
    from websockets.exceptions import ConnectionClosed

    from gateway.testing import CarrierStream

    result = CallResult(setup["index"])
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    stream = None
    sent_at = [math.nan] * len(frames)
    try:
        url, headers, parameters = await open_call(spec, setup, http, carrier_double)
        stream = CarrierStream(carrier_double.name, url, headers=headers, parameters=parameters)
        await stream.connect()
        await stream.start(call_id=setup["call_id"])
        schedule = time.monotonic()  # frame k is due at schedule + k * 20 ms

        def harvest() -> None:
            # Consume what has arrived and drop it: the lists would otherwise hold every message
            # of every call until the end (the load generator runs with its collector off).
            for received in stream.received:
                if received.kind != "audio":
                    result.errors.append(f"unexpected {received.kind} message: {str(received.data)[:120]}")
                    continue
                number = marker_of(stream, received.data)
                if number != result.echoes:
                    result.mismatched += 1
                result.echoes += 1
                if 0 <= number < len(frames) and not math.isnan(sent_at[number]):
                    samples["rtt"].append(received.at - sent_at[number])
                    samples["rtt_at"].append(sent_at[number])
                    if received.at - (schedule + number * FRAME_SECONDS) > LATE_SECONDS:
                        result.late_echoes += 1
                        samples["late_at"].append(sent_at[number])
            stream.received.clear()
            stream.sent.clear()

        for k, frame in enumerate(frames):
            wait = schedule + k * FRAME_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if stream.closed.is_set():
                raise ConnectionClosed(None, None)
            now = time.monotonic()
            lag = now - (schedule + k * FRAME_SECONDS)
            samples["lag"].append(lag)
            samples["lag_at"].append(now)
            if lag > LATE_SECONDS:
                result.late_sends += 1
            sent_at[k] = now
            await stream.send_audio(frame)
            result.frames_sent += 1
            harvest()
        deadline = time.monotonic() + DRAIN_SECONDS
        while result.echoes < result.frames_sent and time.monotonic() < deadline and not stream.closed.is_set():
            await asyncio.sleep(0.02)
            harvest()
        harvest()
        if stream.format_errors:
            result.errors.extend(f"format: {error}" for error in stream.format_errors[:5])
        if stream.closed.is_set():
            result.errors.append(f"target closed the media socket early (code {stream.close_code})")
        else:
            await stream.stop()
    except ConnectionClosed:
        code = stream.close_code if stream is not None else None
        result.errors.append(f"target closed the media socket after {result.frames_sent} frames (code {code})")
    except Exception as error:  # any setup or socket failure is the run's error, reported loudly
        result.errors.append(f"{type(error).__name__}: {error}"[:300])
    finally:
        if result.frames_sent:
            result.streaming_from, result.streaming_to = sent_at[0], sent_at[result.frames_sent - 1]
        if stream is not None:
            await stream.close()
    return result


async def load_run(spec: dict, carrier_double, setups: dict[int, dict], frames: list[bytes], go: float) -> dict:
    import httpx

    samples: dict[str, list[float]] = {"rtt": [], "rtt_at": [], "lag": [], "lag_at": [], "late_at": []}
    stagger = RAMP_SECONDS / spec["calls"]
    # Independent calls send their frames at unrelated phases of the 20 ms cycle. A plain stagger
    # of 2 s / N would put every call on a few phases (two at N=200: 10 ms apart), and every hop
    # would then see bursts of N/2 frames at once. The golden-ratio sequence spreads the phases
    # evenly for any N.
    golden = (math.sqrt(5) - 1) / 2
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, limits=limits) as http:
        results = await asyncio.gather(*(
            run_call(spec, setups[index], frames, go + index * stagger + (index * golden % 1) * FRAME_SECONDS,
                     http, samples, carrier_double)
            for index in spec["indices"]
        ))
    return {"calls": [dataclasses.asdict(result) for result in results], **samples}


def load_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    carrier_double = thaw_double(spec["double"])
    frames = speech_frames(carrier_double.stream_rate, int(round(spec["seconds"] / FRAME_SECONDS)))
    setups = build_setups(spec, carrier_double)
    for index, setup in setups.items():
        setup["index"] = index
    import gateway.testing  # noqa: F401  (imported before the clock starts)
    import httpx  # noqa: F401

    # Everything the run allocates lives until its end; collections would only add pauses to
    # the latencies this process measures.
    gc.collect()
    gc.freeze()
    gc.disable()
    print("ready", flush=True)
    go = float(sys.stdin.readline())
    outcome = run_async(load_run(spec, carrier_double, setups, frames, go))
    Path(spec["result_path"]).write_text(json.dumps(outcome))


# =============================================================================================
# Orchestration
# =============================================================================================


class LoadProcess:
    """One load-generator process: it signals readiness on stdout and waits for the start time."""

    def __init__(self, name: str, spec: dict, workdir: Path):
        self.name = name
        self.spec_path = workdir / f"{name}.json"
        self.result_path = workdir / f"{name}.result.json"
        spec = dict(spec, result_path=str(self.result_path))
        self.spec_path.write_text(json.dumps(spec))
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, HERE, "_load", str(self.spec_path)], env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.process.wait()
            raise RuntimeError(f"{self.name} failed to start:\n{self.output()}")

    def go(self, at: float) -> None:
        self.process.stdin.write(f"{at!r}\n".encode())
        self.process.stdin.flush()

    def result(self, timeout: float) -> dict:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name} did not finish within {timeout:.0f}s:\n{self.output()}") from None
        if self.process.returncode != 0:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
        return json.loads(self.result_path.read_text())

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_gateway(workdir: Path, fake: Child, agent_id: str, carrier_double) -> Child:
    config = workdir / "gateway.toml"
    config.write_text(f'[[routes]]\nnumber = "{CALLED_NUMBER}"\nagent_id = "{agent_id}"\nmode = "bridge"\n'
                      + carrier_double.config_toml())
    port = free_port()
    env = child_env({
        "GATEWAY_PUBLIC_URL": PUBLIC_URL,
        "GATEWAY_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "ULTRAVOX_API_KEY": ULTRAVOX_KEY,
        "ULTRAVOX_BASE_URL": fake.url,
        # The double's credentials (the ones the load processes sign with); its REST API is dead,
        # so a hang-up fails fast.
        **carrier_double.environ(DEAD_API),
    })
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port),
            "--log-level", "warning"]
    return Child("gateway", argv, port, workdir, env)


def gateway_metrics(server: Child) -> dict[str, float]:
    """The gateway's media counters from /metrics (added when each call's bridge finishes)."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=5.0, trust_env=False).text
    values = {}
    for line in text.splitlines():
        match = re.match(r'gateway_media_(frames|events)_total\{(?:direction|event)="(\w+)"\} (\S+)', line)
        if match:
            values[match.group(2)] = float(match.group(3))
    return values


def machine_idle() -> tuple[float, float]:
    """(now, idle + iowait CPU seconds of the whole machine), from the first line of /proc/stat.

    Busy time there is sampled at timer ticks and misses short bursts on a tickless kernel;
    idle time is measured exactly, so busy is taken as wall time x CPUs minus idle.
    """
    with open("/proc/stat") as handle:
        fields = handle.readline().split()
    return time.monotonic(), (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Result:
    name: str
    calls: int
    window: float
    streaming_calls: int  # calls that were streaming during the whole measured window
    call_seconds: float  # seconds of streaming inside the window, summed over calls
    errors: list[str]
    frames_sent: int
    frames_echoed: int
    fake: dict
    lost: int
    mismatched: int
    late_sends: int
    late_echoes: int  # whole run
    late_echoes_window: int
    rtt_ms: dict[str, float]
    rtt_all_p99_ms: float
    frames_in_window: int
    lag_ms: dict[str, float]  # caller frames: send time - schedule (the load generator's own lag)
    machine_busy: float  # fraction of all CPUs busy over the window, whoever used them
    server_cpu: float  # seconds over the window
    fake_cpu: float
    load_cpu: list[float]
    gateway_counters: dict[str, float]

    def per_call_second(self, cpu_seconds: float) -> float:
        """CPU milliseconds per second of one call's streaming."""
        return 1000 * cpu_seconds / self.call_seconds if self.call_seconds else math.nan


def measure(name: str, args, workdir: Path, children: list, carrier_double) -> Result:
    agent_id = str(uuid.uuid4())
    fake_port = free_port()
    fake = Child(f"fake-for-{name}", [sys.executable, HERE, "_fake", str(fake_port)], fake_port, workdir, child_env())
    children.append(fake)
    fake.wait_ready("/_bench/stats")
    if name == "gateway":
        server = start_gateway(workdir, fake, agent_id, carrier_double)
    else:
        port = free_port()
        server = Child("relay", [sys.executable, HERE, "_relay", str(port), args.carrier], port, workdir, child_env())
    children.append(server)
    server.wait_ready("/healthz")

    spec = {
        "target": name, "carrier": args.carrier, "calls": args.calls, "seconds": args.seconds,
        "target_url": server.url, "fake_url": fake.url, "agent_id": agent_id,
        "double": freeze_double(carrier_double),
    }
    loads = []
    for p in range(args.load_processes):
        indices = list(range(p, args.calls, args.load_processes))
        if indices:
            loads.append(LoadProcess(f"load-{name}-{p}", dict(spec, indices=indices), workdir))
    children.extend(loads)
    for load in loads:
        load.wait_ready()

    pids = [server.pid, fake.pid, *(load.pid for load in loads)]
    go = time.monotonic() + 0.5
    for load in loads:
        load.go(go)
    # Measured window: every call is streaming. The last call starts by go + RAMP_SECONDS + 20 ms; the
    # first sends its last frame at its start (a few ms after go) + seconds - 20 ms.
    window_from, window_to = go + RAMP_SECONDS + FRAME_SECONDS + SETUP_MARGIN, go + args.seconds - 0.1
    time.sleep(max(0.0, window_from - time.monotonic()))
    before, machine_before = [cpu_seconds(pid) for pid in pids], machine_idle()
    time.sleep(max(0.0, window_to - time.monotonic()))
    after, machine_after = [cpu_seconds(pid) for pid in pids], machine_idle()
    cpus = os.cpu_count() or 1
    machine_busy = 1 - (machine_after[1] - machine_before[1]) / ((machine_after[0] - machine_before[0]) * cpus)
    window = window_to - window_from
    cpu = [b - a for a, b in zip(before, after)]

    outcomes = [load.result(timeout=args.seconds + 120) for load in loads]
    calls = [call for outcome in outcomes for call in outcome["calls"]]

    def in_window(values: str, times: str) -> list[float]:
        return sorted(value for outcome in outcomes for value, at in zip(outcome[values], outcome[times])
                      if window_from <= at < window_to)

    rtt = in_window("rtt", "rtt_at")
    rtt_all = sorted(value for outcome in outcomes for value in outcome["rtt"])
    lag = in_window("lag", "lag_at")

    stats = fake.get_json("/_bench/stats")
    counters = {}
    if name == "gateway":
        # Each bridge adds its counters when it finishes, just after its caller hung up.
        expected = sum(call["frames_sent"] for call in calls)
        deadline = time.monotonic() + 5
        while True:
            counters = gateway_metrics(server)
            if counters.get("caller_to_agent", 0) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    server.stop()
    fake.stop()

    errors = [f"call {call['index']}: {error}" for call in calls for error in call["errors"]]
    streaming = sum(1 for call in calls if call["streaming_from"] <= window_from and call["streaming_to"] >= window_to)
    # A call that failed, or started late, streamed for part of the window only.
    call_seconds = sum(
        max(0.0, min(call["streaming_to"] + FRAME_SECONDS, window_to) - max(call["streaming_from"], window_from))
        for call in calls if not math.isnan(call["streaming_from"])
    )
    return Result(
        name=name, calls=args.calls, window=window, streaming_calls=streaming, call_seconds=call_seconds,
        errors=errors,
        frames_sent=sum(call["frames_sent"] for call in calls),
        frames_echoed=sum(call["echoes"] for call in calls),
        fake=stats,
        lost=sum(call["frames_sent"] - call["echoes"] for call in calls),
        mismatched=sum(call["mismatched"] for call in calls),
        late_sends=sum(call["late_sends"] for call in calls),
        late_echoes=sum(call["late_echoes"] for call in calls),
        late_echoes_window=sum(window_from <= at < window_to for outcome in outcomes for at in outcome["late_at"]),
        rtt_ms={k: 1000 * percentile(rtt, f) for k, f in (("p50", 0.50), ("p99", 0.99), ("max", 1.0))},
        rtt_all_p99_ms=1000 * percentile(rtt_all, 0.99),
        frames_in_window=len(rtt),
        lag_ms={k: 1000 * percentile(lag, f) for k, f in (("p50", 0.50), ("p99", 0.99))},
        machine_busy=machine_busy,
        server_cpu=cpu[0], fake_cpu=cpu[1], load_cpu=cpu[2:],
        gateway_counters=counters,
    )


# =============================================================================================
# Report
# =============================================================================================


def stack() -> str:
    import uvicorn
    import websockets

    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    ws = getattr(AutoWebSocketsProtocol, "__module__", "?").rsplit(".", 1)[-1]
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return (f"gateway on uvicorn {uvicorn.__version__} (loop={loop}, ws={ws}); "
            f"baseline on a websockets {websockets.__version__} server (loop={loop})")


def report(args, gateway: Result, baseline: Result) -> None:
    def row(label: str, g: str, b: str, target: str = "") -> None:
        print(f"  {label:<46}{g:>15}{b:>15}   {target}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def pct(part: int, whole: int) -> str:
        return f"{part} ({100 * part / whole:.2f}%)" if whole else str(part)

    cores = os.cpu_count() or 1
    saturated = max(gateway.machine_busy, baseline.machine_busy) >= SATURATED
    caveat = " (machine near saturation: not conclusive)" if saturated else ""
    added = {k: gateway.rtt_ms[k] - baseline.rtt_ms[k] for k in ("p50", "p99")}
    g_cpu, b_cpu = gateway.per_call_second(gateway.server_cpu), baseline.per_call_second(baseline.server_cpu)
    ratio = g_cpu / b_cpu if b_cpu else math.nan
    g_busy, b_busy = gateway.server_cpu / gateway.window, baseline.server_cpu / baseline.window
    kept_up = (not gateway.errors and gateway.lost == 0
               and gateway.late_echoes_window <= 0.001 * gateway.frames_in_window and g_busy < 0.9)
    if args.carrier != TARGET_CARRIER or args.calls < TARGET_CALLS:
        calls_verdict = f"not tested at {args.calls} {CARRIERS[args.carrier].title} calls"
    elif kept_up:
        calls_verdict = "met"
    else:
        calls_verdict = "MISSED (did not keep up)" + caveat

    print()
    row("", "gateway", "baseline", "target (gateway)")
    row("calls", str(gateway.calls), str(baseline.calls),
        f">= {TARGET_CALLS} concurrent {CARRIERS[TARGET_CARRIER].title} calls per process: {calls_verdict}")
    row("  streaming through the measured window", str(gateway.streaming_calls), str(baseline.streaming_calls))
    row("measured window (s)", f"{gateway.window:.1f}", f"{baseline.window:.1f}")
    row("errors", str(len(gateway.errors)), str(len(baseline.errors)), "0")
    row("frames caller -> agent: sent", str(gateway.frames_sent), str(baseline.frames_sent))
    row("  reached the fake Ultravox", str(gateway.fake["frames_in"]), str(baseline.fake["frames_in"]))
    row("frames agent -> caller: echoed by the fake", str(gateway.fake["frames_out"]), str(baseline.fake["frames_out"]))
    row("  reached the caller", str(gateway.frames_echoed), str(baseline.frames_echoed))
    row("frames lost (sent, never echoed back)", str(gateway.lost), str(baseline.lost), "0")
    row("echoes out of order", str(gateway.mismatched), str(baseline.mismatched), "0")
    row("echoes late (> 60 ms after the frame's slot)", pct(gateway.late_echoes_window, gateway.frames_in_window),
        pct(baseline.late_echoes_window, baseline.frames_in_window))
    row("  whole run incl. ramp", pct(gateway.late_echoes, gateway.frames_sent),
        pct(baseline.late_echoes, baseline.frames_sent))
    if gateway.gateway_counters:
        c = gateway.gateway_counters
        row("gateway's counters: frames in / out",
            f"{c.get('caller_to_agent', 0):.0f}/{c.get('agent_to_caller', 0):.0f}", "-")
        row("  late frames / gaps / malformed",
            f"{c.get('late_frames', 0):.0f}/{c.get('gaps', 0):.0f}/{c.get('malformed', 0):.0f}", "-")
    for key in ("p50", "p99", "max"):
        row(f"round trip {key} (ms)", f"{gateway.rtt_ms[key]:.2f}", f"{baseline.rtt_ms[key]:.2f}")
    row("round trip p99, whole run incl. ramp (ms)", f"{gateway.rtt_all_p99_ms:.2f}", f"{baseline.rtt_all_p99_ms:.2f}")
    row("added latency p50 (ms)", f"{added['p50']:.2f}", "-")
    row("added latency p99 (ms)", f"{added['p99']:.2f}", "-",
        f"<= {TARGET_ADDED_P99_MS:g} ms: {verdict(added['p99'] <= TARGET_ADDED_P99_MS)}{caveat}")
    row("server CPU (ms per call-second)", f"{g_cpu:.3f}", f"{b_cpu:.3f}",
        f"<= {TARGET_CPU_RATIO:g} x baseline: {verdict(ratio <= TARGET_CPU_RATIO)} ({ratio:.2f} x)")
    row("  server busy (% of its one core)", f"{100 * g_busy:.0f}", f"{100 * b_busy:.0f}")
    row("fake Ultravox CPU (ms per call-second)", f"{gateway.per_call_second(gateway.fake_cpu):.3f}",
        f"{baseline.per_call_second(baseline.fake_cpu):.3f}")
    row("load generator CPU (ms per call-second)", f"{gateway.per_call_second(sum(gateway.load_cpu)):.3f}",
        f"{baseline.per_call_second(sum(baseline.load_cpu)):.3f}")
    row(f"  busiest of {len(gateway.load_cpu)} load processes (% of a core)",
        f"{100 * max(gateway.load_cpu) / gateway.window:.0f}", f"{100 * max(baseline.load_cpu) / baseline.window:.0f}")
    row("  caller send lag p50/p99 (ms)", f"{gateway.lag_ms['p50']:.2f}/{gateway.lag_ms['p99']:.2f}",
        f"{baseline.lag_ms['p50']:.2f}/{baseline.lag_ms['p99']:.2f}", "(the load generator's own delay)")
    row("  caller frames sent > 60 ms late", str(gateway.late_sends), str(baseline.late_sends), "0")
    row(f"machine busy (% of {cores} cores, /proc/stat)", f"{100 * gateway.machine_busy:.0f}",
        f"{100 * baseline.machine_busy:.0f}", f"< {100 * SATURATED:.0f} for conclusive latencies")
    print()
    print("  round trip: caller sends frame k -> caller receives the echo of frame k (matched by the frame number")
    print("  in its first two samples), through target and fake Ultravox, as the load generator's clock saw it; over")
    print(f"  the frames sent in the measured window ({gateway.frames_in_window} / {baseline.frames_in_window}).")
    print("  added latency = gateway round-trip percentile - baseline round-trip percentile (same load generator,")
    print("  same fake, same pacing; only the relay differs). CPU: utime+stime from /proc/<pid>/stat over the")
    print("  window, divided by the call-seconds streamed in it. The kept-up verdict needs no errors, no lost")
    print("  frames, <= 0.1 % late echoes in the window and the server below 90 % of its one core.")

    if saturated:
        print()
        print("!" * 78)
        print(f"!!! MACHINE NEAR SATURATION ({100 * gateway.machine_busy:.0f} % / {100 * baseline.machine_busy:.0f} % "
              f"of {cores} cores busy): server, fake and")
        print("!!! load generator queue for the CPU, so the round trips measure that contention more than the")
        print("!!! relay. Compare latencies at fewer --calls; the CPU figures stay valid.")
        print("!" * 78)
    for result in (gateway, baseline):
        if result.errors:
            print()
            print("!" * 78)
            print(f"!!! {result.name.upper()}: {len(result.errors)} ERROR(S) - its figures are not comparable")
            print("!" * 78)
            kinds: dict[str, int] = {}
            for error in result.errors:
                kind = re.sub(r"^call \d+: ", "", error)
                kind = re.sub(r"after \d+ frames", "after N frames", kind)
                kinds[kind] = kinds.get(kind, 0) + 1
            for error, count in sorted(kinds.items(), key=lambda item: -item[1])[:10]:
                print(f"  {count:>6} x {error}")


# =============================================================================================
# Entry points
# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls (default 200)")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per call, in seconds (default 20)")
    parser.add_argument("--carrier", choices=list(CARRIERS), default=DEFAULT_CARRIER,
                        help=f"carrier protocol (default {DEFAULT_CARRIER})")
    parser.add_argument("--load-processes", type=int, default=2,
                        help="load-generator processes sharing the calls (default 2)")
    args = parser.parse_args(argv)
    if args.seconds < RAMP_SECONDS + SETUP_MARGIN + 1:
        parser.error(f"--seconds must be at least {RAMP_SECONDS + SETUP_MARGIN + 1:g} (starts are spread over "
                     f"{RAMP_SECONDS:g} s, then everything is measured while all calls stream)")
    if args.seconds / FRAME_SECONDS >= 255 ** 2:
        parser.error("--seconds too large for the 2-sample frame numbers")
    if args.calls < 1 or args.load_processes < 1:
        parser.error("--calls and --load-processes must be positive")

    from gateway.testing import double

    # One double for the whole run: the gateway gets its credentials, the load processes a copy of
    # it (freeze_double), so credentials it generates (a signing key pair) are the same everywhere.
    carrier_double = double(args.carrier)
    carrier_double.environ(DEAD_API)  # generated now, if it generates any

    print(f"bridge-mode media benchmark: {args.calls} {CARRIERS[args.carrier].title} calls x {args.seconds:g} s "
          f"of 20 ms frames at {carrier_double.stream_rate} Hz, starts spread over {RAMP_SECONDS:g} s; "
          "the fake Ultravox echoes every frame")
    print(f"{stack()}; {os.cpu_count()} CPUs shared by server, fake Ultravox and "
          f"{args.load_processes} load-generator process(es)")

    children: list = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        try:
            results = []
            for name in ("gateway", "baseline"):
                results.append(measure(name, args, Path(tmp), children, carrier_double))
        except KeyboardInterrupt:
            print("\ninterrupted")
            return 130
        finally:
            for child in reversed(children):
                child.stop()
    report(args, *results)
    return 1 if any(result.errors for result in results) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fake"]:
        serve_fake(int(sys.argv[2]))
    elif sys.argv[1:2] == ["_relay"]:
        run_async(relay_main(int(sys.argv[2]), sys.argv[3]))
    elif sys.argv[1:2] == ["_load"]:
        load_main(sys.argv[2])
    else:
        sys.exit(main())
