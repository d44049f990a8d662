"""dxserve: a gRPC model-serving and plugin platform for medical image diagnostics."""

from .hookspecs import hookimpl
from .runtime import (OUT_OF_DISTRIBUTION, QUALITY_GATE, Decision, Explanation, InputSpec, ModelRuntime, ModelVersion,
                      PluginInfo, Prediction, QualityIssue, SpecimenCounts)

__version__ = "0.1.0"
__all__ = ["Decision", "Explanation", "InputSpec", "ModelRuntime", "ModelVersion", "PluginInfo", "Prediction", "QualityIssue", "SpecimenCounts", "QUALITY_GATE", "OUT_OF_DISTRIBUTION", "hookimpl", "__version__"]
