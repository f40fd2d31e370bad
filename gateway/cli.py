"""`gateway serve | check | dial | tools sync | simulate | demo | campaign`, and `gateway --version`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .settings import ConfigError, load_settings

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    from .carriers import CARRIERS

    carriers = list(CARRIERS)
    parser = argparse.ArgumentParser(prog="gateway", description="Telephony gateway for Ultravox")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway's HTTP server")
    serve.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default from config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config, 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=int, default=1,
                       help="serving processes sharing the port and the store (default 1)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="text lines, or one JSON object a line (default from config: [gateway] log_format, "
                       "$GATEWAY_LOG_FORMAT, else text)")

    check = commands.add_parser("check", help="validate a config file and say what is wrong")
    check.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")
    check.add_argument("config_path", nargs="?", help="same as --config")
    check.add_argument("--online", action="store_true",
                       help="also reach Ultravox and each configured carrier with the configured credentials")

    dial = commands.add_parser("dial", help="phone someone through the running gateway and follow the call")
    dial.add_argument("to", help="number to call, E.164 (+15551234567)")
    agent = dial.add_mutually_exclusive_group(required=True)
    agent.add_argument("--route", help="name of a configured route")
    agent.add_argument("--agent-id", help="an Ultravox agent id")
    dial.add_argument("--carrier", choices=carriers)
    dial.add_argument("--from", dest="from_", help="one of the deployment's numbers (default: the first)")
    dial.add_argument("--via", choices=["carrier", "ultravox"])
    dial.add_argument("--greeting", help="what the agent says if the callee stays silent")
    dial.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                      help="the gateway's base URL (default $GATEWAY_URL or http://127.0.0.1:8080)")
    dial.add_argument("--api-key", help="default $GATEWAY_API_KEY, else the first of $GATEWAY_API_KEYS")
    dial.add_argument("--idempotency-key", help="retrying with the same key never dials twice (default: a new key)")
    dial.add_argument("--no-follow", action="store_true", help="print the new call and exit")
    dial.add_argument("--timeout", type=float, default=3600, help="stop following after this many seconds")
    dial.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)

    tools = commands.add_parser("tools", help="Ultravox tools the gateway serves")
    tools_commands = tools.add_subparsers(dest="tools_command", required=True)
    sync = tools_commands.add_parser("sync", help="create or update the transfer tools as durable Ultravox tools")
    sync.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")

    simulate = commands.add_parser(
        "simulate", help="play a WAV file into a bridged route as a carrier's call, record what the agent said"
    )
    simulate.add_argument("--carrier", choices=carriers, default=carriers[0])
    simulate.add_argument("--to", required=True, help="the called number (a route in bridge mode)")
    simulate.add_argument("--from", dest="from_", default="+15551230001", help="the caller's number")
    simulate.add_argument("--input", required=True, help="WAV to play as the caller (16-bit)")
    simulate.add_argument("--output", required=True, help="WAV to write the agent's audio to")
    simulate.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")
    simulate.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                          help="where the running gateway listens (default $GATEWAY_URL or http://127.0.0.1:8080)")
    simulate.add_argument("--tail-seconds", type=float, default=3.0, help="keep listening after the input ends")
    simulate.add_argument("--pace", type=_pace, default=1.0,
                          help="play the input this many times faster than real time (default 1); for a stand-in "
                          "agent that speaks as fast, as `gateway demo --pace` runs one")
    simulate.add_argument("--private-key", help="for carriers signing with a private key (the gateway holds the "
                          "public half): that key, base64")

    demo = commands.add_parser(
        "demo", help="try the gateway with no account: it runs with a local stand-in for Ultravox and the carriers "
        "faked on loopback, and prints commands to try")
    demo.add_argument("--port", type=int, default=8080, help="port the gateway listens on (default 8080)")
    demo.add_argument("--pace", type=_pace, default=1.0,
                      help="the stand-in agent speaks, and the simulate commands printed play the caller, this many "
                      "times faster than real time (default 1: as on a phone)")

    from . import campaign_cli

    campaign_cli.add_parser(commands, api_key_of)
    args = parser.parse_args(argv)
    if args.command == "campaign":
        return args.run(args)
    if args.command == "simulate":
        return simulate_command(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.port, pace=args.pace)
    if args.command == "tools":
        return tools_sync_command(args)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "dial":
        return dial_command(args)
    return check_command(args)


def _pace(text: str) -> float:
    """A --pace: times real time, from 1 (real time) to 16."""
    try:
        pace = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= pace <= 16:
        raise argparse.ArgumentTypeError("must be from 1 (real time) to 16")
    return pace


def installed_version() -> str:
    """The version of the installed package (its metadata), as pip shows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ultravox-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _load(path: str | None):
    try:
        return load_settings(path)
    except ConfigError as error:
        print("The configuration has problems:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def serve_command(args) -> int:
    from . import logs

    # Until the settings are read, the format is the flag's or the environment's: configuration
    # problems are logged in it too.
    logs.configure(args.log_format or logs.format_from_environment(), args.log_level)
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        log.error("The configuration has problems: %s", "; ".join(error.problems))  # one line, also in JSON
        return 2
    if args.workers < 1:
        log.error("--workers must be 1 or more")
        return 2
    # The store opened and its schema brought up to date here, before serving: a database URL that
    # leads nowhere is a configuration problem, said in one line rather than a start-up traceback.
    # (With several workers it must be once anyway: on SQLite, workers migrating one file at once
    # could each find it unmigrated; PostgreSQL replicas take a lock instead.)
    problem = asyncio.run(_store_problem(settings.database_url))
    if problem:
        log.error("Cannot open the store at %s: %s. Check GATEWAY_DATABASE_URL ([gateway] database_url).",
                  _without_password(settings.database_url), problem)
        return 2
    # Imported once the configuration and the store are known good: a problem is said without
    # loading the app and its libraries (most of a start's time).
    from .serving import serve, server_config

    if args.workers > 1:
        # Each worker process builds (and imports) its own app from the same configuration; the
        # supervisor here never loads it.
        if args.config:
            os.environ["GATEWAY_CONFIG"] = os.path.abspath(args.config)
        app: Any = "gateway.app:create_app_from_environment"
    else:
        from .app import create_app

        app = create_app(settings)
    # uvicorn applies log_config (dictConfig) in this process and again in each worker process.
    log_config = logs.log_config(args.log_format or settings.log_format, args.log_level, settings.secrets())
    config = server_config(app, host=args.host or settings.host, port=args.port if args.port is not None else settings.port,
                           log_level=args.log_level, log_config=log_config,
                           header_timeout=settings.header_timeout_seconds, body_timeout=settings.body_timeout_seconds)
    return serve(config, workers=args.workers)


async def _store_problem(database_url: str) -> str | None:
    """Why the store cannot be opened and migrated, in a few words; None when it can."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from .store import CallStore

    try:
        path = make_url(database_url).database if database_url.startswith("sqlite") else None
    except ArgumentError:
        path = None
    if path and path != ":memory:" and not Path(path).parent.is_dir():
        return f"the directory {Path(path).parent} does not exist"
    try:
        store = CallStore.open(database_url)
        try:
            await store.migrate()
        finally:
            await store.close()
    except Exception as error:
        cause = getattr(error, "orig", None) or error.__cause__ or error  # the driver's own error
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        text = re.sub(r"^<class '[^']+'>: ", "", str(cause).split("\n")[0]).strip()
        return text or type(cause).__name__
    return None


def _without_password(database_url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return database_url.partition("://")[0] + "://…"


def api_key_of(args) -> str | None:
    key = args.api_key or os.environ.get("GATEWAY_API_KEY") or os.environ.get("GATEWAY_API_KEYS", "").split(",")[0]
    return key.strip() or None


def dial_command(args) -> int:
    import httpx

    from .statuses import FINAL_STATUSES

    key = api_key_of(args)
    if not key:
        print("No API key: pass --api-key or set GATEWAY_API_KEY.", file=sys.stderr)
        return 2
    body = {"to": args.to, "route": args.route, "agent_id": args.agent_id, "carrier": args.carrier,
            "from": args.from_, "via": args.via, "greeting": args.greeting}
    # Always idempotent: if the answer to the POST is lost, sending it again cannot dial twice.
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": args.idempotency_key or uuid.uuid4().hex}
    payload = {k: v for k, v in body.items() if v is not None}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        response = None
        for _ in range(3):
            try:
                response = client.post("/v1/calls", json=payload)
                break
            except httpx.TransportError as error:
                print(f"Cannot reach the gateway at {args.url} ({error}); retrying", file=sys.stderr)
                time.sleep(1)
        if response is None:
            return 2
        if response.status_code != 201:
            print(f"Refused ({response.status_code}): {response.text}", file=sys.stderr)
            return 2
        call = response.json()
        print(f"call {call['id']}: {call['status']}" + _why(call), flush=True)
        if args.no_follow:
            return 0
        status = call["status"]
        give_up = time.monotonic() + args.timeout
        while status not in FINAL_STATUSES:
            if time.monotonic() > give_up:
                print(f"call {call['id']}: still {status} after {args.timeout:g} s; stopped following", file=sys.stderr)
                return 1
            time.sleep(args.poll_seconds)
            try:
                response = client.get(f"/v1/calls/{call['id']}")
            except httpx.TransportError:
                continue  # the gateway restarting, say: keep following
            if response.status_code != 200:
                continue
            call = response.json()
            if call["status"] != status:
                status = call["status"]
                print(f"call {call['id']}: {status}" + _why(call), flush=True)
    return 0 if status == "completed" else 1


def _why(call: dict) -> str:
    details = [str(call[k]) for k in ("failure_reason", "end_reason") if call.get(k)]
    if call.get("duration_seconds") is not None:
        details.append(f"{call['duration_seconds']} s")
    return f" ({'; '.join(details)})" if details else ""


def tools_sync_command(args) -> int:

    from .http import RemoteError
    from .tools import DURABLE_NAMES, SECRET_REQUIREMENT, sync_tools
    from .ultravox import create_http_client

    settings = _load(args.config)
    if settings is None:
        return 2
    missing = [name for name, value in (
        ("ULTRAVOX_API_KEY", settings.ultravox.api_key), ("GATEWAY_PUBLIC_URL", settings.public_url),
        ("[operators]", settings.operators),
    ) if not value]
    if missing:
        print(f"Cannot sync tools without {', '.join(missing)}.", file=sys.stderr)
        return 2

    from .app import create_app

    urls = create_app(settings).state.gateway.urls  # the tools' URLs, from the gateway's route table

    async def run() -> list[str]:
        async with create_http_client(settings.ultravox) as http:
            return await sync_tools(settings, urls, http)

    try:
        report = asyncio.run(run())
    except RemoteError as error:
        print(f"Ultravox refused: {error.reason}", file=sys.stderr)
        return 1
    for line in report:
        print(line)
    print(
        "Attach them to an agent with their names ("
        + ", ".join(DURABLE_NAMES.values())
        + f") and authTokens {{\"{SECRET_REQUIREMENT}\": <GATEWAY_TOOL_SECRET>}}."
    )
    return 0


def simulate_command(args) -> int:

    from .media.simulate import SimulationError, simulate_call

    settings = _load(args.config)
    if settings is None:
        return 2
    try:
        summary = asyncio.run(simulate_call(
            settings, carrier=args.carrier, to=args.to, from_=args.from_, input_path=args.input,
            output_path=args.output, gateway_url=args.url, tail_seconds=args.tail_seconds,
            private_key=args.private_key, pace=args.pace,
        ))
    except SimulationError as error:
        print(f"Simulation failed: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def check_command(args) -> int:
    settings = _load(args.config or args.config_path)
    if settings is None:
        return 2
    print(f"Configuration is valid: {len(settings.routes)} route(s).")
    for route in settings.routes:
        target = f"agent {route.agent_id}" if route.agent_id else "inline call"
        print(f"  {route.number:>16}  {route.name}: {target}")
    for key in settings.api_keys:
        print(f"  {key.describe()}")
    for note in settings.warnings():
        print(f"warning: {note}")
    if not args.online:
        return 0
    from .online import check_online

    print("Online (each service's API, with the configured credentials):")
    probes = asyncio.run(check_online(settings))
    for probe in probes:
        print(probe.line())
    return 1 if any(probe.outcome == "failed" for probe in probes) else 0


if __name__ == "__main__":
    sys.exit(main())
