"""`dxserve`: run the server.

    dxserve serve                          # localhost:50051, every installed plugin
    dxserve serve --address 0.0.0.0:8500 --config dxserve.toml
    DXSERVE_MAX_BATCH_SIZE=64 dxserve serve
    dxserve tokens add lab-7 --plugins lymphoblast --keys-file callers.json   # prints the token once
    dxserve audit verify --db dxserve-audit.sqlite3                          # or a postgresql:// URL
    dxserve audit export --db dxserve-audit.sqlite3 --since 2026-11-01 --format csv

Precedence: flags > DXSERVE_* environment variables > the TOML file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def tokens_command(args: argparse.Namespace) -> int:
    from .auth import KeyFile

    keys = KeyFile.load(args.keys_file)
    if args.action == "list":
        for entry in keys.callers:
            how = f"certificate {entry['certificate_subject']}" if "certificate_subject" in entry else "token"
            print(f"{entry['name']}: {how}; plugins {', '.join(entry['plugins'])}{'; admin' if entry.get('admin') else ''}")
        return 0
    if args.action == "revoke":
        kept = [e for e in keys.callers if e["name"] != args.name]
        if len(kept) == len(keys.callers):
            print(f"dxserve: no caller named {args.name!r} in {args.keys_file}", file=sys.stderr)
            return 2
        keys.callers = kept
        keys.save()
        print(f"revoked {args.name}; a running server reads the key file again on SIGHUP or restart", file=sys.stderr)
        return 0
    try:
        token = keys.add(args.name, args.plugins, args.admin, args.certificate_subject)
    except ValueError as error:
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    keys.save()
    if token:
        print(token)
        print(f"added {args.name}; the token above is shown once and stored only as its SHA-256 in {args.keys_file}", file=sys.stderr)
    return 0


def audit_command(args: argparse.Namespace) -> int:
    from .audit import COLUMNS, open_store, verify

    store = open_store(args.db)
    try:
        if args.action == "verify":
            count, last, problems = verify(store)
            for problem in problems:
                print(problem)
            print(f"{count} rows checked, {'TAMPERED: ' + str(len(problems)) + ' problems' if problems else 'chain intact'}; "
                  f"last hash {last}", file=sys.stderr)
            return 1 if problems else 0
        out = args.output.open("w", newline="") if args.output else sys.stdout
        if args.format == "csv":
            import csv

            writer = csv.DictWriter(out, COLUMNS)
            writer.writeheader()
            writer.writerows(store.rows(args.since))
        else:
            for row in store.rows(args.since):
                print(json.dumps(row), file=out)
        if args.output:
            out.close()
        return 0
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dxserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    _flags(serve)
    serve.set_defaults(run=None)

    tokens = sub.add_parser("tokens", help="manage the callers of the key file (auth_keys_file)")
    tokens.add_argument("action", choices=["add", "list", "revoke"])
    tokens.add_argument("name", nargs="?", help="the caller's name (add, revoke)")
    tokens.add_argument("--keys-file", type=Path, required=True)
    tokens.add_argument("--plugins", nargs="*", default=[], help="plugins it may use (default: all)")
    tokens.add_argument("--admin", action="store_true", help="may also reload plugins and change default versions")
    tokens.add_argument("--certificate-subject", default="", help="identify it by this client-certificate subject, "
                        "e.g. 'CN=lab-7', instead of a token")
    tokens.set_defaults(run=tokens_command)

    audit = sub.add_parser("audit", help="check or export the audit trail")
    audit.add_argument("action", choices=["verify", "export"])
    audit.add_argument("--db", required=True, help="the audit_db setting: a SQLite file or a postgresql:// URL")
    audit.add_argument("--since", default="", help="export rows from this ISO time on, e.g. 2026-11-01")
    audit.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    audit.add_argument("--output", type=Path)
    audit.set_defaults(run=audit_command)
    args = parser.parse_args(argv)
    if args.run is not None:
        if args.command == "tokens" and args.action != "list" and not args.name:
            parser.error(f"tokens {args.action} needs a NAME")
        return args.run(args)

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
