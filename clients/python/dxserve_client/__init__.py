"""Python client for dxserve: classify images over gRPC."""

from .client import Client, DxServeError, Explanation, Result, Specimen, to_image

__all__ = ["Client", "DxServeError", "Explanation", "Result", "Specimen", "to_image"]
