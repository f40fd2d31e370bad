"""Campaign benchmark: one call list dialled by three replicas on PostgreSQL, one SIGKILLed part-way.

    python bench/campaign.py [--rows 1000] [--replicas 3] [--calls-per-second 50] [--max-concurrency 40]
                             [--carrier NAME] [--kill-after 0.3] [--postgres postgresql://postgres@127.0.0.1:5432/test]

The replicas run behind HAProxy on a fresh PostgreSQL database, against a fake Ultravox and the
carrier's fake REST API (in this process), whose callees hold each call 0.2–2 s and then end it
(one in ten busy, retried once). When `--kill-after` of the rows have been dialled, the replica
holding the campaign's dispatch job is SIGKILLed. Printed, never asserted: rows dialled more than
once (counted at the fake carrier) and not at all, the dispatch rate against calls_per_second, the
most calls live at once as the carrier saw them against max_concurrency, the replicas' CPU seconds
and the database's committed transactions per dispatched call (pg_stat_database: each is one or
more round trips). The exit status is 1 when a row was dialled twice or the limit was exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

API_KEY = "bench-api-key-0123456789"
PUBLIC_URL = "https://bench.example.test"


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _admin(url: str, statement: str):
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        return await connection.fetchval(statement)
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--calls-per-second", type=float, default=50)
    parser.add_argument("--max-concurrency", type=int, default=40)
    parser.add_argument("--carrier", default=None)
    parser.add_argument("--kill-after", type=float, default=0.3, help="fraction of rows dialled before the kill")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)

    from gateway.carriers import CARRIERS
    from gateway.testing import FakeUltravox, Replicas, double, haproxy_path
    from gateway.testing.callees import Callees

    if haproxy_path() is None:
        print("HAProxy is not installed (Debian: apt-get install haproxy)", file=sys.stderr)
        return 2
    carrier = args.carrier or next(iter(CARRIERS))
    name = f"bench_campaign_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(args.postgres, f'CREATE DATABASE "{name}"'))
    database_url = f"{args.postgres.rpartition('/')[0]}/{name}"
    fake_ultravox = FakeUltravox()
    fake = double(carrier).fake_api()
    config = "".join(double(n).config_toml() for n in CARRIERS) + f"""
[outbound.numbers]
{carrier} = ["{double(carrier).own_number}"]
[outbound.policy]
allowed_prefixes = ["+1"]
[[routes]]
number = "+15550001111"
name = "support"
agent_id = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
"""
    code = 0
    with tempfile.TemporaryDirectory() as work, fake_ultravox.serve() as ultravox_server, fake.serve():
        fake_ultravox.base_url = ultravox_server.url
        environ = {"GATEWAY_PUBLIC_URL": PUBLIC_URL, "GATEWAY_DATABASE_URL": database_url, "GATEWAY_API_KEYS": API_KEY,
                   "ULTRAVOX_API_KEY": fake_ultravox.api_key, "ULTRAVOX_BASE_URL": ultravox_server.url,
                   "ULTRAVOX_WEBHOOK_SECRET": "bench-secret", "GATEWAY_TOOL_SECRET": "bench-tool-secret"}
        for n in CARRIERS:
            environ.update(double(n).environ(fake.base_url if n == carrier else "http://127.0.0.1:9"))
        config_path = Path(work) / "gateway.toml"
        config_path.write_text(config)
        replicas = Replicas.start(args.replicas, config_path, environ, Path(work))
        try:
            fake.public_url, fake.deliver_to = PUBLIC_URL, replicas.url
            client = httpx.Client(base_url=replicas.url, timeout=60)
            auth = {"Authorization": f"Bearer {API_KEY}"}
            rows = [f"+1555{n:07d}" for n in range(args.rows)]
            jitter = random.Random(1)
            script = {number: ["busy", "completed"] for number in rows[::10]}
            commits_before = asyncio.run(_admin(
                args.postgres, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{name}'"))
            cpu_before = {p.pid: cpu_seconds(p.pid) for p in replicas.processes}
            with Callees(fake, script=script, hold=lambda: jitter.uniform(0.2, 2.0)) as callees:
                started = time.monotonic()
                response = client.post("/v1/campaigns", headers=auth, json={
                    "name": "bench", "route": "support", "carrier": carrier, "rows": [{"to": r} for r in rows],
                    "calls_per_second": args.calls_per_second, "max_concurrency": args.max_concurrency,
                    "retry": {"busy": {"attempts": 2, "delay_seconds": 1}}})
                response.raise_for_status()
                created_in = time.monotonic() - started
                campaign_id = response.json()["id"]
                victim, killed_at = None, 0.0
                cpu_victim = 0.0
                while True:
                    response = client.get(f"/v1/campaigns/{campaign_id}", headers=auth)
                    if response.status_code != 200:  # the balancer sent it to the replica just killed (502)
                        time.sleep(0.5)
                        continue
                    view = response.json()
                    if view["status"] == "completed":
                        break
                    if victim is None and len(callees.dialled) >= args.kill_after * args.rows:
                        owner = asyncio.run(_admin(database_url, "SELECT lease_owner FROM jobs WHERE key = "
                                                                 f"'campaign:{campaign_id}'")) or ""
                        victim = next((p for p in replicas.processes if f":{p.pid}:" in owner), replicas.processes[0])
                        cpu_victim = cpu_seconds(victim.pid) - cpu_before[victim.pid]
                        victim.kill()
                        killed_at = time.monotonic() - started
                    time.sleep(0.5)
                elapsed = time.monotonic() - started
            cpu = cpu_victim + sum(cpu_seconds(p.pid) - cpu_before[p.pid] for p in replicas.processes if p.running)
            commits = asyncio.run(_admin(
                args.postgres, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{name}'")) - commits_before
        finally:
            replicas.close()
    dials = sum(callees.dialled.values())
    twice = sum(1 for number, count in callees.dialled.items() if count > (2 if number in script else 1))
    never = sum(1 for number in rows if number not in callees.dialled)
    print(f"rows {args.rows} on {args.replicas} replicas ({carrier}); campaign created in {created_in:.2f} s")
    print(f"replica {victim.name if victim else '-'} SIGKILLed at {killed_at:.1f} s" if victim else "no kill")
    print(f"counts {view['counts']}")
    print(f"dials {dials} (retries of busy rows included): dialled more often than the script allows {twice}, "
          f"never dialled {never}")
    print(f"dispatch rate {dials / elapsed:.1f} dials/s over {elapsed:.1f} s (calls_per_second {args.calls_per_second})")
    print(f"most live at the carrier {callees.most_live} (max_concurrency {args.max_concurrency})")
    print(f"replica CPU {cpu:.1f} s in all, {1000 * cpu / max(dials, 1):.1f} ms per dial (webhooks included)")
    print(f"database transactions {commits}, {commits / max(dials, 1):.1f} per dial (all work, all replicas)")
    if twice or callees.most_live > args.max_concurrency:
        code = 1
    asyncio.run(_admin(args.postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return code


if __name__ == "__main__":
    sys.exit(main())
