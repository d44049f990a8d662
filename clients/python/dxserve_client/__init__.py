"""Python client for dxserve: classify images over gRPC."""

from .client import Client, DxServeError, Result, to_image

__all__ = ["Client", "DxServeError", "Result", "to_image"]
