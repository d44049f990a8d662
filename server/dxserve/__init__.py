"""dxserve: a gRPC model-serving and plugin platform for medical image diagnostics."""

from .hookspecs import hookimpl
from .runtime import Decision, InputSpec, ModelRuntime, ModelVersion, PluginInfo, Prediction, QualityIssue

__version__ = "0.1.0"
__all__ = ["Decision", "InputSpec", "ModelRuntime", "ModelVersion", "PluginInfo", "Prediction", "QualityIssue", "hookimpl", "__version__"]
