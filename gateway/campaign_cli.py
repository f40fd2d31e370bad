"""`gateway campaign create|status|pause|resume|cancel`: campaigns through the running gateway's API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TERMINAL = ("completed", "canceled")


def add_parser(commands, api_key_of) -> None:
    campaign = commands.add_parser("campaign", help="start and follow call campaigns on the running gateway")
    actions = campaign.add_subparsers(dest="campaign_command", required=True)
    create = actions.add_parser("create", help="start a campaign from a CSV of rows (column `to`, optional "
                                "`timezone`, `metadata.KEY`, other columns template variables)")
    create.add_argument("csv", help="the rows, CSV with a header line")
    create.add_argument("--name", required=True)
    agent = create.add_mutually_exclusive_group(required=True)
    agent.add_argument("--route", help="a configured route whose agent takes the calls")
    agent.add_argument("--agent-id", help="an Ultravox agent id")
    create.add_argument("--carrier")
    create.add_argument("--from", dest="from_", action="append", help="a from number (repeat for a pool)")
    create.add_argument("--max-concurrency", type=int)
    create.add_argument("--calls-per-second", type=float)
    create.add_argument("--window", action="append", help='calling hours, e.g. "mon-fri 09:00-17:00" (repeatable)')
    create.add_argument("--timezone", help="for numbers whose zone is not known")
    create.add_argument("--starts-at")
    create.add_argument("--ends-at")
    create.add_argument("--retry", action="append", metavar="OUTCOME=ATTEMPTS/DELAY_SECONDS",
                        help="e.g. busy=3/600 (repeatable; outcomes busy, no-answer, failed, machine-detected)")
    create.add_argument("--follow", action="store_true", help="show its progress until it ends")
    for action in ("status", "pause", "resume", "cancel"):
        parser = actions.add_parser(action, help=f"{action} a campaign" if action != "status" else
                                    "a campaign's counts by row status")
        parser.add_argument("campaign_id")
        if action == "status":
            parser.add_argument("--follow", action="store_true", help="show its progress until it ends")
    for parser in (create, *[actions.choices[a] for a in ("status", "pause", "resume", "cancel")]):
        parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"))
        parser.add_argument("--api-key", help="default $GATEWAY_API_KEY, else the first of $GATEWAY_API_KEYS")
        parser.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    campaign.set_defaults(run=lambda args: campaign_command(args, api_key_of(args)))


def _body(args) -> dict:
    retry = {}
    for text in args.retry or []:
        outcome, _, rule = text.partition("=")
        attempts, _, delay = rule.partition("/")
        retry[outcome] = {"attempts": int(attempts), "delay_seconds": float(delay or 0)}
    fields = {"name": args.name, "route": args.route, "agent_id": args.agent_id, "carrier": args.carrier,
              "from": (args.from_[0] if len(args.from_) == 1 else args.from_) if args.from_ else None,
              "max_concurrency": args.max_concurrency, "calls_per_second": args.calls_per_second,
              "window": args.window, "timezone": args.timezone, "starts_at": args.starts_at, "ends_at": args.ends_at,
              "retry": retry or None, "csv": Path(args.csv).read_text(encoding="utf-8-sig")}
    return {name: value for name, value in fields.items() if value is not None}


def progress(view: dict) -> str:
    counts = view["counts"]
    finished = sum(n for status, n in counts.items() if status not in ("pending", "dialing"))
    parts = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
    return f"campaign {view['id']} {view['status']}: {finished}/{view['rows']} done ({parts})"


def campaign_command(args, key: str | None) -> int:
    import httpx

    if not key:
        print("No API key: pass --api-key or set GATEWAY_API_KEY.", file=sys.stderr)
        return 2
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        try:
            if args.campaign_command == "create":
                response = client.post("/v1/campaigns", json=_body(args))
            elif args.campaign_command == "status":
                response = client.get(f"/v1/campaigns/{args.campaign_id}")
            else:
                response = client.post(f"/v1/campaigns/{args.campaign_id}/{args.campaign_command}")
        except httpx.TransportError as error:
            print(f"Cannot reach the gateway at {args.url} ({error})", file=sys.stderr)
            return 2
        if response.status_code >= 300:
            print(f"Refused ({response.status_code}): {json.dumps(response.json().get('detail'))}", file=sys.stderr)
            return 2
        view = response.json()
        live = sys.stdout.isatty()
        print(progress(view), end="" if live and getattr(args, "follow", False) else "\n", flush=True)
        while getattr(args, "follow", False) and view["status"] not in TERMINAL:
            time.sleep(args.poll_seconds)
            try:
                response = client.get(f"/v1/campaigns/{view['id']}")
            except httpx.TransportError:
                continue  # the gateway restarting: keep following
            if response.status_code == 200:
                view = response.json()
                print(("\r\033[K" if live else "") + progress(view), end="" if live else "\n", flush=True)
        if live and getattr(args, "follow", False):
            print()
    return 0
