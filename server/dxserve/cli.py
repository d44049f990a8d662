"""`dxserve`: run the server.

    dxserve serve                          # localhost:50051, every installed plugin
    dxserve serve --address 0.0.0.0:8500 --config dxserve.toml
    DXSERVE_MAX_BATCH_SIZE=64 dxserve serve
    dxserve tokens add lab-7 --plugins lymphoblast --keys-file callers.json   # prints the token once
    dxserve health --address 127.0.0.1:50051                                 # exit 0 when SERVING
    dxserve health --tls-ca ca.pem --server-name localhost                   # the same over TLS (--tls-cert/--tls-key: mTLS)
    dxserve audit verify --db dxserve-audit.sqlite3                          # or a postgresql:// URL
    dxserve audit keygen --key /etc/dxserve/audit-signing.pem                # for audit_checkpoint_key
    dxserve audit verify --db dxserve-audit.sqlite3 --checkpoints checkpoints.jsonl --public-key /etc/dxserve/audit-signing.pem.pub
    dxserve audit export --db dxserve-audit.sqlite3 --since 2026-11-01 --format csv

Precedence: flags > DXSERVE_* environment variables > the TOML file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import TextIO
from pathlib import Path

from .config import Settings, SettingsError, load_settings


class TextFormatter(logging.Formatter):
    """Plain lines for people, with the structured fields appended as key=value."""

    STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in self.STANDARD)
        return f"{super().format(record)} {fields}".rstrip()


NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
NATIVE_WORDS = {"INFO:": logging.INFO, "WARNING:": logging.WARNING, "ERROR:": logging.ERROR}  # LiteRT's own lines


def native_level(line: str) -> int:
    """The level of a C++ library's stderr line: glog's "I0000 ..." / "W0000 ...", LiteRT's
    "INFO: ...", else WARNING (an unknown line is worth seeing)."""
    if line[1:5].isdigit():
        return NATIVE_LEVELS.get(line[:1], logging.INFO)
    return next((level for word, level in NATIVE_WORDS.items() if line.startswith(word)), logging.WARNING)


def route_native_stderr() -> TextIO:
    """Make everything written to file descriptor 2 (TensorFlow's and gRPC's C++ logs, which
    bypass Python) a JSON log line of the "native" logger; returns a stream to the real stderr."""
    import io
    import os
    import threading

    real = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), write_through=True)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0, closefd=False), write_through=True)
    native = logging.getLogger("native")

    def forward() -> None:
        with os.fdopen(read_end, errors="replace") as lines:
            for line in lines:
                if line.strip():  # "I0000 00:00:... file.cc:12] text": the first letter is the level
                    native.log(native_level(line), line.rstrip())

    threading.Thread(target=forward, name="native-stderr", daemon=True).start()
    return real


def configure_logging(settings: Settings) -> None:
    """Text on a terminal, JSON otherwise (or as set); either way the C++ libraries' own stderr
    lines are log records of the "native" logger, below WARNING silenced unless at DEBUG."""
    form = settings.log_format if settings.log_format != "auto" else ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(route_native_stderr())
    if form == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False))
        logging.captureWarnings(True)  # Python warnings (Keras, ...) become log records too
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    logging.getLogger("native").setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)


def _flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after it; unset flags leave the setting to env/TOML."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation == list[str]:
            parser.add_argument(flag, dest=name, action="append", help=field.description)
        else:
            parser.add_argument(flag, dest=name, help=field.description)


def supervise(settings: Settings, argv: list[str]) -> int:
    """`--workers N`: run N single-process servers on one port (SO_REUSEPORT), each with its
    share of the CPU's threads for TensorFlow and its own metrics port (metrics_port + i);
    pass SIGTERM, SIGINT and SIGHUP on to them; exit 0 when every worker did."""
    import os
    import signal
    import subprocess

    log = logging.getLogger("dxserve.workers")
    threads = str(max(1, (os.cpu_count() or 1) // settings.workers))
    workers = []
    for i in range(settings.workers):
        env = {**os.environ, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": threads}
        if "decode_threads" not in settings.model_fields_set:  # the default, one per core: the worker's share
            env["DXSERVE_DECODE_THREADS"] = threads
        metrics = ["--metrics-port", str(settings.metrics_port + i)] if settings.metrics_port else []
        workers.append(subprocess.Popen([sys.executable, "-m", "dxserve.cli", *argv, "--workers", "1", "--reuse-port", "true",
                                         *metrics], env=env))
    log.info("workers started", extra={"workers": [w.pid for w in workers], "address": settings.address, "tf_threads": threads})
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: [w.send_signal(number) for w in workers if w.poll() is None])
    codes = [w.wait() for w in workers]
    log.info("workers stopped", extra={"exit_codes": codes})
    return 0 if all(code == 0 for code in codes) else 1


def health_command(args: argparse.Namespace) -> int:
    """Exit 0 when the server (or one of its gRPC health service names) answers SERVING: for
    container health checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _health_channel(args) as channel:
            metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                                timeout=args.timeout, metadata=metadata).status
    except grpc.RpcError as error:
        print(f"dxserve: health check failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _health_channel(args: argparse.Namespace):
    """A plain channel, or TLS when any TLS option is given (the server's own CA, and a client
    certificate for mTLS), as the client library connects."""
    import grpc

    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options)


