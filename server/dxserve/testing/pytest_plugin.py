"""pytest fixtures for plugin authors, loaded by pytest through dxserve's ``pytest11`` entry
point: nothing to import or register in a conftest.

- ``dxserve_plugin``: the name of the plugin under test (``--plugin NAME``; or override the
  fixture in your conftest to return your plugin's name).
- ``dxserve_settings``: extra `dxserve.config.Settings` for the test server (override it,
  e.g. to return ``{"max_batch_size": 4}``); ``--allow-ungated`` adds the plugin to
  ``ungated_versions_allowed``.
- ``dxserve_client``: a `dxserve_client.Client` connected to a real server in this process
  serving that plugin (one per test session).
- ``dxserve_runtime_class``: the plugin's `ModelRuntime` subclass, as the server finds it.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dxserve", "dxserve plugin testing")
    group.addoption("--plugin", dest="dxserve_plugin", metavar="NAME", default=None,
                    help="the dxserve plugin under test (its served name), for dxserve.testing.conformance and the "
                         "dxserve_client fixture")
    group.addoption("--plugin-module", dest="dxserve_modules", metavar="MODULE", action="append", default=[],
                    help="also register this plugin module ('package.module'), e.g. one not installed yet")
    group.addoption("--allow-ungated", dest="dxserve_allow_ungated", action="store_true",
                    help="serve the plugin's versions although they lack a quality gate or out-of-distribution check "
                         "(the conformance suite then skips that check instead of failing it)")
    group.addoption("--examples", dest="dxserve_examples", metavar="DIR", default=None,
                    help="image files the plugin should classify (default: the runtime's examples(), else synthetic images)")


@pytest.fixture(scope="session")
def dxserve_plugin(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("dxserve_plugin")
    if not name:
        pytest.skip("no plugin under test: pass --plugin NAME, or override the dxserve_plugin fixture")
    return name


@pytest.fixture(scope="session")
def dxserve_settings(request: pytest.FixtureRequest, dxserve_plugin: str) -> dict:
    return {"ungated_versions_allowed": [f"{dxserve_plugin}/*"]} if request.config.getoption("dxserve_allow_ungated") else {}


@pytest.fixture(scope="session")
def dxserve_client(request: pytest.FixtureRequest, dxserve_plugin: str, dxserve_settings: dict):
    from .server import serving

    with serving(dxserve_plugin, modules=tuple(request.config.getoption("dxserve_modules")), **dxserve_settings) as client:
        yield client


@pytest.fixture(scope="session")
def dxserve_runtime_class(request: pytest.FixtureRequest, dxserve_plugin: str):
    from ..config import Settings
    from ..registry import discover
    from .server import other_entry_points

    modules = request.config.getoption("dxserve_modules")
    entries = discover(Settings(plugins=modules, disabled_plugins=other_entry_points((dxserve_plugin,), tuple(modules)),
                                audit_db=""))
    entry = entries.get(dxserve_plugin)
    if entry is None:
        pytest.fail(f"no plugin {dxserve_plugin!r} is installed (found: {', '.join(entries) or 'none'}); "
                    "is its package installed, with an entry point in the 'dxserve' group?", pytrace=False)
    if entry.runtime_class is None:
        pytest.fail(f"plugin {dxserve_plugin!r} cannot be imported: {entry.reason}", pytrace=False)
    return entry.runtime_class
