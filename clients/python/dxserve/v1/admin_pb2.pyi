from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadPluginsRequest(_message.Message):
    __slots__ = ("plugins",)
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    plugins: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, plugins: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadPluginsResponse(_message.Message):
    __slots__ = ("plugins",)
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    plugins: _containers.RepeatedCompositeFieldContainer[PluginReload]
    def __init__(self, plugins: _Optional[_Iterable[_Union[PluginReload, _Mapping]]] = ...) -> None: ...

class PluginReload(_message.Message):
    __slots__ = ("plugin", "ok", "error", "loaded", "removed", "kept", "previous_default", "default_model_version")
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    plugin: str
    ok: bool
    error: str
    loaded: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    kept: _containers.RepeatedScalarFieldContainer[str]
    previous_default: str
    default_model_version: str
    def __init__(self, plugin: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., loaded: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., kept: _Optional[_Iterable[str]] = ..., previous_default: _Optional[str] = ..., default_model_version: _Optional[str] = ...) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("plugin", "model_version")
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    plugin: str
    model_version: str
    def __init__(self, plugin: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class SetDefaultVersionResponse(_message.Message):
    __slots__ = ("previous_default", "default_model_version")
    PREVIOUS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_default: str
    default_model_version: str
    def __init__(self, previous_default: _Optional[str] = ..., default_model_version: _Optional[str] = ...) -> None: ...
