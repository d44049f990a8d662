"""Find plugins through entry points, load their model versions, and track their state.

A plugin that cannot be imported, declares nothing usable, has weights whose hash does not
match, or raises in `load()` is kept as FAILED with the reason; the others serve on.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field

import pluggy

from . import errors, hookspecs
from .batcher import Batcher
from .config import Settings
from .runtime import ModelRuntime, ModelVersion, PluginInfo, sha256_of

log = logging.getLogger("dxserve.registry")

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"


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

    @property
    def info(self) -> PluginInfo | None:
        return self.runtime_class.info if self.runtime_class else None

    @property
    def default_version(self) -> str:
        if any(v.version == self.default_override for v in self.versions):
            return self.default_override
        return self.versions[0].version if self.versions else ""


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
            entries[name] = PluginEntry(name, runtime_class=cls)
    return dict(sorted(entries.items()))


def load_versions(entry: PluginEntry, loaded: dict[str, Batcher] | None = None,
                  eager: bool = True) -> tuple[list[ModelVersion], dict[str, ModelRuntime]]:
    """Blocking: list the plugin's versions, verify every one's weights against its SHA-256,
    then load each one that is not in `loaded` with the same weights; with `eager` False only
    the default one (and changed ones that were loaded), the others on first use
    (`ensure_loaded`). Returns (every version, the newly loaded runtimes). Raises on any
    failure, having changed nothing."""
    assert entry.runtime_class is not None
    versions = list(entry.runtime_class.versions())
    if not versions:
        raise RuntimeError("the plugin declares no model versions")
    loaded = loaded or {}
    default = entry.default_override if any(v.version == entry.default_override for v in versions) else versions[0].version
    runtimes = {}
    for version in versions:
        kept = loaded.get(version.version)
        if kept is not None and kept.runtime.version.weights_sha256 == version.weights_sha256:
            continue
        if eager or kept is not None or version.version == default:
            runtimes[version.version] = load_runtime(entry.runtime_class, version)
        else:
            verify_weights(version)  # a corrupt file is found now, not by the first request
    return versions, runtimes


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
    return runtime


async def ensure_loaded(entry: PluginEntry, name: str, settings: Settings) -> Batcher:
    """The batcher of version `name`, loading it first if it was left for first use; the
    requests that arrive meanwhile wait for the same load. A failed load is remembered (and
    answered UNAVAILABLE) until the next reload."""
    if name in entry.batchers:
        return entry.batchers[name]
    version = next(v for v in entry.versions if v.version == name)
    if name not in entry.loading:
        log.info("loading model version on first use", extra={"plugin": entry.name, "version": name})
        entry.loading[name] = asyncio.ensure_future(asyncio.to_thread(load_runtime, entry.runtime_class, version))
    try:
        runtime = await asyncio.shield(entry.loading[name])
    except Exception as error:
        raise errors.unavailable(entry.name, f"model version {name!r} of plugin {entry.name!r} failed to load: "
                                 f"{type(error).__name__}: {error}", "VERSION_FAILED") from None
    if name not in entry.batchers and entry.loading.get(name) is not None:  # the first waiter starts it
        entry.batchers[name] = _batcher(entry, runtime, settings)
    return entry.batchers[name]


def _batcher(entry: PluginEntry, runtime: ModelRuntime, settings: Settings) -> Batcher:
    batcher = Batcher(entry.name, runtime, settings.max_batch_size, settings.max_batch_wait_ms / 1000, settings.max_queue_size)
    batcher.start()
    return batcher


async def load_all(entries: dict[str, PluginEntry], settings: Settings, on_change) -> None:
    """Load every LOADING plugin concurrently in threads; `on_change(entry)` after each."""

    async def load_one(entry: PluginEntry) -> None:
        try:
            entry.versions, runtimes = await asyncio.to_thread(load_versions, entry, None, settings.preload_versions)
        except Exception as error:
            entry.state, entry.reason = FAILED, f"{type(error).__name__}: {error}"
            log.error("plugin failed to load", extra={"plugin": entry.name, "reason": entry.reason})
        else:
            entry.batchers = {name: _batcher(entry, runtime, settings) for name, runtime in runtimes.items()}
            entry.state = READY
            log.info("plugin ready", extra={"plugin": entry.name, "versions": list(entry.batchers)})
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
    """List the plugin's versions again; load and warm new or changed ones off the event loop,
    then switch to the new set at once. Calls in flight finish on the batcher they hold; retired
    batchers stop once idle. On failure nothing changes. A FAILED plugin may recover here."""
    previous_default = entry.default_version
    if entry.runtime_class is None:
        return ReloadReport(entry.name, False, entry.reason or "the plugin could not be imported", previous_default=previous_default)
    old = dict(entry.batchers)
    try:
        versions, runtimes = await asyncio.to_thread(load_versions, entry, old, settings.preload_versions)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        log.error("plugin reload failed; it keeps serving what it served", extra={"plugin": entry.name, "reason": reason})
        return ReloadReport(entry.name, False, reason, kept=list(old), previous_default=previous_default,
                            default_version=previous_default)
    batchers = {v.version: _batcher(entry, runtimes[v.version], settings) if v.version in runtimes else old[v.version]
                for v in versions if v.version in runtimes or v.version in old}  # the rest load on first use
    entry.versions, entry.batchers, entry.state, entry.reason = versions, batchers, READY, ""  # one step on the event loop
    entry.loading = {}  # a version that failed to load on first use gets another try
    retired = [b for name, b in old.items() if batchers.get(name) is not b]
    for batcher in retired:
        asyncio.ensure_future(batcher.retire(settings.grace_period_s))
    report = ReloadReport(entry.name, True, loaded=list(runtimes), removed=[n for n in old if n not in batchers],
                          kept=[n for n in batchers if n not in runtimes], previous_default=previous_default,
                          default_version=entry.default_version)
    log.info("plugin reloaded", extra={"plugin": entry.name, "loaded": report.loaded, "removed": report.removed,
                                       "default": report.default_version})
    return report
