from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PluginState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLUGIN_STATE_UNSPECIFIED: _ClassVar[PluginState]
    PLUGIN_STATE_LOADING: _ClassVar[PluginState]
    PLUGIN_STATE_READY: _ClassVar[PluginState]
    PLUGIN_STATE_FAILED: _ClassVar[PluginState]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_AVAILABLE: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
    VERSION_STATE_NOT_SERVED: _ClassVar[VersionState]
    VERSION_STATE_UNRESPONSIVE: _ClassVar[VersionState]
PLUGIN_STATE_UNSPECIFIED: PluginState
PLUGIN_STATE_LOADING: PluginState
PLUGIN_STATE_READY: PluginState
PLUGIN_STATE_FAILED: PluginState
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_AVAILABLE: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_FAILED: VersionState
VERSION_STATE_NOT_SERVED: VersionState
VERSION_STATE_UNRESPONSIVE: VersionState

class ListPluginsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPluginsResponse(_message.Message):
    __slots__ = ("plugins",)
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    plugins: _containers.RepeatedCompositeFieldContainer[PluginInfo]
    def __init__(self, plugins: _Optional[_Iterable[_Union[PluginInfo, _Mapping]]] = ...) -> None: ...

class PluginInfo(_message.Message):
    __slots__ = ("name", "version", "description", "labels", "model_versions", "default_model_version", "input", "intended_use", "state", "state_reason", "explains", "objects_plugin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    EXPLAINS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    model_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    default_model_version: str
    input: InputSpec
    intended_use: str
    state: PluginState
    state_reason: str
    explains: bool
    objects_plugin: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., model_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., default_model_version: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., intended_use: _Optional[str] = ..., state: _Optional[_Union[PluginState, str]] = ..., state_reason: _Optional[str] = ..., explains: _Optional[bool] = ..., objects_plugin: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "weights_sha256", "model_card", "model_card_json", "safety_checks", "state", "state_reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    SAFETY_CHECKS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    weights_sha256: str
    model_card: str
    model_card_json: str
    safety_checks: _containers.RepeatedScalarFieldContainer[str]
    state: VersionState
    state_reason: str
    def __init__(self, version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., model_card: _Optional[str] = ..., model_card_json: _Optional[str] = ..., safety_checks: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[VersionState, str]] = ..., state_reason: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("formats", "max_pixels", "max_message_bytes", "min_side", "description")
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_SIDE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    formats: _containers.RepeatedScalarFieldContainer[str]
    max_pixels: int
    max_message_bytes: int
    min_side: int
    description: str
    def __init__(self, formats: _Optional[_Iterable[str]] = ..., max_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., min_side: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "width", "height", "channels")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    width: int
    height: int
    channels: int
    def __init__(self, pixels: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "plugin", "model_version", "image", "specimen_id", "explain", "weights_sha256", "microns_per_pixel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    MICRONS_PER_PIXEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plugin: str
    model_version: str
    image: Image
    specimen_id: str
    explain: bool
    weights_sha256: str
    microns_per_pixel: float
    def __init__(self, request_id: _Optional[str] = ..., plugin: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., specimen_id: _Optional[str] = ..., explain: _Optional[bool] = ..., weights_sha256: _Optional[str] = ..., microns_per_pixel: _Optional[float] = ...) -> None: ...

class LabelProbability(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("label", "indeterminate", "reason", "screen_positive", "rule")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDETERMINATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCREEN_POSITIVE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    label: str
    indeterminate: bool
    reason: str
    screen_positive: bool
    rule: str
    def __init__(self, label: _Optional[str] = ..., indeterminate: _Optional[bool] = ..., reason: _Optional[str] = ..., screen_positive: _Optional[bool] = ..., rule: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queued_ms", "model_ms", "batch_size")
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queued_ms: float
    model_ms: float
    batch_size: int
    def __init__(self, queued_ms: _Optional[float] = ..., model_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "plugin", "model_version", "weights_sha256", "probabilities", "top_label", "confidence", "decision", "timing", "quality", "specimen_id", "explanation", "audit_seq", "input_sha256", "objects", "field")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plugin: str
    model_version: str
    weights_sha256: str
    probabilities: _containers.RepeatedCompositeFieldContainer[LabelProbability]
    top_label: str
    confidence: float
    decision: Decision
    timing: Timing
    quality: QualityCheck
    specimen_id: str
    explanation: Explanation
    audit_seq: int
    input_sha256: str
    objects: _containers.RepeatedCompositeFieldContainer[FoundObject]
    field: FieldSummary
    def __init__(self, request_id: _Optional[str] = ..., plugin: _Optional[str] = ..., model_version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., probabilities: _Optional[_Iterable[_Union[LabelProbability, _Mapping]]] = ..., top_label: _Optional[str] = ..., confidence: _Optional[float] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., quality: _Optional[_Union[QualityCheck, _Mapping]] = ..., specimen_id: _Optional[str] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., audit_seq: _Optional[int] = ..., input_sha256: _Optional[str] = ..., objects: _Optional[_Iterable[_Union[FoundObject, _Mapping]]] = ..., field: _Optional[_Union[FieldSummary, _Mapping]] = ...) -> None: ...

class FoundObject(_message.Message):
    __slots__ = ("index", "box", "mask_png", "plugin", "result", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: Box
    mask_png: bytes
    plugin: str
    result: ClassifyResponse
    error: _status_pb2.Status
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., mask_png: _Optional[bytes] = ..., plugin: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class FieldSummary(_message.Message):
    __slots__ = ("found", "classified", "indeterminate", "failed", "objects_plugin", "objects_model_version")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIED_FIELD_NUMBER: _ClassVar[int]
    INDETERMINATE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    found: int
    classified: int
    indeterminate: int
    failed: int
    objects_plugin: str
    objects_model_version: str
    def __init__(self, found: _Optional[int] = ..., classified: _Optional[int] = ..., indeterminate: _Optional[int] = ..., failed: _Optional[int] = ..., objects_plugin: _Optional[str] = ..., objects_model_version: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("method", "label", "heatmap_png", "overlay_png")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    method: str
    label: str
    heatmap_png: bytes
    overlay_png: bytes
    def __init__(self, method: _Optional[str] = ..., label: _Optional[str] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class SpecimenSummary(_message.Message):
    __slots__ = ("specimen_id", "plugin", "model_version", "cells_seen", "cells_failed", "cells_passed_gate", "indeterminate", "labels", "decision", "final")
    SPECIMEN_ID_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CELLS_SEEN_FIELD_NUMBER: _ClassVar[int]
    CELLS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CELLS_PASSED_GATE_FIELD_NUMBER: _ClassVar[int]
    INDETERMINATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    specimen_id: str
    plugin: str
    model_version: str
    cells_seen: int
    cells_failed: int
    cells_passed_gate: int
    indeterminate: int
    labels: _containers.RepeatedCompositeFieldContainer[LabelFraction]
    decision: Decision
    final: bool
    def __init__(self, specimen_id: _Optional[str] = ..., plugin: _Optional[str] = ..., model_version: _Optional[str] = ..., cells_seen: _Optional[int] = ..., cells_failed: _Optional[int] = ..., cells_passed_gate: _Optional[int] = ..., indeterminate: _Optional[int] = ..., labels: _Optional[_Iterable[_Union[LabelFraction, _Mapping]]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., final: _Optional[bool] = ...) -> None: ...

class LabelFraction(_message.Message):
    __slots__ = ("label", "count", "fraction", "ci_low", "ci_high")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    label: str
    count: int
    fraction: float
    ci_low: float
    ci_high: float
    def __init__(self, label: _Optional[str] = ..., count: _Optional[int] = ..., fraction: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ...) -> None: ...

class QualityCheck(_message.Message):
    __slots__ = ("passed", "issues")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    issues: _containers.RepeatedCompositeFieldContainer[QualityIssue]
    def __init__(self, passed: _Optional[bool] = ..., issues: _Optional[_Iterable[_Union[QualityIssue, _Mapping]]] = ...) -> None: ...

class QualityIssue(_message.Message):
    __slots__ = ("code", "message", "value", "accepted_min", "accepted_max")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_MIN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_MAX_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    value: float
    accepted_min: float
    accepted_max: float
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., value: _Optional[float] = ..., accepted_min: _Optional[float] = ..., accepted_max: _Optional[float] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("request_id", "index", "result", "error", "final_summary", "specimen")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINAL_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    result: ClassifyResponse
    error: _status_pb2.Status
    final_summary: SpecimenSummary
    specimen: SpecimenSummary
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., final_summary: _Optional[_Union[SpecimenSummary, _Mapping]] = ..., specimen: _Optional[_Union[SpecimenSummary, _Mapping]] = ...) -> None: ...