def tokens_command(args: argparse.Namespace) -> int:
    from .auth import KeyFile

    keys = KeyFile.load(args.keys_file)
    if args.action == "list":
        for entry in keys.callers:
            how = f"certificate {entry['certificate_subject']}" if "certificate_subject" in entry else "token"
            bound = "".join(f"; {p} version {v}" for p, v in (entry.get("versions") or {}).items())
            print(f"{entry['name']}: {how}; plugins {', '.join(entry['plugins'])}{'; admin' if entry.get('admin') else ''}{bound}")
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
        pairs = [pair.partition("=") for pair in args.version]
        if any(not plugin or not version for plugin, _, version in pairs):
            raise ValueError("--version takes PLUGIN=VERSION, e.g. lymphoblast=2.1.0+taleqani.1")
        versions = {plugin: version for plugin, _, version in pairs}
        token = keys.add(args.name, args.plugins, args.admin, args.certificate_subject, versions)
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

    if args.action == "keygen":
        from .checkpoints import generate_key

        try:
            public = generate_key(args.key)
        except FileExistsError as error:
            print(f"dxserve: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.key} (private: keep it off the database's storage) and {public} (for `audit verify`)", file=sys.stderr)
        return 0
    if args.db is None:
        print(f"dxserve: audit {args.action} needs --db", file=sys.stderr)
        return 2
    try:
        store = open_store(args.db, must_exist=True)
    except FileNotFoundError as error:
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    try:
        if args.action == "verify":
            count, last, problems = verify(store)
            signed, notes = "", []
            if args.checkpoints:
                from .checkpoints import load_public_key
                from .checkpoints import verify as verify_checkpoints

                checked, found, notes = verify_checkpoints(list(store.rows()), args.checkpoints, load_public_key(args.public_key))
                problems += found
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)
                signed = f", {checked} signed checkpoints"
            for problem in problems:
                print(problem)
            # Every note of verify_checkpoints is about rows no signature covers.
            status = (f"TAMPERED: {len(problems)} problems" if problems else
                      "no tampering found, but NOT PROVEN: rows unsigned (see the notes)" if notes else "chain intact")
            print(f"{count} rows checked{signed}, {status}; last hash {last}", file=sys.stderr)
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


def plugin_command(args: argparse.Namespace) -> int:
    if args.action == "new":
        from .scaffold import new_plugin

        try:
            root = new_plugin(args.name, args.directory)
        except (ValueError, FileExistsError) as error:
            print(f"dxserve: {error}", file=sys.stderr)
            return 2
        print(f"made {root}: next, `cd {root} && pip install -e '.[test]' && pytest` (see its README.md)")
        return 0
    try:
        import pytest
    except ImportError:
        print("dxserve plugin check needs pytest: pip install 'dxserve[testing]'", file=sys.stderr)
        return 2
    flags = ["--pyargs", "dxserve.testing.conformance", "--plugin", args.name, "-p", "no:cacheprovider", "-q",
             "-W", "ignore::pytest.PytestAssertRewriteWarning"]  # dxserve is imported already: nothing to rewrite
    flags += ["--allow-ungated"] * args.allow_ungated + (["--examples", str(args.examples)] if args.examples else [])
    for module in args.plugin_module:
        flags += ["--plugin-module", module]
    return int(pytest.main(flags))


