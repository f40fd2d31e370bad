"""Event delivery benchmark: throughput and lag with the receiver up, then down for a while and back.

    python bench/deliveries.py [--calls 300] [--down-seconds 40] [--carrier NAME] [--no-kill]
                               [--database-url URL]

One `gateway serve` process with one [[webhooks]] endpoint: an `EventReceiver` in this process
(gateway.testing), which verifies every delivery with the standardwebhooks library and keeps each
event once by its webhook-id. Each call is an inbound webhook and, a moment later, the carrier's
"completed" status callback: four events (call.started, two call.status_changed, call.ended).

1. Baseline: the receiver is up; `--calls` calls; the time from each event to its delivery.
2. Outage: the receiver goes down; `--calls` more calls; the gateway retries on its default
   schedule; after `--down-seconds` it is SIGKILLed and started again (unless --no-kill), then
   the receiver comes back. Figures: how long until every event arrived, at what rate, events
   lost or repeated, and calls whose events arrived out of order.

It prints figures, never asserts them; the exit status is 1 when an event was lost or a call's
events came out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inbound import HERE as INBOUND, Child, child_env, free_port  # noqa: E402  (a sibling bench's helpers)

PUBLIC_URL = "https://bench.example.test"
CALLED_NUMBER = "+15550001111"
ULTRAVOX_KEY = "bench-ultravox-key"
DEAD_API = "http://127.0.0.1:9"
EVENTS_PER_CALL = 4
ORDER = ["call.started", "call.status_changed", "call.status_changed", "call.ended"]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))] if ordered else float("nan")


class Gateway:
    def __init__(self, workdir: Path, carrier_double, fake_url: str, receiver_url: str, secret: str,
                 database_url: str | None):
        from gateway.testing import GatewayProcess

        self.workdir = workdir
        config = workdir / "gateway.toml"
        config.write_text(
            f'[[routes]]\nnumber = "{CALLED_NUMBER}"\nagent_id = "{uuid.uuid4()}"\n'
            f'\n[[webhooks]]\nname = "bench"\nurl = "{receiver_url}"\nsecret = "{secret}"\n'
            # No summary to wait for: the fake has no GET /api/calls.
            "\n[events]\nartifacts_wait_seconds = 0\n" + carrier_double.config_toml())
        self.environ = {
            "GATEWAY_PUBLIC_URL": PUBLIC_URL,
            "GATEWAY_DATABASE_URL": database_url or f"sqlite:///{workdir / 'bench.db'}",
            "ULTRAVOX_API_KEY": ULTRAVOX_KEY, "ULTRAVOX_BASE_URL": fake_url,
            **carrier_double.environ(DEAD_API),
        }
        self._config = config
        self._process_class = GatewayProcess
        self.process = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = self._process_class(self._config, self.environ, work_dir=self.workdir,
                                           name=f"gateway-{self.starts}", extra_args=["--log-level", "warning"])
        self.process.start().wait_ready()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None:
            self.process.close()


async def place_calls(url: str, carrier_double, count: int, concurrency: int = 20) -> list[str]:
    """`count` inbound calls, each answered and then completed; their carrier call ids."""
    call_ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> None:
        async with sem:
            form = carrier_double.inbound_form(to=CALLED_NUMBER)
            inbound = carrier_double.inbound_request(PUBLIC_URL, f"/{carrier_double.name}/inbound", form)
            response = await client.request(inbound.method, url + f"/{carrier_double.name}/inbound" +
                                            (f"?{inbound.query}" if inbound.query else ""),
                                            content=inbound.body, headers=inbound.headers)
            response.raise_for_status()
            status_form = {**form, **carrier_double.status_fields("completed", 30)}
            status = carrier_double.inbound_request(PUBLIC_URL, f"/{carrier_double.name}/status", status_form)
            response = await client.request(status.method, url + f"/{carrier_double.name}/status" +
                                            (f"?{status.query}" if status.query else ""),
                                            content=status.body, headers=status.headers)
            response.raise_for_status()
            call_ids.append(form[carrier_double.call_id_param])

    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))
    return call_ids


def wait_for(receiver, expected: int, timeout: float) -> float:
    """Seconds until the receiver holds `expected` events (or the timeout)."""
    started = time.monotonic()
    try:
        receiver.wait_for(lambda r: len(r.order) >= expected, timeout=timeout)
    except TimeoutError:
        pass
    return time.monotonic() - started


def lags(events) -> list[float]:
    import datetime as dt

    return [e.received_at - dt.datetime.fromisoformat(e.timestamp.replace("Z", "+00:00")).timestamp() for e in events]


def out_of_order(receiver) -> int:
    by_call: dict[str, list] = {}
    for event_id in receiver.order:
        event = receiver.events[event_id]
        by_call.setdefault(event.call_id, []).append(event)
    wrong = 0
    for events in by_call.values():
        types = [e.type for e in events]
        statuses = [(e.data["previous_status"], e.data["status"]) for e in events if e.type == "call.status_changed"]
        if types != ORDER[:len(types)] or statuses != [("creating", "in-progress"), ("in-progress", "completed")][:len(statuses)]:
            wrong += 1
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per phase (default 300)")
    parser.add_argument("--down-seconds", type=float, default=40, help="how long the receiver is down (default 40)")
    parser.add_argument("--carrier", default="twilio")
    parser.add_argument("--no-kill", action="store_true", help="do not SIGKILL and restart the gateway while down")
    parser.add_argument("--database-url", help="the gateway's store (default: SQLite in a temporary directory)")
    args = parser.parse_args(argv)

    from gateway.testing import EventReceiver, double

    carrier_double = double(args.carrier)
    with tempfile.TemporaryDirectory(prefix="bench-deliveries-") as tmp, EventReceiver() as receiver:
        workdir = Path(tmp)
        fake_port = free_port()
        fake = Child("fake", [sys.executable, INBOUND, "_fake", str(fake_port), "0.02"], fake_port, workdir, child_env())
        gateway = Gateway(workdir, carrier_double, fake.url, receiver.url, receiver.secret, args.database_url)
        try:
            fake.wait_ready("/_bench/stats")
            gateway.start()
            print(f"event delivery benchmark: {args.calls} {args.carrier} calls per phase, {EVENTS_PER_CALL} events "
                  f"each, one endpoint; store {'PostgreSQL' if args.database_url else 'SQLite'}; "
                  f"{os.cpu_count()} CPUs shared by everything")

            # 1. baseline: the receiver up all along
            started = time.monotonic()
            asyncio.run(place_calls(gateway.process.url, carrier_double, args.calls))
            placed = time.monotonic() - started
            expected = EVENTS_PER_CALL * args.calls
            waited = wait_for(receiver, expected, timeout=120)
            baseline = [receiver.events[i] for i in receiver.order]
            base_lags = lags(baseline)
            print(f"\nreceiver up: {len(baseline)} of {expected} events; calls placed in {placed:.1f} s, the last event "
                  f"{waited:.1f} s later")
            print(f"  lag (event to delivery) p50 {1000 * percentile(base_lags, .5):.0f} ms, "
                  f"p99 {1000 * percentile(base_lags, .99):.0f} ms, max {1000 * max(base_lags):.0f} ms "
                  f"(call.ended waits 2 s for a carrier's correction of the final status, by design)")
            non_ended = [lag for e, lag in zip(baseline, base_lags) if e.type != "call.ended"]
            print(f"  without call.ended: p50 {1000 * percentile(non_ended, .5):.0f} ms, "
                  f"p99 {1000 * percentile(non_ended, .99):.0f} ms")

            # 2. the receiver down; the gateway killed and restarted meanwhile
            receiver.down()
            before = len(receiver.order)
            down_at = time.monotonic()
            asyncio.run(place_calls(gateway.process.url, carrier_double, args.calls))
            time.sleep(max(0.0, args.down_seconds / 2 - (time.monotonic() - down_at)))
            if not args.no_kill:
                gateway.kill()
                gateway.start()
            time.sleep(max(0.0, args.down_seconds - (time.monotonic() - down_at)))
            receiver.up()
            drain = wait_for(receiver, before + expected, timeout=600)
            after = [receiver.events[i] for i in receiver.order[before:]]
            received = [e.received_at for e in after]
            rate = len(after) / max(1e-9, max(received) - min(received)) if len(received) > 1 else float("nan")
            outage_lags = lags(after)
            print(f"\nreceiver down {args.down_seconds:g} s"
                  f"{'' if args.no_kill else ', the gateway SIGKILLed and restarted halfway'}:")
            print(f"  {len(after)} of {expected} events arrived, the last {drain:.1f} s after the receiver came back; "
                  f"{rate:.0f} events/s once they flowed")
            print(f"  lag from each event p50 {percentile(outage_lags, .5):.1f} s, max {max(outage_lags, default=0):.1f} s")
            print(f"  lost {expected - len(after)}, repeated {receiver.repeats} (same webhook-id twice), "
                  f"calls out of order {out_of_order(receiver)}, signatures refused {len(receiver.refused)}")
            failed = expected - len(after) > 0 or out_of_order(receiver) > 0
        finally:
            gateway.close()
            fake.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
