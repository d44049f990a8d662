"""Find plugins through entry points, load their model versions, and track their state.

A plugin that cannot be imported, declares nothing usable, has weights whose hash does not
match, or raises in `load()` is kept as FAILED with the reason; the others serve on.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pluggy

from . import errors, heap, hookspecs, safety, sites
from .batcher import Batcher
from .config import Settings
from .runtime import ModelRuntime, ModelVersion, PluginInfo, sha256_of

log = logging.getLogger("dxserve.registry")

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"
AVAILABLE, NOT_SERVED, UNRESPONSIVE = "AVAILABLE", "NOT_SERVED", "UNRESPONSIVE"  # a version's other states


@dataclass
class PluginEntry:
    """One plugin as the server sees it."""

    name: str
    state: str = LOADING
    reason: str = ""
    runtime_class: type[ModelRuntime] | None = None
    versions: list[ModelVersion] = field(default_factory=list)
    batchers: dict[str, Batcher] = field(default_factory=dict)  # by model version, once loaded
    default_override: str = ""  # set by AdminService.SetDefaultVersion (e.g. a rollback)
    loading: dict[str, asyncio.Future] = field(default_factory=dict)  # versions loading on first use
    faults: dict[str, tuple[str, str]] = field(default_factory=dict)  # version -> (FAILED or NOT_SERVED, why)
    fallback: bool = False  # settings.default_fallback
    #: Awaited with the entry after any change of its or its versions' state (health, ...).
    notify: Callable[["PluginEntry"], Awaitable[None]] | None = None

    @property
    def info(self) -> PluginInfo | None:
        return self.runtime_class.info if self.runtime_class else None

    def version_state(self, name: str) -> tuple[str, str]:
        """(AVAILABLE, READY, FAILED, NOT_SERVED or UNRESPONSIVE, why) of one listed version."""
        if name in self.faults:
            return self.faults[name]
        batcher = self.batchers.get(name)
        if batcher is None:
            return AVAILABLE, ""
        return (UNRESPONSIVE, batcher.unresponsive) if batcher.unresponsive else (READY, "")

    def servable(self, name: str) -> bool:
        return self.version_state(name)[0] in (AVAILABLE, READY)

    @property
    def default_version(self) -> str:
        names = [v.version for v in self.versions]
        default = self.default_override if self.default_override in names else next(iter(names), "")
        if self.fallback and default and not self.servable(default):  # only if the operator allows it
            return next((n for n in names if self.servable(n)), default)
        return default

    @property
    def serving(self) -> bool:
        """Ready, and a request that names no version would be answered."""
        return self.state == READY and bool(self.default_version) and self.servable(self.default_version)

    async def changed(self) -> None:
        if self.notify is not None:
            await self.notify(self)


def plugin_manager(settings: Settings) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager with every entry-point plugin and every module in settings.plugins
    registered; returns it with {plugin name: import error} for those that failed."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    failures: dict[str, str] = {}
    sources = [(ep.name, ep.load) for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)
               if ep.name not in settings.disabled_plugins]
    sources += [(module, lambda module=module: importlib.import_module(module)) for module in settings.plugins]
    for name, load in sources:
        if manager.has_plugin(name):
            continue
        try:
            manager.register(load(), name=name)
        except Exception as error:  # an uninstallable plugin must not take the server down
            log.error("plugin import failed", extra={"plugin": name, "error": repr(error)})
            failures[name] = f"import failed: {type(error).__name__}: {error}"
    return manager, failures


def discover(settings: Settings) -> dict[str, PluginEntry]:
    """Every plugin, keyed by its served name, in LOADING (or FAILED) state."""
    manager, failures = plugin_manager(settings)
    entries = {name: PluginEntry(name, FAILED, reason) for name, reason in failures.items()}
    for module_name, module in manager.list_name_plugin():
        caller = manager.subset_hook_caller("dxserve_model_runtimes", [p for p in manager.get_plugins() if p is not module])
        try:
            runtime_classes = [cls for group in caller() for cls in group]
        except Exception as error:
            entries[module_name] = PluginEntry(module_name, FAILED, f"dxserve_model_runtimes raised {type(error).__name__}: {error}")
            continue
        for cls in runtime_classes:
            if not (isinstance(cls, type) and issubclass(cls, ModelRuntime) and isinstance(getattr(cls, "info", None), PluginInfo)):
                entries[module_name] = PluginEntry(module_name, FAILED, f"{cls!r} is not a ModelRuntime subclass with a PluginInfo `info`")
                continue
            name = cls.info.name
            if name in entries:
                log.error("duplicate plugin name ignored", extra={"plugin": name, "module": module_name})
                continue
            entries[name] = PluginEntry(name, runtime_class=cls, fallback=settings.default_fallback)
    return dict(sorted(entries.items()))


def load_versions(entry: PluginEntry, settings: Settings, loaded: dict[str, Batcher] | None = None,
                  ) -> tuple[list[ModelVersion], dict[str, ModelRuntime], dict[str, tuple[str, str]]]:
    """Blocking: list the plugin's versions and check each one alone: a version without the
    required safety checks (and not allowed) is NOT_SERVED; every other version's weights are
    hashed again (loaded ones too: the file is what the next start will load), and one not in
    `loaded` with the same weights is loaded: all of them with `settings.preload_versions`,
    else the default one (and changed ones that were loaded), the others on first use
    (`ensure_loaded`). A version that fails is FAILED alone. Returns (every version, the newly
    loaded runtimes, {version: (state, reason)} of those that cannot be served). Raises only
    when the plugin lists no versions."""
    assert entry.runtime_class is not None
    versions = list(entry.runtime_class.versions())
    if not versions:
        raise RuntimeError("the plugin declares no model versions")
    loaded = loaded or {}
    default = entry.default_override if any(v.version == entry.default_override for v in versions) else versions[0].version
    runtimes, faults = {}, {}
    if settings.sites_dir is not None and entry.runtime_class.adapts():
        site_versions, refused = sites.site_versions(settings.sites_dir, entry.name, versions, settings.site_acceptance)
        versions += site_versions
        for name, why in refused.items():
            faults[name] = NOT_SERVED, f"site version {name}: {why}"
            log.warning("site version not served", extra={"plugin": entry.name, "version": name, "reason": why})
    for version in versions:
        if version.version in faults:
            continue
        missing = safety.missing_checks(entry.runtime_class, version)
        if missing and not safety.allowed_ungated(settings.ungated_versions_allowed, entry.name, version.version):
            faults[version.version] = NOT_SERVED, safety.refusal_reason(entry.name, version.version, missing)
            continue
        kept = loaded.get(version.version)
        try:
            if kept is not None and kept.runtime.version.weights_sha256 == version.weights_sha256:
                verify_weights(version)
            elif settings.preload_versions or kept is not None or version.version == default:
                runtimes[version.version] = load_runtime(entry.runtime_class, version)
            else:
                verify_weights(version)  # a corrupt file is found now, not by the first request
        except Exception as error:
            faults[version.version] = FAILED, f"{type(error).__name__}: {error}"
            log.error("model version failed; the plugin's other versions serve on",
                      extra={"plugin": entry.name, "version": version.version, "reason": faults[version.version][1]})
    return versions, runtimes, faults


def verify_weights(version: ModelVersion) -> None:
    actual = sha256_of(version.weights)
    if actual != version.weights_sha256:
        raise RuntimeError(f"weights {version.weights.name} of version {version.version} have SHA-256 "
                           f"{actual}, not the declared {version.weights_sha256}: refusing corrupt or altered weights")


def load_runtime(runtime_class: type[ModelRuntime], version: ModelVersion) -> ModelRuntime:
    """Blocking: verify one version's weights against their declared SHA-256, then load it."""
    verify_weights(version)
    runtime = runtime_class(version)
    runtime.load()  # plugins warm their model here: a version takes traffic only once it is fast
    # Loading frees much more than it keeps (lymphoblast's graph freezing: about 40 MB held
    # by malloc after it, measured); hand it back before traffic comes.
    heap.return_freed_memory()
    return runtime