def site_command(args: argparse.Namespace) -> int:
    """`dxserve site onboard` (make a site version), `list` (what sites_dir holds), `verify` (score it
    on labelled images of other patients), `shadow-report` (how a candidate in shadow agreed) and
    `promote` (make it the default)."""
    from . import sites
    from .onboarding import MAX_UNLABELLED, OnboardingError, onboard

    try:
        settings = load_settings(args.config, {"sites_dir": args.sites_dir})
    except SettingsError as error:
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    needs = {"shadow-report": ("db", "--db (the audit_db setting)"),
             "promote": ("version", "--version (the candidate to make the default)"),
             "verify": ("version", "--version (the site version to verify)")}.get(args.action)
    if needs and not getattr(args, needs[0]):
        print(f"dxserve: site {args.action} needs {needs[1]}", file=sys.stderr)
        return 2
    if args.action == "shadow-report":
        return _shadow_report(args)
    if args.action == "promote":
        return _promote(args)
    if args.action == "verify":
        return _verify(args, settings)
    if args.action == "list":
        for folder in sites.site_folders(settings.sites_dir, args.plugin) if settings.sites_dir else []:
            site = json.loads((folder / sites.SITE_FILE).read_text())
            missed = sites.refusals(site, folder, sites.criteria_for(site["site"], settings.site_acceptance))
            verified = sites.latest_verification(folder)
            print(f"{site['version']}\t{site['made_at']}\t"
                  + (f"verification {verified['number']}: {verified.get('images', '?')} images\t" if verified else "not verified\t")
                  + ("meets its acceptance criteria" if not missed else "NOT served: " + "; ".join(missed)))
        return 0
    if not (args.site and args.labelled and args.unlabelled):
        print("dxserve: site onboard needs --site, --labelled and --unlabelled", file=sys.stderr)
        return 2
    try:
        if args.max_unlabelled is not None and args.max_unlabelled < 1:
            raise OnboardingError(f"--max-unlabelled {args.max_unlabelled}: at least 1")
        done = onboard(settings, args.plugin, args.base, args.site, args.labelled, args.unlabelled,
                       max_unlabelled=args.max_unlabelled or MAX_UNLABELLED, prevalence=args.prevalence)
    except (OnboardingError, OSError, ImportError) as error:  # ImportError: a plugin's training stack is not installed
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    print(f"wrote {done.folder}: site version {done.version}")
    return _judged(done.unmet, "it is NOT served until the site's acceptance criteria are met: ",
                   "it meets the site's acceptance criteria: a server with this sites_dir serves it (reload the plugin or restart)")


def _judged(unmet: list[str], not_met: str, met: str, file=None) -> int:
    """Print what the site's acceptance criteria made of a site version: exit 1 when any is unmet, else 0."""
    print(not_met + "; ".join(unmet) if unmet else met, file=file)
    return 1 if unmet else 0


def _verify(args: argparse.Namespace, settings) -> int:
    """A site version scored on labelled images it was not fitted on (verification.py)."""
    from . import sites
    from .onboarding import OnboardingError
    from .verification import verify

    if not args.labelled:
        print("dxserve: site verify needs --labelled (images of other patients than those it was fitted on)", file=sys.stderr)
        return 2
    said = sys.stderr if args.format == "json" else sys.stdout  # json: standard output holds the JSON alone
    try:
        done = verify(settings, args.plugin, args.version, args.labelled, log=lambda line: print(line, file=said))
    except (OnboardingError, OSError, ImportError) as error:  # what cannot be verified, and why
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({k: v for k, v in done.verification.items() if k != "rows"}, indent=1))
    else:
        figures = done.verification["figures"]
        print(f"its report (cross-validated on what it was fitted on): {sites.figures_text(done.verification['report_acceptance'])}")
        for name in ("site version", "parent"):
            print(f"{name}: {sites.figures_text(figures[name]['acceptance'])}"
                  + (f", answered {figures[name]['answered']:.3g}" if "answered" in figures[name] else ""))
    print(f"wrote {done.path}", file=said)
    if not done.unmet and done.refusals:  # met here, yet its own report (the margin over colour, say) is short
        print("it meets the site's acceptance criteria on these images, but its report (cross-validated on what it was "
              "fitted on) does not, so it is still NOT served: " + "; ".join(done.refusals), file=said)
        return 0
    return _judged(done.unmet, "it does NOT meet the site's acceptance criteria, and is not served: ",
                   "it meets the site's acceptance criteria on these images", said)


