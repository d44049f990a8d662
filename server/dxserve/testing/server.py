"""A real dxserve server in a background thread of this process, for plugin authors' tests."""

from __future__ import annotations

import asyncio
import importlib.metadata
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import hookspecs


class PluginNotServing(RuntimeError):
    """A plugin under test did not reach SERVING: its state and reason from ListPlugins."""


def other_entry_points(plugins: tuple[str, ...], modules: tuple[str, ...] = ()) -> list[str]:
    """Entry-point plugins not named: disabled, so that a test loads only what it serves. None
    are when a named plugin is neither an entry point's name (the scaffold names both alike)
    nor given as a module: it may come from any entry point."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}
    return sorted(names - set(plugins)) if modules or set(plugins) <= names else []


@contextmanager
def serving(*plugins: str, modules: tuple[str, ...] = (), timeout_s: float = 300.0, **settings) -> Iterator:
    """Serve the installed plugins named (all when none is), and the plugin `modules`
    ('package.module', e.g. one not installed yet), on a free loopback port with an audit
    trail in a temporary folder; yield a `dxserve_client.Client` once each named plugin
    serves. `settings` are `dxserve.config.Settings` fields, e.g.
    `ungated_versions_allowed=["my_plugin/*"]` or `max_batch_size=8`.

    >>> with serving("lymphoblast") as client:
    ...     client.classify("cell.bmp", plugin="lymphoblast").decision

    Raises `PluginNotServing` with the plugin's state and reason when one fails to load."""
    from dxserve_client import Client

    from ..app import Server
    from ..config import Settings

    with tempfile.TemporaryDirectory(prefix="dxserve-testing-") as tmp:
        values = {"address": "127.0.0.1:0", "http_port": 0, "audit_db": str(Path(tmp) / "audit.sqlite3"), "plugins": list(modules),
                  "disabled_plugins": other_entry_points(plugins, tuple(modules)), **settings}
        config = Settings(**values)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="dxserve-testing", daemon=True)
        thread.start()

        async def start() -> Server:
            server = Server(config)
            await server.start()
            return server

        from PIL import Image

        pillow_limit = Image.MAX_IMAGE_PIXELS  # the server sets Pillow's limit for the whole process
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout_s)
        try:
            with Client(f"127.0.0.1:{server.port}", timeout_s=timeout_s) as client:
                for plugin in plugins:
                    wait_serving(client, plugin, timeout_s)
                yield client
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()
            Image.MAX_IMAGE_PIXELS = pillow_limit


def wait_serving(client, plugin: str, timeout_s: float) -> None:
    """Return once `plugin` serves; raise PluginNotServing as soon as it cannot (FAILED)."""
    try:
        client.wait_until_loaded(plugin, timeout_s)
        client.wait_until_serving(plugin, timeout_s)  # and health agrees (its default version serves)
    except (LookupError, RuntimeError, TimeoutError) as error:
        raise PluginNotServing(str(error)) from None