async def ensure_loaded(entry: PluginEntry, name: str, settings: Settings) -> Batcher:
    """The batcher of version `name`, loading it first if it was left for first use; the
    requests that arrive meanwhile wait for the same load. A version that cannot be served is
    refused: NOT_SERVED with FAILED_PRECONDITION, FAILED (remembered until the next reload)
    and UNRESPONSIVE with UNAVAILABLE."""
    state, reason = entry.version_state(name)
    if state == NOT_SERVED:
        version = next(v for v in entry.versions if v.version == name)
        if "site" in version.extra:
            raise errors.site_not_accepted(entry.name, name, reason)
        raise errors.version_ungated(entry.name, name, safety.missing_checks(entry.runtime_class, version), reason)
    if state == FAILED:
        raise errors.unavailable(entry.name, f"model version {name!r} of plugin {entry.name!r} failed: {reason}", "VERSION_FAILED")
    if state == UNRESPONSIVE:
        raise errors.unavailable(entry.name, reason, "VERSION_UNRESPONSIVE", retry_after_s=1)
    if name in entry.batchers:
        return entry.batchers[name]
    version = next(v for v in entry.versions if v.version == name)
    if name not in entry.loading:
        log.info("loading model version on first use", extra={"plugin": entry.name, "version": name})
        entry.loading[name] = asyncio.ensure_future(asyncio.to_thread(load_runtime, entry.runtime_class, version))
    try:
        runtime = await asyncio.shield(entry.loading[name])
    except Exception as error:
        if name not in entry.faults and entry.loading.get(name) is not None:  # the first waiter records it
            entry.faults[name] = FAILED, f"{type(error).__name__}: {error}"
            await entry.changed()
        raise errors.unavailable(entry.name, f"model version {name!r} of plugin {entry.name!r} failed to load: "
                                 f"{type(error).__name__}: {error}", "VERSION_FAILED") from None
    if name not in entry.batchers and entry.loading.get(name) is not None:  # the first waiter starts it
        entry.batchers[name] = _batcher(entry, runtime, settings)
        await entry.changed()
    return entry.batchers[name]


