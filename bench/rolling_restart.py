"""Rolling restart benchmark: two replicas behind HAProxy carrying bridged calls, replaced one by one.

    python bench/rolling_restart.py [--calls 50] [--carrier NAME] [--drain-seconds 3] [--database-url URL]

Two `gateway serve` replicas (and a spare slot for their replacements, as a Deployment with
maxSurge 1 has) run behind HAProxy on one store (PostgreSQL when --database-url names one, else
SQLite in a temporary directory), with one bridge-mode route, against a fake Ultravox process that
echoes every frame. This process plays the carrier for `--calls` calls through the load balancer:
the signed inbound webhook, the media stream of the answer, 20 ms frames in real time, the echo
back; and, as the carrier's REST API (the carrier's fake, in this process), it moves a call when
the gateway asks (fetches the handover URL through the load balancer, ends the old stream, opens
the new one).

The restart: start a replacement, SIGTERM the first replica (it drains `--drain-seconds`, then
hands its calls over), wait for it to exit; the same for the second. A call is **cut** when its
stream closes without the carrier having been asked to move it, when the gateway hangs it up,
or when its audio stops for more than 3 s. Figures are printed, never asserted; the exit status
is 1 when a call was cut or a replica did not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inbound import Child, child_env, free_port  # noqa: E402  (a sibling bench: its process helpers)

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_URL = "https://bench.example.test"
BRIDGED_NUMBER = "+15550005555"
ULTRAVOX_KEY = "bench-ultravox-key"
SILENCE_IS_A_CUT_SECONDS = 3.0
CHUNK_SECONDS = 0.2


@dataclass
class CallStats:
    index: int
    carrier_call_id: str = ""
    handovers: int = 0
    gaps: list[float] = field(default_factory=list)  # last echo on the old stream -> first on the new
    cut: str | None = None
    echoed_bytes: int = 0


def tone(rate: int, seconds: float) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 330 * t) * 6000).astype("<i2").tobytes()


class Bench:
    def __init__(self, args, workdir: Path):
        from gateway.testing import double

        self.args = args
        self.workdir = workdir
        self.double = double(args.carrier)
        self.fake_carrier = self.double.fake_api()
        self.stop = asyncio.Event()
        self.stats: list[CallStats] = []

    # --- the carrier's side of one call ---------------------------------------------------------------
    async def call(self, index: int, lb_url: str, http: httpx.AsyncClient) -> None:
        from gateway.testing import CarrierStream

        stats = CallStats(index)
        self.stats.append(stats)
        form = self.double.inbound_form(to=BRIDGED_NUMBER, **{})
        stats.carrier_call_id = call_id = form[self.double.call_id_param]
        self.fake_carrier.live_calls.add(call_id)
        request = self.double.inbound_request(PUBLIC_URL, f"/{self.args.carrier}/inbound", form)
        target = f"{lb_url}/{self.args.carrier}/inbound" + (f"?{request.query}" if request.query else "")
        response = await http.request(request.method, target, content=request.body, headers=request.headers)
        local = lb_url.replace("http", "ws")

        async def open_stream(answer: str) -> CarrierStream:
            url, _ = self.double.connected_url(answer)
            stream = CarrierStream(self.args.carrier, url.replace(PUBLIC_URL.replace("https", "wss"), local),
                                   headers=self.double.stream_headers(url),
                                   parameters=self.double.stream_parameters(answer))
            await stream.connect()
            await stream.start(call_id=call_id)
            return stream

        stream = await open_stream(response.text)
        audio = tone(stream.rate, CHUNK_SECONDS)
        moves_seen = 0
        last_echo = time.monotonic()
        while not self.stop.is_set():
            moves = [u for u in self.fake_carrier.updates if u.call_id == call_id]
            hung_up = [u for u in moves if self.double.redirect_url(u) is None]
            if hung_up:
                stats.cut = "the gateway hung the call up"
                break
            if len(moves) > moves_seen:
                moves_seen = len(moves)
                before = stream.received[-1].at if stream.received else time.monotonic()
                answer = await asyncio.to_thread(self.fake_carrier.callback, self.double.redirect_url(moves[-1]),
                                                 self.fake_carrier.form_for(call_id))
                stats.echoed_bytes += len(stream.agent_audio())
                await stream.stop()
                await stream.close()
                stream = await open_stream(answer.text)
                stats.handovers += 1
                await stream.play(audio)
                await self._first_echo(stream)
                first = next((m.at for m in stream.received if m.kind == "audio"), time.monotonic())
                stats.gaps.append(first - before)
                last_echo = time.monotonic()
                continue
            if stream.closed.is_set():
                stats.cut = f"the stream closed ({stream.close_code}) without a handover"
                break
            await stream.play(audio)
            if stream.received and stream.received[-1].kind == "audio":
                last_echo = max(last_echo, stream.received[-1].at)
            if time.monotonic() - last_echo > SILENCE_IS_A_CUT_SECONDS:
                stats.cut = f"no audio for {SILENCE_IS_A_CUT_SECONDS:g} s"
                break
        stats.echoed_bytes += len(stream.agent_audio())
        with_suppressed = stream.stop() if not stream.closed.is_set() else asyncio.sleep(0)
        try:
            await with_suppressed
            await stream.close()
        except Exception:
            pass

    @staticmethod
    async def _first_echo(stream) -> None:
        deadline = time.monotonic() + SILENCE_IS_A_CUT_SECONDS
        while not any(m.kind == "audio" for m in stream.received) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def database(args, workdir: Path) -> tuple[str, callable]:
    if args.database_url:
        return args.database_url, lambda: None
    return f"sqlite:///{workdir / 'rolling.db'}", lambda: None


async def run(args, workdir: Path) -> int:
    from gateway.testing import ServerThread
    from gateway.testing.processes import Backend, GatewayProcess, LoadBalancer, haproxy_path

    if haproxy_path() is None:
        print("HAProxy is not installed (Debian: apt-get install haproxy)", file=sys.stderr)
        return 2
    bench = Bench(args, workdir)
    carrier_server = ServerThread(bench.fake_carrier.app).start()
    bench.fake_carrier.public_url = PUBLIC_URL
    fake_port = free_port()
    fake = Child("fake-ultravox", [sys.executable, os.path.join(HERE, "bridge.py"), "_fake", str(fake_port)],
                 fake_port, workdir, child_env())
    fake.wait_ready("/_bench/stats")
    database_url, _ = database(args, workdir)
    config = workdir / "gateway.toml"
    config.write_text(
        f"[gateway]\ndrain_seconds = {args.drain_seconds}\n\n[[routes]]\nnumber = \"{BRIDGED_NUMBER}\"\n"
        f"agent_id = \"00000000-0000-4000-8000-000000000000\"\nmode = \"bridge\"\n\n" + bench.double.config_toml()
    )
    environ = child_env({
        "GATEWAY_PUBLIC_URL": PUBLIC_URL, "GATEWAY_DATABASE_URL": database_url,
        "ULTRAVOX_API_KEY": ULTRAVOX_KEY, "ULTRAVOX_BASE_URL": fake.url,
        **bench.double.environ(carrier_server.url),
    })
    slots = [free_port() for _ in range(3)]
    balancer = LoadBalancer([Backend(f"slot{i}", "127.0.0.1", port) for i, port in enumerate(slots)], work_dir=workdir)

    generation = 0

    def replica(slot: int) -> GatewayProcess:
        nonlocal generation
        generation += 1
        return GatewayProcess(config, environ, work_dir=workdir, name=f"replica{generation}", port=slots[slot],
                              extra_args=["--log-level", "warning"]).start()

    running = {0: replica(0), 1: replica(1)}
    for process in running.values():
        process.wait_ready()
    balancer.start(wait_for_up=False)
    bench.fake_carrier.deliver_to = balancer.url
    exits: list[tuple[str, int, float]] = []
    async with httpx.AsyncClient(timeout=15) as http:
        # Calls spread over both replicas by the balancer's round robin.
        calls = [asyncio.create_task(bench.call(i, balancer.url, http)) for i in range(args.calls)]
        await asyncio.sleep(3)
        free = 2
        for old in (0, 1):  # replace each replica in turn: the new one first, then drain the old
            running[free] = replica(free)
            await asyncio.to_thread(running[free].wait_ready)
            await asyncio.sleep(1.0)  # HAProxy's health check sees it up
            process = running.pop(old)
            started = time.monotonic()
            process.terminate()
            code = await asyncio.to_thread(process.wait, args.drain_seconds + 60)
            exits.append((process.name, code, time.monotonic() - started))
            free = old
            await asyncio.sleep(2)
        await asyncio.sleep(2)
        bench.stop.set()
        await asyncio.gather(*calls, return_exceptions=True)
    for process in running.values():
        process.close()
    balancer.close()
    fake.stop()
    carrier_server.stop()
    return report(args, bench, exits)


def report(args, bench: Bench, exits) -> int:
    cut = [s for s in bench.stats if s.cut]
    gaps = sorted(g for s in bench.stats for g in s.gaps)
    handed = sum(s.handovers for s in bench.stats)
    print()
    print(f"rolling restart: {args.calls} bridged {args.carrier} calls, 2 replicas replaced one by one, "
          f"drain_seconds {args.drain_seconds:g}")
    for name, code, seconds in exits:
        print(f"  {name}: exit {code} after {seconds:.1f} s (SIGTERM to exit)")
    print(f"  calls: {len(bench.stats)}  handovers: {handed}  calls cut: {len(cut)}")
    if gaps:
        print(f"  silence per handover (last echo on the old stream -> first on the new): "
              f"p50 {1000 * statistics.median(gaps):.0f} ms, "
              f"p99 {1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]:.0f} ms, "
              f"max {1000 * gaps[-1]:.0f} ms")
    for s in cut[:10]:
        print(f"  CUT call {s.index}: {s.cut}")
    return 1 if cut or any(code != 0 for _, code, _ in exits) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--carrier", default="twilio", help="a carrier that can move a live call (twilio, telnyx, plivo)")
    parser.add_argument("--drain-seconds", type=float, default=3.0)
    parser.add_argument("--database-url", help="the replicas' shared store (default: SQLite in a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rolling-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
