"""dxserve.v1.AdminService: reload plugins' versions and set default versions, admins only.

SIGHUP runs the same reload for every plugin (and re-reads the key file). Every change is a
row of the audit trail (event "reload" or "default_version"), with who made it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from . import auth, errors
from .audit import AuditTrail, AuditUnavailable
from .registry import LOADING, PluginEntry, ReloadReport, ensure_loaded, reload
from .config import Settings
from .v1 import admin_pb2 as pb
from .v1 import admin_pb2_grpc as pb_grpc

log = logging.getLogger("dxserve.admin")


class Operations:
    """The changes themselves, for the admin RPCs and for SIGHUP alike."""

    def __init__(self, plugins: dict[str, PluginEntry], settings: Settings, audit_trail: AuditTrail | None,
                 on_change: Callable[[PluginEntry], Awaitable[None]]):
        self.plugins, self.settings, self.audit, self.on_change = plugins, settings, audit_trail, on_change

    async def reload(self, names: list[str], who: str) -> list[ReloadReport]:
        unknown = [n for n in names if n not in self.plugins]
        if unknown:
            raise errors.not_found("plugin", unknown[0], f"unknown plugin {errors.clip(unknown[0])!r}")
        reports = []
        for name in sorted(names or self.plugins):
            report = await reload(self.plugins[name], self.settings)
            await self.on_change(self.plugins[name])
            await self._record("reload", who, name, report.default_version, report.__dict__)
            reports.append(report)
        return reports

    async def set_default(self, name: str, version: str, who: str) -> tuple[str, str]:
        entry = self.plugins.get(name)
        if entry is None:
            raise errors.not_found("plugin", name, f"unknown plugin {errors.clip(name)!r}")
        if entry.state == LOADING:  # its versions are not listed yet: say so, not "has no version" (issue 31)
            raise errors.unavailable(name, f"plugin {name!r} is still loading (LOADING): set its default version once it is "
                                     "loaded", "PLUGIN_LOADING", retry_after_s=1)
        if version and not any(v.version == version for v in entry.versions):
            raise errors.not_found("model_version", f"{name}/{version}", f"plugin {name!r} has no version "
                                   f"{errors.clip(version)!r} (has: {', '.join(v.version for v in entry.versions)})")
        if version:
            await ensure_loaded(entry, version, self.settings)  # loaded and warm before it takes the traffic
        previous = entry.default_version
        entry.default_override = version
        await self._record("default_version", who, name, entry.default_version, {"previous_default": previous})
        log.info("default version set", extra={"plugin": name, "previous": previous, "default": entry.default_version, "by": who})
        return previous, entry.default_version

    async def _record(self, event: str, who: str, plugin: str, version: str, detail: dict) -> None:
        if self.audit is not None:
            try:
                await self.audit.record(event=event, caller=who, plugin=plugin, model_version=version, status="OK",
                                        detail=json.dumps(detail, sort_keys=True))
            except AuditUnavailable as error:  # the change is made: say loudly that it is not on record
                log.error("admin change not recorded in the audit trail", extra={"event": event, "plugin": plugin, "error": str(error)})


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, operations: Operations):
        self.operations = operations

    async def ReloadPlugins(self, request: pb.ReloadPluginsRequest, context) -> pb.ReloadPluginsResponse:
        try:
            auth.require_admin()
            reports = await self.operations.reload(list(request.plugins), auth.CALLER.get().name)
        except errors.ServingError as error:
            return error.end(context)
        return pb.ReloadPluginsResponse(plugins=[pb.PluginReload(
            plugin=r.plugin, ok=r.ok, error=r.error, loaded=r.loaded, removed=r.removed, kept=r.kept,
            previous_default=r.previous_default, default_model_version=r.default_version) for r in reports])

    async def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest, context) -> pb.SetDefaultVersionResponse:
        try:
            auth.require_admin()
            previous, current = await self.operations.set_default(request.plugin, request.model_version, auth.CALLER.get().name)
        except errors.ServingError as error:
            return error.end(context)
        return pb.SetDefaultVersionResponse(previous_default=previous, default_model_version=current)
