"""OpenTelemetry traces of every gRPC call, when `tracing = true` (off by default).

The exporter is set by the standard OTEL_* environment variables: OTEL_TRACES_EXPORTER
("otlp", the default, or "console"), OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, and so
on. Spans come from opentelemetry-instrumentation-grpc's server interceptor: one per call,
with the method and status code; no image data is ever put in a span.
"""

from __future__ import annotations

import os


def server_interceptor():
    """A grpc.aio server interceptor that traces each call, with the SDK set up from OTEL_* variables."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers and TLS from OTEL_EXPORTER_OTLP_* variables
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "dxserve")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return aio_server_interceptor(tracer_provider=provider)


def shutdown() -> None:
    """Send the spans still buffered."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
