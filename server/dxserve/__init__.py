"""dxserve: a gRPC model-serving and plugin platform for medical image diagnostics.

The generated API code, `dxserve.v1`, belongs to the dxserve-client distribution (a client
installs it without the server); this package extends its path so that `dxserve.v1` is found
wherever that distribution is installed, editable or not.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)


from .hookspecs import hookimpl
from .runtime import (OUT_OF_DISTRIBUTION, QUALITY_GATE, Adaptation, Decision, Explanation, FoundObject, InputSpec,
                      LabelledImage, ModelRuntime, ModelVersion, PluginInfo, Prediction, QualityIssue, SpecimenCounts)

__version__ = "0.1.0"
__all__ = ["Adaptation", "LabelledImage", "Decision", "Explanation", "FoundObject", "InputSpec", "ModelRuntime", "ModelVersion", "PluginInfo", "Prediction", "QualityIssue", "SpecimenCounts", "QUALITY_GATE", "OUT_OF_DISTRIBUTION", "hookimpl", "__version__"]
