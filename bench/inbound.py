"""Inbound webhook benchmark: the gateway against a minimal Starlette baseline.

    python bench/inbound.py [--carrier NAME] [--concurrency 100] [--requests 3000] [--warmup 200]
                            [--delay-ms 250] [--pool-size 100] [--workers 1 2] [--webhook] [--rate R]

Each target (the real `gateway serve`, then the baseline app below) runs in its own process
against its own fake Ultravox process, which answers every call after a fixed delay. The load
generator in this process sends one carrier's inbound webhooks (--carrier: any carrier of
gateway.carriers.CARRIERS, by default the registry's first), built and signed by the carrier's
test double (gateway.testing.double), on keep-alive connections, one in flight per connection,
and prints figures. It never asserts timings; it exits 1 only when requests failed.

--webhook adds a run of the gateway with one [[webhooks]] endpoint (a receiver process that
answers 204), so the events each call sends are written and delivered while the load runs.

The same file is also the entry point of the child processes (`_fake`, `_baseline`, `_receiver`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = os.path.abspath(__file__)  # children re-run this file, whatever the working directory
PUBLIC_URL = "https://bench.example.test"
CALLED_NUMBER = "+15550001111"
ULTRAVOX_KEY = "bench-ultravox-key"
DEAD_API = "http://127.0.0.1:9"  # carrier REST APIs: any call to one must fail fast, never leave loopback
# What a double's `connected_url` raises for an answer that connects nothing: no stream, or not
# the carrier's XML or JSON at all (XML's ParseError is a SyntaxError).
ANSWER_ERRORS = (ValueError, SyntaxError, AttributeError, KeyError, TypeError)

# Targets from the issue, printed next to the figures.
TARGET_OVERHEAD_P99_MS = 10.0
TARGET_THROUGHPUT_RATIO = 0.60



def registry() -> dict:
    """gateway.carriers.CARRIERS, imported only where needed: the baseline's process loads nothing
    of the carriers' (their libraries would be more objects for its garbage collector's full passes)."""
    from gateway.carriers import CARRIERS

    return CARRIERS


def default_carrier() -> str:
    return next(iter(registry()))  # the registry's first


def inbound_path(carrier: str) -> str:
    """Where the carrier posts (or gets) its inbound webhook: the gateway's /{carrier}/inbound."""
    return f"/{carrier}/inbound"


def gateway_variables() -> set[str]:
    """Variables the gateway reads (its own and every registered carrier's); removed from the
    children's environment so that a developer's own settings cannot change what is measured."""
    from gateway.settings import environment

    return {"GATEWAY_CONFIG", *environment()}


# =============================================================================================
# Child process: fake Ultravox
# =============================================================================================


