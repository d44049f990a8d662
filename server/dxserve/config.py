"""Server settings: one validated model, read from a TOML file, environment variables
(DXSERVE_<NAME>) and command-line flags, each overriding the one before."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .sites import SiteAcceptance

ENV_PREFIX = "DXSERVE_"


#: The gRPC transport and the HTTP door take this many times `max_message_bytes`; the service
#: checks each request against the limit itself, so an oversized stream item costs only itself.
TRANSPORT_FACTOR = 4


class Settings(BaseModel):
    """Every setting of `dxserve serve`, with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field("127.0.0.1:50051", description="HOST:PORT to listen on (port 0 picks a free one)")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request message")
    max_image_pixels: int = Field(25_000_000, ge=1, description="largest decoded image (width x height)")
    max_concurrent_calls: int = Field(256, ge=1, description="calls and streams served at once (health not counted); more get RESOURCE_EXHAUSTED")
    max_calls_per_caller: int = Field(64, ge=1, description="unary calls one caller may have in flight")
    max_streams_per_caller: int = Field(32, ge=1, description="streams one caller may hold open")
    max_requests_per_s_per_caller: float = Field(1000.0, ge=0, description="images a second one caller may send "
                                                 "(unary calls past it: RESOURCE_EXHAUSTED; stream items: slowed down); 0 = no limit")
    stream_idle_timeout_s: float = Field(300.0, ge=0, description="a stream that sends nothing for this long ends "
                                         "UNAVAILABLE (STREAM_IDLE) with its resume_index, freeing its place; 0 = never")
    stream_idle_when_full_s: float = Field(10.0, ge=0, description="while 90% of max_concurrent_calls are taken, a "
                                           "stream that sends nothing for this long ends UNAVAILABLE (STREAM_IDLE) with "
                                           "its resume_index, so idle streams cannot hold the places others need; 0 = never")
    stream_min_items_when_full: int = Field(2, ge=1, description="while 90% of max_concurrent_calls are taken, a stream "
                                            "that sent fewer items than this in the last stream_idle_when_full_s ends "
                                            "UNAVAILABLE (STREAM_TOO_SLOW) with its resume_index: a trickle of images "
                                            "holds a place no better than silence (1: only silent streams)")
    max_stream_age_s: float = Field(3600.0, ge=0, description="a stream open this long stops reading, answers what it "
                                    "read and ends UNAVAILABLE (STREAM_MAX_AGE) with its resume_index; 0 = never")
    max_connection_age_s: float = Field(3600.0, ge=0, description="connections are closed (GOAWAY) after this long, so "
                                        "clients reconnect and spread over replicas; streams end first, by max_stream_age_s; 0 = never")
    # 12, not 16 or 32: on 2 cores the same throughput (benchmarks/load.py, serving.py) and 30-45 MB
    # less resident memory than 16 after a burst of 64 callers, about 150 MB less than 32 (a batch's
    # activations are the high-water mark; benchmarks/RESULTS.md, issue 16 round 4).
    max_batch_size: int = Field(12, ge=1, le=1024, description="images per model call, at most")
    max_objects_per_field: int = Field(64, ge=1, le=4096, description="objects a field plugin may find in one image; "
                                       "a field with more is refused INVALID_ARGUMENT (TOO_MANY_OBJECTS)")
    max_batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long an idle model waits to fill a batch (0: "
                                     "it runs at once; batches still form from what queues while a batch runs)")
    max_queue_size: int = Field(1024, ge=1, description="images queued per model version before RESOURCE_EXHAUSTED")
    stream_window: int = Field(64, ge=1, description="items of one stream in flight before it stops reading")
    max_inflight_mb: int = Field(256, ge=1, description="requests read and not yet answered, in MB summed over every "
                                 "call: past it streams stop reading and unary calls get RESOURCE_EXHAUSTED "
                                 "(INFLIGHT_FULL); four streams of 10 MB images held 3.7 GB without it")
    explain_threads: int = Field(1, ge=1, le=16, description="threads that make explanations (apart from decoding, "
                                 "so explanations never hold up classification)")
    max_queued_explanations: int = Field(4, ge=1, description="explanations admitted at once (running or waiting); "
                                         "more get RESOURCE_EXHAUSTED")
    max_explanations_per_caller: int = Field(2, ge=1, description="explanations one caller may have admitted at once")
    # One per core (as the in-process baseline does), not 4: on 2 cores streaming ran 93-95
    # images/s against 87-88 with 4 threads competing with the model's (benchmarks/serving.py).
    decode_threads: int = Field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 64)), ge=1, le=64,
                                description="threads that decode and preprocess images (default: one per CPU core)")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port (SO_REUSEPORT), the CPU's "
                         "threads split between them; needs a fixed port")
    reuse_port: bool = Field(False, description="share the port with other processes (SO_REUSEPORT); `--workers N` "
                             "sets it for its own workers; false: a port in use is an error")
    preload_versions: bool = Field(False, description="load every model version at start; false: the default one, "
                                   "the others on first use")
    ungated_versions_allowed: list[str] = Field(default_factory=list, description="model versions served although they "
                                                "lack an input quality gate or an out-of-distribution check, as "
                                                "'plugin/version' patterns ('lymphoblast/1.*', '*'): for research use only")
    default_fallback: bool = Field(False, description="when a plugin's default version cannot be served (failed, "
                                   "ungated), requests without a version get its newest servable one; false: refused")
    predict_timeout_s: float = Field(30.0, gt=0, description="a plugin call (model, preprocessing, finding objects, "
                                     "explaining) running longer marks its version unresponsive (health NOT_SERVING, "
                                     "its queue failed fast) until it returns; its thread is replaced")
    sites_dir: Path | None = Field(None, description="folder of site versions (`dxserve site onboard`): "
                                   "<plugin>/<version>+<site>.<n>/; none: no site versions are listed")
    site_acceptance: dict[str, SiteAcceptance] = Field(default_factory=lambda: {"*": SiteAcceptance()}, description=
                                                       "what a site version's validation report must meet to be served, "
                                                       "per site name ('*': any site) (TOML tables only)")
    shadow: dict[str, str] = Field(default_factory=dict, description="{plugin: candidate model version} classified in "
                                   "shadow beside the served version of every request that names none: counted and "
                                   "audited, never returned (TOML table [shadow])")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to register, as 'package.module'")
    disabled_plugins: list[str] = Field(default_factory=list, description="entry-point plugins not to load")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key, serve TLS")
    tls_key: Path | None = Field(None, description="PEM private key")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; when set, clients must present a certificate")
    auth_keys_file: Path | None = Field(None, description="JSON file of callers (`dxserve tokens add`); when set, every call "
                                        "needs a bearer token or a client certificate it names")
    auth_open_health: bool = Field(True, description="health checks need no identity")
    auth_open_reflection: bool = Field(True, description="server reflection needs no identity")
    audit_db: str = Field("dxserve-audit.sqlite3", description="audit trail: a SQLite file, or a postgresql:// URL; empty = off")
    audit_required: bool = Field(True, description="a request whose audit record cannot be written fails (UNAVAILABLE), "
                                 "and health reports NOT_SERVING until the trail is writable again")
    audit_checkpoint_key: Path | None = Field(None, description="Ed25519 private key (`dxserve audit keygen`), kept "
                                              "outside the database: sign the chain head into audit_checkpoints")
    audit_checkpoints: Path | None = Field(None, description="append-only file of signed chain heads (one JSON line "
                                           "each), on other storage than the database; with audit_checkpoint_key")
    audit_checkpoint_interval_s: float = Field(60.0, gt=0, description="how often the chain head is signed while rows are added")
    audit_stall_s: float = Field(10.0, ge=0, description="an audit write that has not returned for this long (a frozen "
                                 "disk, a hung database) marks the trail stalled: health NOT_SERVING, records refused "
                                 "(UNAVAILABLE, retry later) until it returns; 0 = never")
    audit_max_pending: int = Field(4096, ge=1, description="results waiting for their audit record, at most; more are "
                                   "refused (UNAVAILABLE, retry later) rather than held")
    audit_max_pending_mb: int = Field(256, ge=1, description="MB of images (kept until hashed by the writer) those "
                                      "waiting results may hold")
    audit_min_free_mb: int = Field(64, ge=0, description="SQLite audit trail: below this much free disk, records are "
                                   "refused cleanly (as if the disk were full) before it fills; 0 = no low-water mark")
    tracing: bool = Field(False, description="OpenTelemetry traces of every call; the exporter comes from the "
                          "standard OTEL_* variables (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, ...)")
    http_port: int = Field(8000, ge=0, le=65535, description="the Open Inference Protocol's HTTP/REST binding "
                           "(/v2/...) on the listen host, with the gRPC port's TLS, tokens and limits; 0 = off")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port on the listen host; 0 = off")
    grace_period_s: float = Field(10.0, ge=0, description="time calls in flight get to finish on SIGTERM")
    drain_answer_s: float = Field(3.0, ge=0, description="on SIGTERM, how long streams go on answering (in order) "
                                  "items already read, at most half the grace; the rest are dropped unrun and "
                                  "resent by the client from the stream's resume_index")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field("auto", description="json (one object a line, for collectors), "
                                                        "text (for people), or auto: text on a terminal, else json")

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @model_validator(mode="after")
    def _workers_need_a_port(self) -> "Settings":
        if self.workers > 1 and self.address.endswith(":0"):
            raise ValueError("workers > 1 share one port: give a fixed port, not 0")
        return self

    @model_validator(mode="after")
    def _checkpoint_pair(self) -> "Settings":
        if (self.audit_checkpoint_key is None) != (self.audit_checkpoints is None):
            raise ValueError("audit_checkpoint_key and audit_checkpoints go together")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_keys_file, self.audit_checkpoint_key):
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        return self


class SettingsError(ValueError):
    """Settings that do not validate, with one line per problem."""


def from_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """DXSERVE_* variables; list settings are comma-separated."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = [v for v in raw.split(",") if v] if field.annotation == list[str] else raw
    return values


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """TOML file, then environment, then `overrides` (the command line's flags)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise SettingsError(f"cannot read {config_file}: {error}") from error
    values.update(from_environment(environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
