"""Prometheus metrics (served on settings.metrics_port when it is set), per plugin and model version.

Label values are bounded: plugins and versions the server has, gRPC status code names, the
plugins' own labels and "indeterminate"; anything a client invents is counted as "unknown".
"""

from prometheus_client import Counter, Gauge, Histogram

# The `plugin` / `version` label of a request naming none the server has.
UNKNOWN = "unknown"
UNKNOWN_PLUGIN = UNKNOWN

REQUESTS = Counter("dxserve_requests_total", "Images answered (calls and stream items), by gRPC status code",
                   ["plugin", "version", "code"])
LATENCY = Histogram("dxserve_request_seconds", "Time from request to answer, per image (explanations included)",
                    ["plugin", "version"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320))
DECISIONS = Counter("dxserve_decisions_total", "Results by decided label ('indeterminate' included)",
                    ["plugin", "version", "decision"])
GATE_REFUSED = Counter("dxserve_quality_gate_refused_total", "Images refused by the plugin's input quality gate "
                       "or by its model's own check (answered indeterminate)", ["plugin", "version"])
BATCH_SIZE = Histogram("dxserve_batch_size", "Images per model call", ["plugin", "version"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
DROPPED = Counter("dxserve_dropped_total", "Queued images dropped before the model, by reason (deadline, cancelled)",
                  ["plugin", "version", "reason"])
UNRESPONSIVE = Counter("dxserve_unresponsive_total", "Model calls that ran past predict_timeout_s (the version "
                       "was marked unresponsive until the call returned)", ["plugin", "version"])
VERSION_STATE = Gauge("dxserve_version_state", "1 for the state each listed model version is in (AVAILABLE, READY, "
                      "FAILED, NOT_SERVED, UNRESPONSIVE), 0 for the others", ["plugin", "version", "state"])
VERSION_STATES = ("AVAILABLE", "READY", "FAILED", "NOT_SERVED", "UNRESPONSIVE")
EXPLANATIONS_REFUSED = Counter("dxserve_explanations_refused_total", "Explanation requests refused RESOURCE_EXHAUSTED, "
                               "by the limit they hit (server: max_queued_explanations; caller: max_explanations_per_caller)",
                               ["limit"])
AUTH_REFUSED = Counter("dxserve_auth_refused_total", "Calls refused before the service: UNAUTHENTICATED by cause "
                       "(no_credentials, unknown_token, unknown_certificate, revoked), or a caller's limits (too_many_calls, "
                       "rate_limited)", ["reason"])
KEY_FILE_READABLE = Gauge("dxserve_key_file_readable", "0 while the key file (auth_keys_file) failed to read on its last "
                          "reload: every caller is refused until it reads again; 1 otherwise")
QUEUE_DEPTH = Gauge("dxserve_queue_depth", "Images waiting for the model", ["plugin", "version"])
IN_FLIGHT = Gauge("dxserve_in_flight", "Requests admitted to a model version and not yet answered", ["plugin", "version"])
INFLIGHT_BYTES = Gauge("dxserve_inflight_bytes", "Bytes of requests read and not yet answered, every call together "
                       "(bounded by max_inflight_mb)")


_watched: dict[tuple[str, str], object] = {}  # (plugin, version) -> the batcher whose gauges are exported


def watch(batcher) -> None:
    """Export a loaded version's queue depth and requests in flight, read when scraped."""
    labels = (batcher.plugin, batcher.version)
    _watched[labels] = batcher
    QUEUE_DEPTH.labels(*labels).set_function(lambda: batcher.queued)
    IN_FLIGHT.labels(*labels).set_function(lambda: batcher.in_flight)


def unwatch(batcher) -> None:
    """Stop exporting a stopped batcher's gauges, unless its successor (a reload) took them over."""
    labels = (batcher.plugin, batcher.version)
    if _watched.get(labels) is batcher:
        del _watched[labels]
        for gauge in (QUEUE_DEPTH, IN_FLIGHT):
            gauge.remove(*labels)


def answered(plugin: str, version: str, code: str, seconds: float, decision: str = "", gate_refused: bool = False) -> None:
    """Count one answered image (plugin and version already bounded to known names or UNKNOWN)."""
    REQUESTS.labels(plugin, version, code).inc()
    LATENCY.labels(plugin, version).observe(seconds)
    if decision:
        DECISIONS.labels(plugin, version, decision).inc()
    if gate_refused:
        GATE_REFUSED.labels(plugin, version).inc()


def version_states(entry) -> None:
    """Export one plugin's version states (called whenever they change)."""
    for version in entry.versions:
        current, _ = entry.version_state(version.version)
        for state in VERSION_STATES:
            VERSION_STATE.labels(entry.name, version.version, state).set(1 if state == current else 0)
AUDIT_STALLED = Gauge("dxserve_audit_stalled", "1 while an audit write has run past audit_stall_s (health NOT_SERVING, "
                      "records refused until it returns)")