def serve_fake(port: int, delay: float) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from gateway.testing import FakeUltravox

    # Validation off: it adds about a third to the fake's CPU, and the fake shares the machine with the server.
    fake = FakeUltravox(ULTRAVOX_KEY, validate=False)
    fake.delay = delay

    async def stats(request):
        return JSONResponse({
            "connections_seen": fake.connections_seen,
            "calls_created": fake.calls_created,
        })

    app = Starlette(routes=[Route("/_bench/stats", stats), Mount("/", app=fake.app)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# =============================================================================================
# Child process: baseline
# =============================================================================================


ANSWER_PLACEHOLDER = "wss://join.invalid/placeholder"


def serve_receiver(port: int) -> None:
    """The user's endpoint for events: counts deliveries, answers 204 (no verification: its CPU
    is not the gateway's)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    received = {"deliveries": 0, "ids": set()}

    async def event(request):
        await request.body()
        received["deliveries"] += 1
        received["ids"].add(request.headers.get("webhook-id"))
        return Response(status_code=204)

    async def stats(request):
        return JSONResponse({"deliveries": received["deliveries"], "unique": len(received["ids"])})

    app = Starlette(routes=[Route("/events", event, methods=["POST"]), Route("/_bench/stats", stats)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def baseline_answer(carrier: str) -> dict:
    """What the baseline answers with, worked out here (the baseline's process then loads nothing
    of the carrier's): the carrier's own connect answer, rendered once around a placeholder, so that
    each request only escapes its join URL into it (XML or JSON, by the answer's media type), since
    building the XML or JSON afresh would cost more than everything else the baseline does. It also
    gives the Ultravox medium, the answer's media type and the webhook's methods. A probe checks
    that the shortcut writes exactly what the carrier writes; if not ("head" None), the baseline
    builds every answer with the carrier."""
    from gateway.settings import load_settings

    speaker = registry()[carrier](load_settings(environ={}))  # none of its configuration is needed
    head, found, tail = speaker.connect_answer(ANSWER_PLACEHOLDER).partition(ANSWER_PLACEHOLDER)
    answer = {
        "carrier": carrier, "head": head, "tail": tail,
        "quoting": "json" if "json" in speaker.answer_media_type else "xml",
        "media_type": speaker.answer_media_type, "medium": speaker.ultravox_medium(),
        "methods": sorted({webhook_format.method for webhook_format in speaker.webhook_formats}),
    }
    probe = "wss://join.invalid/calls/c0ffee?a=1&b=<2>"
    if not found or answer_renderer(answer)(probe) != speaker.connect_answer(probe):
        answer["head"] = None
    return answer


def answer_renderer(answer: dict):
    """A function join URL -> the connect answer `baseline_answer` describes."""
    if answer["head"] is None:
        from gateway.settings import load_settings

        return registry()[answer["carrier"]](load_settings(environ={})).connect_answer
    head, tail = answer["head"], answer["tail"]
    if answer["quoting"] == "json":
        def render(url: str) -> str:
            return head + json.dumps(url)[1:-1] + tail
    else:
        from xml.sax.saxutils import escape

        def render(url: str) -> str:  # join URLs contain "&"; valid in attributes and text alike
            return head + escape(url, {'"': "&quot;"}) + tail
    return render


def baseline_app(fake_url: str, agent_id: str, pool_size: int, answer: dict):
    """The least a webhook handler can do: read the body, create the call, answer with the carrier's
    connect answer (see `baseline_answer`)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from gateway.settings import UltravoxSettings
    from gateway.ultravox import create_http_client

    render, medium, media_type = answer_renderer(answer), answer["medium"], answer["media_type"]
    # The gateway's own client factory, so both sides use the same pool limits, headers and timeouts.
    http = create_http_client(UltravoxSettings(api_key=ULTRAVOX_KEY, base_url=fake_url, pool_size=pool_size))
    path = f"/api/agents/{agent_id}/calls"

    async def inbound(request):
        await request.body()
        created = await http.post(path, json={"medium": medium})
        return Response(render(created.json()["joinUrl"]), media_type=media_type)

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await http.aclose()

    return Starlette(
        routes=[Route(inbound_path(answer["carrier"]), inbound, methods=answer["methods"]),
                Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def serve_baseline(port: int, fake_url: str, agent_id: str, pool_size: int, answer: dict) -> None:
    import uvicorn

    # uvicorn.run's defaults, exactly as `gateway serve` calls it (loop and http "auto": uvloop and
    # httptools when installed), so the server stack is the same on both sides.
    uvicorn.run(
        baseline_app(fake_url, agent_id, pool_size, answer),
        host="127.0.0.1", port=port, log_level="warning", proxy_headers=False,
    )


# =============================================================================================
# Process management
# =============================================================================================


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # If the bench itself is killed with SIGKILL, its finally blocks never run: let Linux end the
    # children instead of leaving servers behind.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Child:
    """A server process with its output in a file, reachable on 127.0.0.1:port."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str],
                 cwd: Path | None = None):
        self.name = name
        self.port = port
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal reaches only the bench, which stops children in order.
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.output()}")
                time.sleep(0.05)

    def get_json(self, path: str) -> dict:
        import httpx

        return httpx.get(self.url + path, timeout=5.0, trust_env=False).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    variables = gateway_variables()
    env = {k: v for k, v in os.environ.items() if k not in variables}
    # Everything is on loopback; a developer's HTTP(S)_PROXY must not be used by httpx.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name (field 2) may contain spaces; the fields after its ")" are fixed.
            return handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its child processes (`--workers`), all threads included
    (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = _stat(pid)
    if fields is None:  # the process died; its failures are reported instead
        return math.nan
    total = int(fields[11]) + int(fields[12])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (child := _stat(int(entry))) is not None and child[1] == str(pid):
            total += int(child[11]) + int(child[12])
    return total / os.sysconf("SC_CLK_TCK")


# =============================================================================================
# Load generator
# =============================================================================================


def build_requests(carrier_double, count: int, port: int) -> list[bytes]:
    """Webhooks as the carrier sends them (its double's `inbound_request`: method, signature or
    credentials, body or query), built before the clock starts so that signing costs the client nothing."""
    path = inbound_path(carrier_double.name)
    requests = []
    for _ in range(count):
        form = carrier_double.inbound_form(to=CALLED_NUMBER)  # a new call id each
        webhook = carrier_double.inbound_request(PUBLIC_URL, path, form)
        target = f"{path}?{webhook.query}" if webhook.query else path
        headers = {"Host": f"127.0.0.1:{port}", **webhook.headers}
        if webhook.body or webhook.method != "GET":
            headers["Content-Length"] = str(len(webhook.body))
        head = f"{webhook.method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        requests.append((head + "\r\n").encode("latin-1") + webhook.body)
    return requests


def connects(carrier_double):
    """A check of an answer's body: does it connect the call to a stream, as the carrier reads it?"""
    def check(body: bytes) -> bool:
        try:
            url, _ = carrier_double.connected_url(body.decode())
        except ANSWER_ERRORS:
            return False
        return url.startswith(("ws://", "wss://"))

    return check


@dataclasses.dataclass
class Phase:
    latencies: list[float] = dataclasses.field(default_factory=list)  # seconds, successes only
    failures: list[str] = dataclasses.field(default_factory=list)
    wall: float = 0.0
    peak_upstream: int = 0  # most connections open to the fake at one sampling instant


def open_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port`, counted on the listening side."""
    suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, _, state = line.split(None, 4)[1:4]
            if state == "01" and local.endswith(suffix):
                count += 1
    return count


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response; raw streams keep client CPU low."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # last chunk's CRLF (no trailers expected)
        body = b"".join(parts)
    else:
        body = await reader.read()  # delimited by the connection closing
        return status, body, False
    return status, body, headers.get("connection", "").lower() != "close"


async def run_load(
    port: int, requests: list[bytes], concurrency: int, upstream_port: int, stagger: float, connected,
    timeout: float = 30.0, rate: float | None = None,
) -> Phase:
    """`concurrency` workers, each sending back-to-back on its own keep-alive connection.

    Worker i starts i * `stagger` seconds late. Started together, workers that all wait the same
    fake delay would stay in lockstep and hit the server in bursts of `concurrency` requests,
    which carriers' webhooks (one per ringing call) do not; the burst would then be measured as
    overhead. `connected(body)` tells a successful answer.

    With `rate`, request n is due n / rate seconds after the start instead (an open loop: calls
    arrive whether or not the gateway keeps up), sent by the first free worker; its latency counts
    from when it was due, so a request that waited for a free worker counts that wait too.
    """
    phase = Phase()
    queue = iter(enumerate(requests))  # one event loop: workers can share a plain iterator
    begun = time.perf_counter()

    async def worker(index: int) -> None:
        if rate is None:
            await asyncio.sleep(index * stagger)
        reader = writer = None
        for number, request in queue:
            started = time.perf_counter()
            if rate is not None:
                started = begun + number / rate
                await asyncio.sleep(max(0.0, started - time.perf_counter()))
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)  # one small request in flight: no need to drain
                status, body, keep_alive = await asyncio.wait_for(read_response(reader), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ValueError) as error:
                phase.failures.append(f"{type(error).__name__}: {error}"[:200])
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            elapsed = time.perf_counter() - started
            if status == 200 and connected(body):
                phase.latencies.append(elapsed)
            else:
                phase.failures.append(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            if not keep_alive:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def sample_upstream() -> None:
        # The fake counts distinct connections over the run; this catches how many were open at once.
        while True:
            phase.peak_upstream = max(phase.peak_upstream, open_connections(upstream_port))
            await asyncio.sleep(0.25)  # reading /proc/net/tcp is not free; pooled connections live long

    sampler = asyncio.create_task(sample_upstream())
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    phase.wall = time.perf_counter() - begun
    sampler.cancel()
    return phase


# =============================================================================================
# One run: a target, its fake, warm-up, measured phase
# =============================================================================================


@dataclasses.dataclass
class Result:
    name: str
    requests: int
    failures: list[str]
    throughput: float
    latency_ms: dict[str, float]
    overhead_ms: dict[str, float]
    server_cpu_ms: float
    fake_cpu_ms: float
    client_cpu_ms: float
    connections_seen: int
    peak_upstream: int
    calls_created: int
    events: dict | None = None  # --webhook: what the receiver got, and the server's CPU until then



def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = math.ceil(fraction * len(sorted_values))  # nearest rank
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


BENCH_WEBHOOK_SECRET = "whsec_" + "QmVuY2hXZWJob29rU2VjcmV0S2V5MDEyMzQ1Njc4OQ=="


def start_gateway(workdir: Path, fake: Child, agent_id: str, pool_size: int, database_url: str | None,
                  carrier_double, workers: int = 1, webhook_url: str | None = None, source: Path | None = None,
                  name: str = "gateway", inline_deliveries: bool = False) -> Child:
    """`gateway serve` on a free port; `source`: the gateway's code from that directory (another
    revision's tree) instead of the installed one; `inline_deliveries`: the server process sends the
    events itself ([events] delivery_process = false) instead of its delivery process."""
    config = workdir / "gateway.toml"
    webhook = (f'\n[[webhooks]]\nname = "bench"\nurl = "{webhook_url}"\nsecret = "{BENCH_WEBHOOK_SECRET}"\n'
               if webhook_url else "")
    if inline_deliveries:
        webhook += "\n[events]\ndelivery_process = false\n"
    config.write_text(
        f'[ultravox]\npool_size = {pool_size}\n\n[[routes]]\nnumber = "{CALLED_NUMBER}"\nagent_id = "{agent_id}"\n'
        + webhook + carrier_double.config_toml()
    )
    port = free_port()
    env = child_env({
        "GATEWAY_PUBLIC_URL": PUBLIC_URL,
        "GATEWAY_DATABASE_URL": database_url or f"sqlite:///{workdir / 'bench.db'}",
        "ULTRAVOX_API_KEY": ULTRAVOX_KEY,
        "ULTRAVOX_BASE_URL": fake.url,
        # The double's credentials: the ones it signs the webhooks with.
        **carrier_double.environ(DEAD_API),
        **({"PYTHONPATH": str(source)} if source else {}),
    })
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port),
            "--log-level", "warning", "--workers", str(workers)]
    return Child(name, argv, port, workdir, env, cwd=source)


def start_baseline(workdir: Path, fake: Child, agent_id: str, pool_size: int, carrier: str) -> Child:
    port = free_port()
    argv = [sys.executable, HERE, "_baseline", str(port), fake.url, agent_id, str(pool_size),
            json.dumps(baseline_answer(carrier))]
    return Child("baseline", argv, port, workdir, child_env())


def measure(name: str, args, workdir: Path, children: list[Child], carrier_double) -> Result:
    agent_id = str(uuid.uuid4())
    fake_port = free_port()
    fake = Child(f"fake-for-{name}", [sys.executable, HERE, "_fake", str(fake_port), str(args.delay_ms / 1000)],
                 fake_port, workdir, child_env())
    children.append(fake)
    fake.wait_ready("/_bench/stats")
    receiver = None
    if name.startswith("gateway+webhook"):
        receiver_port = free_port()
        receiver = Child("receiver", [sys.executable, HERE, "_receiver", str(receiver_port)], receiver_port, workdir,
                         child_env())
        children.append(receiver)
        receiver.wait_ready("/_bench/stats")
        server = start_gateway(workdir, fake, agent_id, args.pool_size, args.database_url, carrier_double,
                               webhook_url=receiver.url + "/events", inline_deliveries=name.endswith("inline"))
    elif name.startswith("gateway"):
        workers = int(name.partition("x")[2] or 1)
        server = start_gateway(workdir, fake, agent_id, args.pool_size, args.database_url, carrier_double, workers)
    else:
        server = start_baseline(workdir, fake, agent_id, args.pool_size, carrier_double.name)
    children.append(server)
    server.wait_ready("/healthz")

    warmup = build_requests(carrier_double, args.warmup, server.port)
    measured = build_requests(carrier_double, args.requests, server.port)
    connected = connects(carrier_double)
    # Spread the workers' first requests over one fake delay (see run_load).
    stagger = args.delay_ms / 1000 / args.concurrency
    warm = run_async(run_load(server.port, warmup, args.concurrency, fake.port, stagger, connected, rate=args.rate))
    if warm.failures:
        print(f"  {name}: {len(warm.failures)} warm-up request(s) failed, first: {warm.failures[0]}")

    server_cpu, fake_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds(fake.pid), time.process_time()
    cpu_before = server_cpu
    phase = run_async(run_load(server.port, measured, args.concurrency, fake.port, stagger, connected, rate=args.rate))
    server_cpu = cpu_seconds(server.pid) - server_cpu
    fake_cpu = cpu_seconds(fake.pid) - fake_cpu
    client_cpu = time.process_time() - client_cpu

    stats = fake.get_json("/_bench/stats")
    events = None
    if receiver is not None:
        # Deliveries still owed after the load: the server's CPU until the last one counts too.
        events = drained(receiver, expected=2 * (args.warmup + args.requests))  # call.started, status_changed
        events["server_cpu_ms_with_deliveries"] = (cpu_seconds(server.pid) - cpu_before) * 1000 / max(1, args.requests)
    server.stop()
    fake.stop()

    delay = args.delay_ms / 1000
    latencies = sorted(phase.latencies)
    per_request = 1000 / max(1, args.requests)
    return Result(
        name=name,
        requests=args.requests,
        failures=phase.failures,
        throughput=args.requests / phase.wall,
        latency_ms={k: 1000 * percentile(latencies, f) for k, f in (("p50", 0.50), ("p99", 0.99), ("max", 1.0))},
        overhead_ms={k: 1000 * (percentile(latencies, f) - delay) for k, f in (("p50", 0.50), ("p99", 0.99))},
        server_cpu_ms=server_cpu * per_request,
        fake_cpu_ms=fake_cpu * per_request,
        client_cpu_ms=client_cpu * per_request,
        connections_seen=stats["connections_seen"],
        peak_upstream=max(warm.peak_upstream, phase.peak_upstream),
        calls_created=stats["calls_created"],
        events=events,
    )


def drained(receiver: Child, expected: int, timeout: float = 60.0) -> dict:
    """Wait for the receiver to have `expected` events (the deliveries still owed after the load)."""
    started = time.monotonic()
    while True:
        stats = receiver.get_json("/_bench/stats")
        if stats["unique"] >= expected or time.monotonic() - started > timeout:
            return {**stats, "expected": expected, "drain_seconds": time.monotonic() - started}
        time.sleep(0.1)


def run_async(coroutine):
    # uvloop, when installed, keeps the load generator's own CPU use down.
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:  # asyncio.run has loop_factory only from 3.12
        return runner.run(coroutine)


# =============================================================================================
# Report
# =============================================================================================


def server_stack() -> str:
    import uvicorn

    def installed(module: str) -> bool:
        try:
            __import__(module)
        except ImportError:
            return False
        return True

    loop = "uvloop" if installed("uvloop") else "asyncio"
    http = "httptools" if installed("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__}, loop={loop}, http={http} (uvicorn's 'auto' choice, both targets)"


def report(args, gateway: Result, baseline: Result) -> None:
    def row(label: str, g: str, b: str, target: str = "") -> None:
        print(f"  {label:<32}{g:>12}{b:>12}   {target}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    overhead_ok = gateway.overhead_ms["p99"] <= TARGET_OVERHEAD_P99_MS
    ratio = gateway.throughput / baseline.throughput
    pool_ok = gateway.peak_upstream <= args.pool_size

    print()
    row("", "gateway", "baseline", "target (gateway)")
    row("requests", str(gateway.requests), str(baseline.requests))
    row("failures", str(len(gateway.failures)), str(len(baseline.failures)), "0")
    row("throughput (req/s)", f"{gateway.throughput:.0f}", f"{baseline.throughput:.0f}")
    for key in ("p50", "p99", "max"):
        row(f"latency {key} (ms)", f"{gateway.latency_ms[key]:.1f}", f"{baseline.latency_ms[key]:.1f}")
    row("overhead p50 (ms)", f"{gateway.overhead_ms['p50']:.1f}", f"{baseline.overhead_ms['p50']:.1f}")
    row("overhead p99 (ms)", f"{gateway.overhead_ms['p99']:.1f}", f"{baseline.overhead_ms['p99']:.1f}",
        f"<= {TARGET_OVERHEAD_P99_MS:.0f} ms at {args.concurrency} concurrent: {verdict(overhead_ok)}")
    row("server CPU (ms/req)", f"{gateway.server_cpu_ms:.2f}", f"{baseline.server_cpu_ms:.2f}")
    row("fake Ultravox CPU (ms/req)", f"{gateway.fake_cpu_ms:.2f}", f"{baseline.fake_cpu_ms:.2f}")
    row("load generator CPU (ms/req)", f"{gateway.client_cpu_ms:.2f}", f"{baseline.client_cpu_ms:.2f}")
    row("connections the fake saw", str(gateway.connections_seen), str(baseline.connections_seen),
        "(distinct, over the run)")
    row("  most open at once (sampled)", str(gateway.peak_upstream), str(baseline.peak_upstream),
        f"<= pool size {args.pool_size}: {verdict(pool_ok)}")
    row("calls the fake created", str(gateway.calls_created), str(baseline.calls_created),
        f"= warm-up + requests = {args.warmup + args.requests}")
    print()
    print(f"  gateway/baseline throughput: {100 * ratio:.0f} %   target >= {100 * TARGET_THROUGHPUT_RATIO:.0f} %: "
          f"{verdict(ratio >= TARGET_THROUGHPUT_RATIO)}")
    print("  (overhead = latency - fake delay; CPU from /proc/<pid>/stat over the measured phase;"
          " connections include warm-up)")

    for result in (gateway, baseline):
        if result.failures:
            print()
            print("!" * 78)
            print(f"!!! {result.name.upper()}: {len(result.failures)} OF {result.requests} REQUESTS FAILED"
                  " - its figures are not comparable")
            print("!" * 78)
            kinds: dict[str, int] = {}
            for failure in result.failures:
                kinds[failure] = kinds.get(failure, 0) + 1
            for failure, count in sorted(kinds.items(), key=lambda item: -item[1])[:10]:
                print(f"  {count:>6} x {failure}")


# =============================================================================================
# Entry points
# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carrier", choices=list(registry()), default=default_carrier(),
                        help=f"whose inbound webhooks to send (default {default_carrier()})")
    parser.add_argument("--concurrency", type=int, default=100, help="webhooks in flight (default 100)")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per target (default 3000)")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted requests first (default 200)")
    parser.add_argument("--delay-ms", type=float, default=250,
                        help="fake Ultravox answer delay (default 250, near a real call creation)")
    parser.add_argument("--pool-size", type=int, default=100, help="[ultravox] pool_size (default 100)")
    parser.add_argument("--database-url", help="the gateway's store (default: SQLite in a temporary directory)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="`gateway serve --workers` counts to measure, each in turn (default 1)")
    parser.add_argument("--webhook", action="store_true",
                        help="also measure the gateway with one [[webhooks]] endpoint receiving every event")
    parser.add_argument("--inline-deliveries", action="store_true",
                        help="with --webhook, also measure the server process sending the events itself "
                             "([events] delivery_process = false)")
    parser.add_argument("--rate", type=float,
                        help="send webhooks at this many per second (an open loop; at most --concurrency in "
                             "flight) instead of back-to-back: the overhead at a load the gateway carries")
    args = parser.parse_args(argv)

    from gateway.testing import double

    # One double for the whole run: the gateway is configured with the credentials it signs with
    # (including any it generates, like a signing key pair).
    carrier_double = double(args.carrier)

    print(f"inbound webhook benchmark: {args.requests} {registry()[args.carrier].title} webhooks "
          f"(+{args.warmup} warm-up) per target, "
          f"concurrency {args.concurrency}, fake Ultravox delay {args.delay_ms:g} ms, pool size {args.pool_size}")
    print(f"server: {server_stack()}; {os.cpu_count()} CPUs shared by servers, fakes and load generator")
    delay = args.delay_ms / 1000
    print(f"ceiling set by the delay alone: {args.concurrency / delay:.0f} req/s; workers send back-to-back, so "
          f"overhead p99 <= {TARGET_OVERHEAD_P99_MS:g} ms needs about "
          f"{args.concurrency / (delay + TARGET_OVERHEAD_P99_MS / 1000):.0f} req/s")

    children: list[Child] = []
    # SIGTERM takes the same way out as Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="bench-inbound-") as tmp:
        try:
            names = [f"gateway x{count}" if count > 1 else "gateway" for count in args.workers]
            if args.webhook:
                names.append("gateway+webhook")
                if args.inline_deliveries:
                    names.append("gateway+webhook inline")
            results = [measure(name, args, Path(tmp), children, carrier_double) for name in (*names, "baseline")]
        except KeyboardInterrupt:
            print("\ninterrupted")
            return 130
        finally:
            for child in children:
                child.stop()
    report(args, results[0], results[-1])
    if len(args.workers) > 1:
        report_workers(args, results[:len(args.workers)])
    if args.webhook:
        report_webhook(results[0], [result for result in results if result.name.startswith("gateway+webhook")])
    return 1 if any(result.failures for result in results) else 0


def report_webhook(plain: Result, hooked: list[Result]) -> None:
    """The runs with one endpoint next to the plain one: `hooked` is the delivery process's run,
    then (--inline-deliveries) the server process's own."""
    labels = {"gateway+webhook": "delivery process", "gateway+webhook inline": "inline"}
    print()
    print("  one [[webhooks]] endpoint: every call writes call.started and call.status_changed, delivered meanwhile")
    print(f"  {'':<28}{'no webhook':>14}" + "".join(f"{labels[r.name]:>18}{'ratio':>8}" for r in hooked))
    for label, figure in (
        ("throughput req/s", lambda r: r.throughput),
        ("overhead p50 ms", lambda r: r.overhead_ms["p50"]),
        ("overhead p99 ms", lambda r: r.overhead_ms["p99"]),
        ("server CPU ms/req", lambda r: r.server_cpu_ms),
    ):
        base = figure(plain)
        print(f"  {label:<28}{base:>14.2f}" + "".join(
            f"{figure(r):>18.2f}{figure(r) / base if base else float('nan'):>7.2f}x" for r in hooked))
    for result in hooked:
        events = result.events or {}
        if events:
            print(f"  {labels[result.name]}: CPU ms/req until every event is delivered "
                  f"{events['server_cpu_ms_with_deliveries']:.2f}; events received {events['unique']} of "
                  f"{events['expected']} ({events['deliveries']} deliveries), the last "
                  f"{events['drain_seconds']:.1f} s after the load ended")


def report_workers(args, gateways: list[Result]) -> None:
    first = gateways[0]
    print()
    print(f"  {'gateway serve --workers':<26}{'req/s':>10}{'vs first':>10}{'p99 ms':>10}{'CPU ms/req':>12}{'failures':>10}")
    for count, result in zip(args.workers, gateways):
        print(f"  {count:<26}{result.throughput:>10.0f}{result.throughput / first.throughput:>9.2f}x"
              f"{result.latency_ms['p99']:>10.1f}{result.server_cpu_ms:>12.2f}{len(result.failures):>10}")
    print(f"  (one run, one after the other; {os.cpu_count()} CPUs shared with the fake and the load generator)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fake"]:
        serve_fake(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1:2] == ["_receiver"]:
        serve_receiver(int(sys.argv[2]))
    elif sys.argv[1:2] == ["_baseline"]:
        serve_baseline(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6]))
    else:
        sys.exit(main())