def _batcher(entry: PluginEntry, runtime: ModelRuntime, settings: Settings) -> Batcher:
    batcher = Batcher(entry.name, runtime, settings.max_batch_size, settings.max_batch_wait_ms / 1000, settings.max_queue_size,
                      settings.predict_timeout_s, entry.changed)
    batcher.start()
    return batcher


def _settle(entry: PluginEntry, faults: dict[str, tuple[str, str]]) -> None:
    """The plugin's own state after a (re)load: READY while any version can be served."""
    entry.faults = faults
    if any(entry.servable(v.version) for v in entry.versions):
        entry.state, entry.reason = READY, ""
    else:
        entry.state = FAILED
        entry.reason = "no model version can be served: " + "; ".join(f"{name}: {why}" for name, (_, why) in faults.items())


async def load_all(entries: dict[str, PluginEntry], settings: Settings, on_change) -> None:
    """Load every LOADING plugin concurrently in threads; `on_change(entry)` after each."""

    async def load_one(entry: PluginEntry) -> None:
        try:
            entry.versions, runtimes, faults = await asyncio.to_thread(load_versions, entry, settings)
        except Exception as error:
            entry.state, entry.reason = FAILED, f"{type(error).__name__}: {error}"
            log.error("plugin failed to load", extra={"plugin": entry.name, "reason": entry.reason})
        else:
            entry.batchers = {name: _batcher(entry, runtime, settings) for name, runtime in runtimes.items()}
            _settle(entry, faults)
            log.info("plugin loaded", extra={"plugin": entry.name, "state": entry.state, "versions": list(entry.batchers),
                                             "not_served": sorted(faults)})
        await on_change(entry)

    await asyncio.gather(*(load_one(e) for e in entries.values() if e.state == LOADING))


@dataclass
class ReloadReport:
    """What `reload` did to one plugin (AdminService.PluginReload)."""

    plugin: str
    ok: bool
    error: str = ""
    loaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    previous_default: str = ""
    default_version: str = ""


async def reload(entry: PluginEntry, settings: Settings) -> ReloadReport:
    """List the plugin's versions again; hash every weights file again, load and warm new or
    changed versions off the event loop, then switch to the new set at once. Calls in flight
    finish on the batcher they hold; retired batchers stop once idle. A version that fails
    (a corrupt file, a load that raises) fails alone, and the report says so (`ok` false);
    when the plugin cannot list its versions, nothing changes. A FAILED plugin may recover here."""
    previous_default = entry.default_version
    if entry.runtime_class is None:
        return ReloadReport(entry.name, False, entry.reason or "the plugin could not be imported", previous_default=previous_default)
    old = dict(entry.batchers)
    try:
        versions, runtimes, faults = await asyncio.to_thread(load_versions, entry, settings, old)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        log.error("plugin reload failed; it keeps serving what it served", extra={"plugin": entry.name, "reason": reason})
        return ReloadReport(entry.name, False, reason, kept=list(old), previous_default=previous_default,
                            default_version=previous_default)
    batchers = {v.version: _batcher(entry, runtimes[v.version], settings) if v.version in runtimes else old[v.version]
                for v in versions if v.version not in faults and (v.version in runtimes or v.version in old)}
    entry.versions, entry.batchers = versions, batchers  # one step on the event loop
    _settle(entry, faults)
    if not entry.servable(entry.default_version) and entry.servable(previous_default) and previous_default in batchers:
        entry.default_override = previous_default  # a new version that fails never takes the default traffic
        log.warning("the new default version cannot be served; the previous default keeps the traffic",
                    extra={"plugin": entry.name, "default": previous_default})
    entry.loading = {}  # a version that failed to load on first use gets another try
    retired = [b for name, b in old.items() if batchers.get(name) is not b]
    for batcher in retired:
        asyncio.ensure_future(batcher.retire(settings.grace_period_s))
    failed = {name: why for name, (state, why) in faults.items() if state == FAILED}
    report = ReloadReport(entry.name, not failed, "; ".join(f"{name}: {why}" for name, why in failed.items()),
                          loaded=list(runtimes), removed=[n for n in old if n not in batchers],
                          kept=[n for n in batchers if n not in runtimes], previous_default=previous_default,
                          default_version=entry.default_version)
    log.info("plugin reloaded", extra={"plugin": entry.name, "loaded": report.loaded, "removed": report.removed,
                                       "failed": sorted(failed), "default": report.default_version})
    return report
