"""Genuine webhooks during a flood of forged ones: this tree's gateway next to another revision's.

    python bench/flood.py [--carrier NAME] [--before REF] [--senders 64] [--seconds 8]
                          [--genuine-every-ms 100] [--flood-kbps 850] [--delay-ms 20]

Each target (`gateway serve` from git revision --before, by default main, extracted with
`git archive` into a temporary directory; then this tree's) runs in its own process against
its own fake Ultravox process (bench/inbound.py's). For each target the load generator first
sends genuine signed inbound webhooks alone, one after the other (quiet), then again while
--senders connections post (--flood-kbps in all, 850 KB/s by default as in the issue; 0: back-to-back)
inbound webhooks whose signature does not match: the issue's 9000-field form, the largest forms the
older revision parses (256 fields, 60 KB), then forms within this tree's per-carrier limits
(carrier.webhook_max_fields / webhook_max_bytes), which both accept to parse.
It prints the genuine webhooks' latency and outcome for each phase, side by side. It never
asserts timings; it exits 1 only when the bench itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inbound as bench  # noqa: E402  (bench/inbound.py: processes, raw HTTP, percentiles)

ROOT = Path(__file__).resolve().parent.parent
# The largest forged form the older revision parses and verifies (its limits: 256 fields and the
# gateway's max_body_bytes, 64 KiB by default), and one within this tree's per-carrier limits.
FLOODS = {"the issue's form": (9000, 49_000), "older revision's limits": (256, 60_000),
          "this tree's limits": (None, None)}


def forged(carrier_double, port: int, fields: int, size: int) -> bytes:
    """A raw inbound webhook of `fields` fields (`size` bytes in all) whose signature is that of
    another form: as costly as the carrier's check can be made, and refused by it."""
    form = carrier_double.inbound_form(to=bench.CALLED_NUMBER)
    filler = max(0, (size - 400) // max(1, fields - len(form)) - 7)
    for index in range(fields - len(form)):
        form[f"{index:04x}"] = secrets.token_hex(filler // 2 + 1)[:filler]
    path = bench.inbound_path(carrier_double.name)
    webhook = carrier_double.inbound_request(bench.PUBLIC_URL, path, form)
    other = carrier_double.inbound_request(bench.PUBLIC_URL, path, {**form, "0000": "forged"})
    headers = {"Host": f"127.0.0.1:{port}", **other.headers, "Content-Length": str(len(webhook.body))}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + webhook.body


@dataclasses.dataclass
class Phase:
    latencies: list[float] = dataclasses.field(default_factory=list)  # genuine webhooks connected
    not_connected: int = 0  # genuine webhooks answered with anything else (the apology) or failed
    forged_answered: int = 0
    forged_statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    forged_shape: str = ""  # fields and bytes of the forged request
    wall: float = 0.0
    server_cpu: float = 0.0

    def row(self, name: str) -> str:
        latencies = sorted(self.latencies)
        p50, p99, top = (1000 * bench.percentile(latencies, f) for f in (0.5, 0.99, 1.0))
        statuses = ",".join(f"{code}x{count}" for code, count in sorted(self.forged_statuses.items())) or "-"
        rate = self.forged_answered / self.wall if self.wall else 0.0
        return (f"  {name:<50}{p50:>9.1f}{p99:>9.1f}{top:>9.1f}{len(self.latencies):>7}{self.not_connected:>6}"
                f"{rate:>9.0f}{100 * self.server_cpu / max(self.wall, 1e-9):>7.0f}%   {statuses}")


async def genuine_loop(port: int, requests: list[bytes], every: float, connected, phase: Phase,
                       stop: asyncio.Event) -> None:
    """One genuine webhook at a time, `every` seconds apart, each on a fresh connection (a new call)."""
    for request in requests:
        if stop.is_set():
            return
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status, body, _ = await asyncio.wait_for(bench.read_response(reader), 30)
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            phase.not_connected += 1
        else:
            if status == 200 and connected(body):
                phase.latencies.append(time.perf_counter() - started)
            else:
                phase.not_connected += 1
        await asyncio.sleep(every)
    stop.set()


async def flood_loop(port: int, request: bytes, phase: Phase, stop: asyncio.Event, gap: float) -> None:
    """One sender: the forged webhook on a keep-alive connection, `gap` seconds after each answer."""
    reader = writer = None
    while not stop.is_set():
        await asyncio.sleep(gap)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            status, _, keep_alive = await asyncio.wait_for(bench.read_response(reader), 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError):
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        phase.forged_answered += 1
        phase.forged_statuses[status] = phase.forged_statuses.get(status, 0) + 1
        if not keep_alive:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def run_phase(server: bench.Child, carrier_double, args, flood: bytes | None) -> Phase:
    count = max(1, int(args.seconds * 1000 / args.genuine_every_ms))
    genuine = bench.build_requests(carrier_double, count, server.port)
    phase = Phase()

    async def run() -> None:
        stop = asyncio.Event()
        # Paced: each sender's share of --flood-kbps (0: back-to-back).
        gap = len(flood) * args.senders / (args.flood_kbps * 1000) if flood and args.flood_kbps else 0.0
        senders = [asyncio.create_task(flood_loop(server.port, flood, phase, stop, gap))
                   for _ in range(args.senders if flood else 0)]
        if senders:
            await asyncio.sleep(1.0)  # the flood is in full swing before the first genuine webhook
        await genuine_loop(server.port, genuine, args.genuine_every_ms / 1000, bench.connects(carrier_double),
                           phase, stop)
        await asyncio.gather(*senders)

    cpu = bench.cpu_seconds(server.pid)
    started = time.perf_counter()
    bench.run_async(run())
    phase.wall = time.perf_counter() - started
    phase.server_cpu = bench.cpu_seconds(server.pid) - cpu
    return phase


def extract(ref: str, into: Path) -> Path:
    """The gateway package as of git revision `ref`, in `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gateway"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def measure(label: str, source: Path | None, args, carrier_double, workdir: Path, limits: tuple[int, int],
            children: list) -> dict[str, Phase]:
    workdir.mkdir()
    fake_port = bench.free_port()
    fake = bench.Child(f"fake-{label}", [sys.executable, bench.HERE, "_fake", str(fake_port), str(args.delay_ms / 1000)],
                       fake_port, workdir, bench.child_env())
    children.append(fake)
    fake.wait_ready("/_bench/stats")
    server = bench.start_gateway(workdir, fake, str(uuid.uuid4()), 100, None, carrier_double, source=source,
                                 name=f"gateway-{label}")
    children.append(server)
    server.wait_ready("/healthz")
    bench.run_async(genuine_warmup(server, carrier_double))
    phases = {"quiet": run_phase(server, carrier_double, args, None)}
    for flood, (fields, size) in FLOODS.items():
        fields, size = (fields, size) if fields else limits
        request = forged(carrier_double, server.port, fields, size)
        phases[flood] = run_phase(server, carrier_double, args, request)
        body = request.partition(b"\r\n\r\n")[2]
        phases[flood].forged_shape = f"{fields} fields, {len(body) / 1000:.0f} KB"
    server.stop()
    fake.stop()
    return phases


async def genuine_warmup(server: bench.Child, carrier_double) -> None:
    requests = bench.build_requests(carrier_double, 20, server.port)
    await genuine_loop(server.port, requests, 0.0, bench.connects(carrier_double), Phase(), asyncio.Event())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    signing = [name for name, c in bench.registry().items() if c.signature_headers]
    parser.add_argument("--carrier", choices=signing, default=signing[0], help="whose webhooks (carriers that sign)")
    parser.add_argument("--before", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--senders", type=int, default=64, help="flooding connections (default 64)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase (default 8)")
    parser.add_argument("--genuine-every-ms", type=float, default=100.0, help="gap between genuine webhooks")
    parser.add_argument("--flood-kbps", type=float, default=850.0,
                        help="forged bytes per second, all senders together (default 850: the issue's load; "
                             "0: back-to-back)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="fake Ultravox answer delay (default 20)")
    args = parser.parse_args(argv)

    from gateway.testing import double

    carrier_double = double(args.carrier)
    carrier = bench.registry()[args.carrier]
    limits = (carrier.webhook_max_fields, carrier.webhook_max_bytes - 200)
    pace = f"{args.flood_kbps:g} KB/s in all" if args.flood_kbps else "back-to-back"
    print(f"flood benchmark: {carrier.title} inbound webhooks, {args.senders} senders of forged ones ({pace}), "
          f"a genuine one every {args.genuine_every_ms:g} ms for {args.seconds:g} s per phase, "
          f"fake Ultravox delay {args.delay_ms:g} ms")
    print(f"floods: {', '.join(FLOODS)} ({limits[0]} fields, {limits[1]} B: this tree's {args.carrier} limits)")
    print(f"server: {bench.server_stack()}; {os.cpu_count()} CPUs shared by servers, fakes and load generator")
    children: list = []
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        try:
            before = extract(args.before, Path(tmp))
            results[f"before ({args.before})"] = measure("before", before, args, carrier_double, Path(tmp) / "before",
                                                       limits, children)
            results["after (this tree)"] = measure("after", None, args, carrier_double, Path(tmp) / "after", limits,
                                                   children)
        finally:
            for child in children:
                with contextlib.suppress(Exception):
                    child.stop()
    print()
    print(f"  {'genuine webhooks':<50}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ok':>7}{'not':>6}"
          f"{'forged/s':>9}{'CPU':>8}   forged answered")
    for target, phases in results.items():
        for flood, phase in phases.items():
            print(phase.row(f"{target}: {flood}") + (f" ({phase.forged_shape})" if phase.forged_shape else ""))
    print("  (ok: connected answers; not: apology, error or timeout; CPU: the server's, over the phase)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