def _shadow_report(args: argparse.Namespace) -> int:
    """Agreement of the candidates run in shadow (shadow.py), from the audit trail's shadow rows."""
    from .audit import open_store
    from .shadow import report

    try:
        found = report(open_store(args.db, must_exist=True).rows())
    except (OSError, ValueError) as error:
        print(f"dxserve: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(found, indent=1))
        return 0
    for pair, entry in found.items():
        agreement = "n/a" if entry["agreement"] is None else f"{entry['agreement']:.1%}"
        print(f"{pair}: {entry['cells']} cells, decisions agree on {agreement} of those compared "
              f"({entry['not_compared']} not compared); {len(entry['specimens'])} specimens, "
              f"{entry['specimens_all_agree']} with every cell agreeing")
        for specimen, figures in entry["specimens"].items():
            print(f"  {specimen}: {figures['cells']} cells, {figures['agreement']:.1%} agree")
    if not found:
        print("no shadow rows in this trail (set [shadow] in the server's settings)")
    return 0


def _promote(args: argparse.Namespace) -> int:
    """AdminService.SetDefaultVersion: the candidate becomes the plugin's default (recorded in the trail)."""
    import grpc

    from .v1 import admin_pb2, admin_pb2_grpc

    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    with grpc.insecure_channel(args.server) as channel:
        try:
            reply = admin_pb2_grpc.AdminServiceStub(channel).SetDefaultVersion(
                admin_pb2.SetDefaultVersionRequest(plugin=args.plugin, model_version=args.version), metadata=metadata, timeout=120)
        except grpc.RpcError as error:
            print(f"dxserve: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"{args.plugin}: default {reply.previous_default} -> {reply.default_model_version} (recorded in the audit trail)")
    return 0


def weights_command(args: argparse.Namespace) -> int:
    from .runtime import sha256_of

    for path in args.files:
        try:
            print(f"{sha256_of(path)}  {path}")
        except OSError as error:
            print(f"dxserve: {path}: {error.strerror or error}", file=sys.stderr)
            return 1
    return 0


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
    tokens.add_argument("--version", action="append", default=[], metavar="PLUGIN=VERSION",
                        help="the model version its requests get when they name none, e.g. its lab's site version "
                             "lymphoblast=2.1.0+taleqani.1 (repeatable)")
    tokens.add_argument("--certificate-subject", default="", help="identify it by this client-certificate subject, "
                        "e.g. 'CN=lab-7', instead of a token")
    tokens.set_defaults(run=tokens_command)

    health = sub.add_parser("health", help="exit 0 if the server answers SERVING (gRPC health protocol)")
    health.add_argument("--address", default="127.0.0.1:50051")
    health.add_argument("--service", default="", help="e.g. dxserve.v1.DiagnosticsService/lymphoblast (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0)
    # Each option defaults to DXSERVE_HEALTH_<OPTION>, so a container's HEALTHCHECK line stays the same under TLS.
    env = lambda name: os.environ.get(f"DXSERVE_HEALTH_{name}", "")  # noqa: E731
    health.add_argument("--tls-ca", default=env("TLS_CA"), help="PEM CA bundle that signed the server's certificate: "
                        "check over TLS")
    health.add_argument("--tls-cert", default=env("TLS_CERT"), help="PEM client certificate (mTLS; with --tls-key); implies TLS")
    health.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM client private key")
    health.add_argument("--server-name", default=env("SERVER_NAME"), help="the name the server's certificate carries, when "
                        "the address does not (e.g. 'localhost' for 127.0.0.1)")
    health.add_argument("--token", default=env("TOKEN"), help="bearer token, for a server whose health checks need one "
                        "(auth_open_health = false)")
    health.set_defaults(run=health_command)

    audit = sub.add_parser("audit", help="check or export the audit trail")
    audit.add_argument("action", choices=["verify", "export", "keygen"])
    audit.add_argument("--db", help="the audit_db setting: a SQLite file or a postgresql:// URL")
    audit.add_argument("--checkpoints", type=Path, help="verify: also check the chain against this file of signed checkpoints")
    audit.add_argument("--public-key", type=Path, help="verify --checkpoints: the signing key's public half (KEY.pub)")
    audit.add_argument("--key", type=Path, help="keygen: where to write the new Ed25519 private key (KEY.pub beside it)")
    audit.add_argument("--since", default="", help="export rows from this ISO time on, e.g. 2026-11-01")
    audit.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    audit.add_argument("--output", type=Path)
    audit.set_defaults(run=audit_command)

    plugin = sub.add_parser("plugin", help="for plugin authors: scaffold a new plugin, or check one against what the server expects")
    plugin.add_argument("action", choices=["new", "check"])
    plugin.add_argument("name", help="the plugin's name (new: also its folder, distribution dxserve-NAME, package dxserve_NAME)")
    plugin.add_argument("--directory", type=Path, default=Path("."), help="new: where to make the plugin's folder")
    plugin.add_argument("--allow-ungated", action="store_true", help="check: a version without a quality gate and "
                        "out-of-distribution check is skipped, not failed (it is served only where the operator allows it)")
    plugin.add_argument("--examples", type=Path, help="check: classify these image files (default: the plugin's examples())")
    plugin.add_argument("--plugin-module", action="append", default=[], help="check: also register this module ('package.module')")
    plugin.set_defaults(run=plugin_command)

    site = sub.add_parser("site", help="site versions: adapt a version to another laboratory (onboard), list them, "
                          "score one on labelled images of other patients (verify), read how a candidate in shadow "
                          "agrees (shadow-report), make it the default (promote)")
    site.add_argument("action", choices=["onboard", "list", "verify", "shadow-report", "promote"])
    site.add_argument("--plugin", default="lymphoblast")
    site.add_argument("--base", default="", help="onboard: the version to adapt (default: the plugin's default)")
    site.add_argument("--site", help="onboard: the laboratory's short name, e.g. taleqani")
    site.add_argument("--labelled", type=Path, help="onboard, verify: CSV of path,label,group (the group: patient, or block)")
    site.add_argument("--unlabelled", type=Path, help="onboard: folder of the site's unlabelled images")
    site.add_argument("--max-unlabelled", type=int, default=None, help="onboard: of a folder with more unlabelled "
                      "images, use a seeded sample of this many (default 2000; site.json lists those used)")
    site.add_argument("--prevalence", type=float, default=None, help="onboard: the share of the plugin's first label "
                      "(lymphoblast) among the images the site will send; the site version is calibrated to it "
                      "(default: the labelled images' share)")
    site.add_argument("--sites-dir", type=Path, help="where site versions live (default: the sites_dir setting)")
    site.add_argument("--config", type=Path, help="TOML settings file (sites_dir, site_acceptance)")
    site.add_argument("--db", help="shadow-report: the audit trail (a SQLite file or a postgresql:// URL)")
    site.add_argument("--format", choices=["text", "json"], default="text", help="shadow-report's and verify's output")
    site.add_argument("--server", default="127.0.0.1:50051", help="promote: the server (plaintext; an admin's --token)")
    site.add_argument("--token", default=os.environ.get("DXSERVE_TOKEN", ""), help="promote: an admin's bearer token")
    site.add_argument("--version", default="", help="promote: the version to make the plugin's default; verify: the site version")
    site.set_defaults(run=site_command)

    weights = sub.add_parser("weights-sha256", help="print the SHA-256 of weights files, as ModelVersion.weights_sha256 wants it")
    weights.add_argument("files", nargs="+", type=Path)
    weights.set_defaults(run=weights_command)

    args = parser.parse_args(argv)
    if args.command == "audit" and (args.action == "keygen") != bool(args.key):
        parser.error("audit keygen needs --key (and only keygen takes it)")
    if args.command == "audit" and bool(args.checkpoints) != bool(args.public_key):
        parser.error("--checkpoints and --public-key go together")
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
    if settings.workers > 1:
        return supervise(settings, argv if argv is not None else sys.argv[1:])
    if settings.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.metrics_port, addr=settings.address.rpartition(":")[0].strip("[]"))
        except OSError as error:
            logging.getLogger("dxserve").error("cannot serve metrics", extra={
                "error": f"port {settings.metrics_port}: {error.strerror or error} (--metrics-port 0 turns them off)"})
            return 1
    from .app import serve as run

    try:
        asyncio.run(run(settings))
    except OSError as error:  # e.g. the port is taken
        logging.getLogger("dxserve").error("cannot serve", extra={"error": str(error)})
        return 1
    return _exit_past_hung_threads(0)


def _exit_past_hung_threads(code: int) -> int:
    """Return `code`; but a plugin call that never returned (the watchdog's unresponsive
    version: a model call, preprocessing, an explanation) would keep the interpreter from
    exiting, so then exit at once, having said so."""
    import os
    import threading

    pools = [t for t in threading.enumerate() if t.name.startswith(("model-", "decode", "explain"))]
    for thread in pools:  # the idle ones end as their pools shut down; a hung one does not
        thread.join(0.5)
    hung = [t.name for t in pools if t.is_alive()]
    if hung:
        logging.getLogger("dxserve").error("exiting past plugin calls that never returned", extra={"threads": hung})
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
