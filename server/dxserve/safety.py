"""The safety contract every served model version meets: an input quality gate and an
out-of-distribution check (`runtime.REQUIRED_SAFETY_CHECKS`), or the operator's explicit
permission to serve it without (`ungated_versions_allowed`, for research use).

The rule lives here, in the platform, so that a third-party plugin's ungated version is
reported (ListPlugins: VERSION_STATE_NOT_SERVED) and refused (FAILED_PRECONDITION,
VERSION_UNGATED) exactly as an old version of the built-in plugin is.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from .runtime import REQUIRED_SAFETY_CHECKS, ModelRuntime, ModelVersion


def missing_checks(runtime_class: type[ModelRuntime], version: ModelVersion) -> list[str]:
    """The required safety checks `version` does not apply, in `REQUIRED_SAFETY_CHECKS` order."""
    applied = runtime_class.safety_checks(version)
    return [check for check in REQUIRED_SAFETY_CHECKS if check not in applied]


def allowed_ungated(patterns: list[str], plugin: str, version: str) -> bool:
    """Whether the operator allows serving `plugin/version` without every safety check."""
    return any(fnmatchcase(f"{plugin}/{version}", pattern) for pattern in patterns)


def refusal_reason(plugin: str, version: str, missing: list[str]) -> str:
    return (f"model version {version!r} of plugin {plugin!r} lacks the safety checks {', '.join(missing)}, so it is "
            f"not served; an operator may allow it for research with ungated_versions_allowed = ['{plugin}/{version}']")
