"""`gateway serve | check`."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Telephony gateway for Ultravox")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway's HTTP server")
    serve.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default from config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config, 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="validate a config file and say what is wrong")
    check.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG)")
    check.add_argument("config_path", nargs="?", help="same as --config")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    return check_command(args)


def _load(path: str | None):
    try:
        return load_settings(path)
    except ConfigError as error:
        print("The configuration has problems:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def serve_command(args) -> int:
    import uvicorn

    from .app import create_app

    settings = _load(args.config)
    if settings is None:
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        log_level=args.log_level,
        # Carriers sign the public URL (GATEWAY_PUBLIC_URL), so proxy headers are not needed for that.
        proxy_headers=False,
    )
    return 0


def check_command(args) -> int:
    settings = _load(args.config or args.config_path)
    if settings is None:
        return 2
    print(f"Configuration is valid: {len(settings.routes)} route(s).")
    for route in settings.routes:
        target = f"agent {route.agent_id}" if route.agent_id else "inline call"
        print(f"  {route.number:>16}  {route.name}: {target}")
    for note in settings.warnings():
        print(f"warning: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
