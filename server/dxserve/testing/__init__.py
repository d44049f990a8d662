"""Tools for plugin authors (docs/plugins.md):

- `serving(...)`: a real dxserve server in this process with your plugin, and a client for it;
- pytest fixtures (`dxserve_client`, `dxserve_plugin`), loaded by pytest through the
  ``pytest11`` entry point once dxserve is installed;
- a conformance suite any plugin can run against itself::

      pytest --pyargs dxserve.testing.conformance --plugin NAME
      dxserve plugin check NAME        # the same
"""

from .server import PluginNotServing, serving

__all__ = ["PluginNotServing", "serving"]
