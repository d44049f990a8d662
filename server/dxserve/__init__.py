"""dxserve: a gRPC model-serving and plugin platform for medical image diagnostics."""

from .hookspecs import hookimpl
from .runtime import (Decision, Explanation, InputSpec, ModelRuntime, ModelVersion, PluginInfo, Prediction, QualityIssue,
                      SpecimenCounts)

__version__ = "0.1.0"
__all__ = ["Decision", "Explanation", "InputSpec", "ModelRuntime", "ModelVersion", "PluginInfo", "Prediction", "QualityIssue", "SpecimenCounts", "hookimpl", "__version__"]
