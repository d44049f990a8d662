"""Plugins installed for the tests the way pip installs any package: a dist-info folder
with entry points in the `dxserve` group, on the server's path. None is known to the server."""
