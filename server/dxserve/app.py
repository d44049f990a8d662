"""Assemble and run the server: service, health, reflection, limits, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import images, metrics, reflection
from .admin import AdminService, Operations
from .audit import AuditTrail, open_store
from .auth import CallerInterceptor, KeyFile, Refusals, open_methods
from .config import TRANSPORT_FACTOR, Settings
from .inference import InferenceService
from .inference import add_to_server as add_inference_to_server
from .oip import grpc_service_pb2 as oip
from .registry import LOADING, READY, PluginEntry, discover, load_all
from .rest import RestDoor, tls_context
from .service import DiagnosticsService
from .v1 import admin_pb2, admin_pb2_grpc
from .v1 import diagnostics_pb2 as pb
from .v1 import diagnostics_pb2_grpc as pb_grpc

log = logging.getLogger("dxserve.app")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
#: Health name that is SERVING while the process answers at all, until it stops: for liveness
#: probes, which must not restart a server whose plugins or audit database are down.
LIVENESS_NAME = "dxserve.v1.Liveness"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
#: The Open Inference Protocol v2 (KServe, Triton) beside dxserve.v1: inference.py.
INFERENCE_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def plugin_health_name(plugin: str, version: str = "") -> str:
    """The grpc.health.v1 service name of one plugin, e.g. 'dxserve.v1.DiagnosticsService/lymphoblast',
    or of one of its model versions, e.g. 'dxserve.v1.DiagnosticsService/lymphoblast/2.0.0'."""
    return f"{SERVICE_NAME}/{plugin}" + (f"/{version}" if version else "")


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        return None
    root = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def _checkpointer(settings: Settings):
    if settings.audit_checkpoint_key is None:
        return None
    from .checkpoints import Checkpointer

    return Checkpointer(settings.audit_checkpoint_key, settings.audit_checkpoints)


def connection_age(settings: Settings) -> list[tuple[str, int]]:
    """gRPC's connection age limit (GOAWAY: clients reconnect and spread over replicas); its
    grace outlasts the oldest stream (max_stream_age_s), so streams end first, with a resume point."""
    if not settings.max_connection_age_s:
        return []
    options = [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000))]
    if settings.max_stream_age_s:
        options.append(("grpc.max_connection_age_grace_ms", int((settings.max_stream_age_s + 60) * 1000)))
    return options


class Server:
    """A running dxserve server; `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        images.limit_pixels(settings.max_image_pixels)
        self.plugins: dict[str, PluginEntry] = discover(settings)
        for entry in self.plugins.values():
            entry.notify = self._on_plugin_change  # a version failing, hanging or recovering changes health
        self._loop: asyncio.AbstractEventLoop | None = None
        self.audit = AuditTrail(open_store(settings.audit_db, settings.audit_min_free_mb * 2**20), settings.audit_required,
                                self._on_audit_change, checkpointer=_checkpointer(settings),
                                checkpoint_interval_s=settings.audit_checkpoint_interval_s, stall_s=settings.audit_stall_s,
                                max_pending=settings.audit_max_pending,
                                max_pending_bytes=settings.audit_max_pending_mb * 2**20) if settings.audit_db else None
        if self.audit is not None and self.audit.problem:  # its start row failed before this server held it: say so
            self._on_audit_change()
        self.service = DiagnosticsService(self.plugins, settings, self.audit)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._loading: asyncio.Task | None = None
        self._stopping = False
        self._announced = False  # the "ready" line is logged once
        self.key_file_error = ""  # why the key file did not read on its last reload (every caller refused meanwhile)
        # Identity, authorization context and limits for every call; health is never limited.
        self.callers = CallerInterceptor(
            KeyFile.load(settings.auth_keys_file) if settings.auth_keys_file else None,
            open_methods(settings.auth_open_health, settings.auth_open_reflection),
            settings.max_concurrent_calls, settings.max_calls_per_caller, settings.max_streams_per_caller,
            settings.max_requests_per_s_per_caller, Refusals(self.audit))
        self.service.crowded = self.callers.crowded  # idle streams give their places up when the server is full
        interceptors = [self.callers]
        if settings.tracing:  # outermost: refused calls are traced too
            from .tracing import server_interceptor

            interceptors.insert(0, server_interceptor())
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # The transport takes up to 4x the per-request limit, which the service checks per
                # request: an oversized stream item is refused alone and the stream goes on.
                ("grpc.max_receive_message_length", TRANSPORT_FACTOR * settings.max_message_bytes),
                ("grpc.max_send_message_length", TRANSPORT_FACTOR * settings.max_message_bytes),
                *connection_age(settings),
                # Only `--workers N` shares a port (the kernel spreads connections over its own workers):
                # a second server on a taken port is refused, instead of silently taking a share.
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            ],
        )
        self.operations = Operations(self.plugins, settings, self.audit, self._on_plugin_change)
        pb_grpc.add_DiagnosticsServiceServicer_to_server(self.service, self._server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(self.operations), self._server)
        self.inference = InferenceService(self.service, self.ready)
        add_inference_to_server(self.inference, self._server)  # requests' bytes: size checked before parsing
        # The same protocol over HTTP/REST, behind the same identity and limits (rest.py).
        self.rest = RestDoor(self.inference, self.callers, settings) if settings.http_port else None
        self.http_port = 0
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable(self._server, (SERVICE_NAME, ADMIN_SERVICE_NAME, INFERENCE_SERVICE_NAME,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))

    async def start(self) -> None:
        """Listen at once (ListPlugins and health answer while plugins load), then load them."""
        self._loop = asyncio.get_running_loop()
        credentials = _credentials(self.settings)
        try:
            if credentials:
                self.port = self._server.add_secure_port(self.settings.address, credentials)
            else:
                self.port = self._server.add_insecure_port(self.settings.address)
        except RuntimeError as error:  # gRPC's words for a port that is taken or not ours to bind
            raise OSError(f"cannot listen on {self.settings.address}: the address is in use or cannot be bound "
                          f"({str(error).split(';')[0]})") from None
        for name in self.plugins:
            await self.health.set(plugin_health_name(name), NOT_SERVING)
        await self.health.set(LIVENESS_NAME, SERVING)
        await self._set_overall()
        await self._server.start()
        host = self.settings.address.rpartition(":")[0]
        if self.rest is not None:
            try:
                self.http_port = await self.rest.start(host.strip("[]"), self.settings.http_port, tls_context(self.settings))
            except OSError:
                await self._server.stop(None)
                raise
        log.info("listening", extra={"address": f"{host}:{self.port}", "tls": credentials is not None,
                                      "http": f"{host}:{self.http_port}" if self.rest else "off", "plugins": list(self.plugins)})
        self._loading = asyncio.ensure_future(load_all(self.plugins, self.settings, self._on_plugin_change))

    async def _on_plugin_change(self, entry: PluginEntry) -> None:
        metrics.version_states(entry)
        await self._set_plugin(entry)
        await self._set_overall()

    def _on_audit_change(self) -> None:
        """From the audit writer thread: the trail failed or recovered. It writes its start row at
        once, so this can come before `self.audit` is assigned; health reads `failing` at `start`."""
        if getattr(self, "audit", None) is None:
            return
        metrics.AUDIT_STALLED.set(1 if self.audit.stalled else 0)
        if self.audit.problem:
            log.error("audit trail cannot be written: health NOT_SERVING until it can", extra={"error": self.audit.problem})
        else:
            log.warning("audit trail writable again: health follows the plugins")
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._set_all(), self._loop)

    def _answering(self) -> bool:
        """Whether a result can be given at all: not stopping, (when records are required) the trail is writable,
        and the key file read on its last reload."""
        return not self._stopping and not (self.audit is not None and self.audit.required and self.audit.problem) \
            and not self.key_file_error

    async def _set_plugin(self, entry: PluginEntry) -> None:
        """The plugin's health name (its default version serves) and one per version."""
        answering = self._answering()
        await self.health.set(plugin_health_name(entry.name), SERVING if answering and entry.serving else NOT_SERVING)
        for version in entry.versions:
            serving = answering and entry.state == READY and entry.servable(version.version)
            await self.health.set(plugin_health_name(entry.name, version.version), SERVING if serving else NOT_SERVING)

    async def _set_all(self) -> None:
        for entry in self.plugins.values():
            await self._set_plugin(entry)
        await self._set_overall()

    def ready(self) -> bool:
        """The server as a whole serves once no plugin is still loading and one serves (a plugin
        that failed is settled, and its own health name says so): a probe on the overall name
        never sends traffic to a server whose plugins are half loaded (issue 32)."""
        entries = self.plugins.values()
        return self._answering() and not any(e.state == LOADING for e in entries) and any(e.serving for e in entries)

    async def _set_overall(self) -> None:
        serving = self.ready()
        if serving and not self._announced:  # one plain line when the server first serves
            self._announced = True
            audit_where = self.settings.audit_db.split("@")[-1] if self.settings.audit_db else "off"
            host = self.settings.address.rpartition(':')[0]
            http = f" (HTTP {host}:{self.http_port})" if self.rest else ""
            log.info(f"ready on {host}:{self.port}{http}", extra={
                "tls": bool(self.settings.tls_cert), "audit": audit_where,
                "versions": {e.name: e.default_version for e in self.plugins.values() if e.serving}})
        await self.health.set(health.OVERALL_HEALTH, SERVING if serving else NOT_SERVING)
        await self.health.set(SERVICE_NAME, SERVING if serving else NOT_SERVING)

    async def reload(self, who: str) -> None:
        """SIGHUP: read the key file again (new and revoked callers), then reload every plugin."""
        if self.settings.auth_keys_file:
            try:
                self.callers.keys = KeyFile.load(self.settings.auth_keys_file)
                self.key_file_error = ""
            except (OSError, ValueError) as error:
                # Fail closed (issue 32): the old file may hold callers this edit revoked, so no caller is
                # known until the file reads again; open streams end at their next item; health says so.
                self.callers.keys = KeyFile(self.settings.auth_keys_file)
                self.key_file_error = f"{type(error).__name__}: {error}"
                log.error("key file cannot be read: every caller is refused and health is NOT_SERVING until it can "
                          "(fix it, then SIGHUP)", extra={"error": self.key_file_error})
            metrics.KEY_FILE_READABLE.set(0 if self.key_file_error else 1)
            await self._set_all()
        await self.wait_loaded()
        await self.operations.reload([], who)

    async def wait_loaded(self) -> None:
        if self._loading:
            await self._loading

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: health goes NOT_SERVING, new calls are refused, calls in flight finish."""
        grace_s = self.settings.grace_period_s if grace_s is None else grace_s
        self._stopping = True
        self.service.drain()  # streams stop reading now and end, within the grace, with where to resume
        await self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"grace_s": grace_s})
        await asyncio.gather(self._server.stop(grace_s), *([self.rest.stop(grace_s)] if self.rest else []))
        if self._loading:
            self._loading.cancel()
        for entry in self.plugins.values():
            for batcher in entry.batchers.values():
                await batcher.stop()
        self.service.close()
        if self.audit is not None:
            self.audit.close(timeout_s=max(grace_s, 1.0))  # a stalled disk does not hold the stop past its grace
        if self.settings.tracing:
            from .tracing import shutdown

            shutdown()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads."""
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start: once health says SERVING, a SIGTERM must already mean a graceful stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload("signal:SIGHUP")))
    await server.start()
    await stop.wait()
    await server.stop()
