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

from . import hookspecs
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

    @property
    def info(self) -> PluginInfo | None:
        return self.runtime_class.info if self.runtime_class else None

    @property
    def default_version(self) -> str:
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


def load_entry(entry: PluginEntry) -> list[ModelRuntime]:
    """Blocking: list, verify and load every version of one plugin. Raises on any failure."""
    assert entry.runtime_class is not None
    entry.versions = list(entry.runtime_class.versions())
    if not entry.versions:
        raise RuntimeError("the plugin declares no model versions")
    runtimes = []
    for version in entry.versions:
        actual = sha256_of(version.weights)
        if actual != version.weights_sha256:
            raise RuntimeError(f"weights {version.weights.name} of version {version.version} have SHA-256 "
                               f"{actual}, not the declared {version.weights_sha256}: refusing corrupt or altered weights")
        runtime = entry.runtime_class(version)
        runtime.load()
        runtimes.append(runtime)
    return runtimes


async def load_all(entries: dict[str, PluginEntry], settings: Settings, on_change) -> None:
    """Load every LOADING plugin concurrently in threads; `on_change(entry)` after each."""

    async def load_one(entry: PluginEntry) -> None:
        try:
            runtimes = await asyncio.to_thread(load_entry, entry)
        except Exception as error:
            entry.state, entry.reason = FAILED, f"{type(error).__name__}: {error}"
            log.error("plugin failed to load", extra={"plugin": entry.name, "reason": entry.reason})
        else:
            for runtime in runtimes:
                batcher = Batcher(entry.name, runtime, settings.max_batch_size,
                                  settings.max_batch_wait_ms / 1000, settings.max_queue_size)
                batcher.start()
                entry.batchers[runtime.version.version] = batcher
            entry.state = READY
            log.info("plugin ready", extra={"plugin": entry.name, "versions": list(entry.batchers)})
        await on_change(entry)

    await asyncio.gather(*(load_one(e) for e in entries.values() if e.state == LOADING))
