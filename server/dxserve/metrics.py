"""Prometheus metrics (served on settings.metrics_port when it is set)."""

from prometheus_client import Counter, Histogram

# The `plugin` label of a request naming no plugin the server has.
UNKNOWN_PLUGIN = "unknown"

LATENCY = Histogram("dxserve_classify_seconds", "Time from request to result, per image", ["plugin"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("dxserve_errors_total", "Images answered with an error", ["plugin", "code"])
BATCH_SIZE = Histogram("dxserve_batch_size", "Images per model call", ["plugin"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
GATE_REFUSED = Counter("dxserve_quality_gate_refused_total", "Images refused by the plugin's input quality gate "
                       "or by its model's own check (answered indeterminate)", ["plugin"])
DROPPED = Counter("dxserve_dropped_total", "Queued images dropped before the model because the caller left",
                  ["plugin", "why"])
