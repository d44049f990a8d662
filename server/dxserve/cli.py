"""`dxserve`: run the server.

    dxserve serve                          # localhost:50051, every installed plugin
    dxserve serve --address 0.0.0.0:8500 --config dxserve.toml
    DXSERVE_MAX_BATCH_SIZE=64 dxserve serve

Precedence: flags > DXSERVE_* environment variables > the TOML file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import Settings, SettingsError, load_settings


class TextFormatter(logging.Formatter):
    """Plain lines for people, with the structured fields appended as key=value."""

    STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in self.STANDARD)
        return f"{super().format(record)} {fields}".rstrip()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False))
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def _flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after it; unset flags leave the setting to env/TOML."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation == list[str]:
            parser.add_argument(flag, dest=name, action="append", help=field.description)
        else:
            parser.add_argument(flag, dest=name, help=field.description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dxserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    _flags(serve)
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = load_settings(args.config, overrides)
    except SettingsError as error:
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.address.rpartition(":")[0].strip("[]"))
    from .app import serve as run

    try:
        asyncio.run(run(settings))
    except OSError as error:  # e.g. the port is taken
        logging.getLogger("dxserve").error("cannot serve", extra={"error": str(error)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
