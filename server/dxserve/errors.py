"""Errors with a gRPC status code and google.rpc details, for whole calls and stream items."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "dxserve.v1"
# Client-chosen names (plugins, versions, request ids) are cut to this many characters in
# error messages, details and log fields: a 1 MB name must not become a 1 MB log line.
MAX_ECHO = 64


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class ServingError(Exception):
    """A request that cannot be served: the code, a message for people, typed details."""

    def __init__(self, code: grpc.StatusCode, message: str, *details: Message):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status carried in a stream item or in the call's trailers."""
        packed = []
        for detail in self.details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)

    def detached(self) -> ServingError:
        """This error without its traceback or the exceptions it was raised from, to be kept as a
        value (a call's answer, a stream item's): otherwise it holds the frames it was raised in,
        and the images in them, in a reference cycle only the garbage collector frees, late.
        A 25 Mpx field refused TOO_MANY_OBJECTS kept its 91 crops, about 40 MB a request."""
        self.__traceback__ = self.__context__ = self.__cause__ = None
        return self

    def end(self, context) -> None:
        """Set this error, with its details, as the status a grpc.aio call ends with: the handler
        then returns (a unary one `None`), and the client gets exactly what abort_with_status
        would send. Not abort, which raises an exception that the call's state keeps: its
        traceback holds the handler's frames, their request (up to max_message_bytes) with them,
        in a cycle only the garbage collector frees, late (+150 MB over 40 refused 5 MB images)."""
        from grpc_status import rpc_status

        status = rpc_status.to_status(self.to_status())
        context.set_code(status.code)
        context.set_details(status.details)
        context.set_trailing_metadata(status.trailing_metadata)


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def bad_image(reason: str, description: str, field: str = "image") -> ServingError:
    """INVALID_ARGUMENT for an image that cannot be read or breaks a limit."""
    return invalid_field(field, reason, f"invalid image: {description}", description)


def invalid_field(field: str, reason: str, message: str, description: str = "") -> ServingError:
    """INVALID_ARGUMENT for a request field that breaks a rule or limit."""
    description = description or message
    return ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
        ),
        _error_info(reason),
    )


def not_found(kind: str, name: str, description: str) -> ServingError:
    """NOT_FOUND for an unknown plugin or model version (`name` as the client gave it: clipped)."""
    name = clip(name)
    return ServingError(
        grpc.StatusCode.NOT_FOUND,
        description,
        error_details_pb2.ResourceInfo(resource_type=kind, resource_name=name, description=description),
        _error_info(f"{kind.upper()}_NOT_FOUND", name=name),
    )


def unknown_plugin(name: str, known) -> ServingError:
    """NOT_FOUND for a plugin this server does not have, naming those it has."""
    return not_found("plugin", name, f"unknown plugin {clip(name)!r} (known: {', '.join(known) or 'none'})")


def unknown_version(plugin: str, version: str, versions) -> ServingError:
    """NOT_FOUND for a model version the plugin does not have, naming those it has."""
    return not_found("model_version", f"{plugin}/{version}", f"plugin {plugin!r} has no model version "
                     f"{clip(version)!r} (has: {', '.join(versions)})")


def unavailable(plugin: str, description: str, reason: str, retry_after_s: float | None = None) -> ServingError:
    """UNAVAILABLE while a plugin loads, after it failed, or while the server stops."""
    details: list[Message] = [_error_info(reason, plugin=plugin)]
    if retry_after_s is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s)))
    return ServingError(grpc.StatusCode.UNAVAILABLE, description, *details)


def _duration(seconds: float) -> duration_pb2.Duration:
    """A RetryInfo delay of `seconds`, fractions included."""
    return duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


def _quota(message: str, subject: str, description: str, retry_after_s: float, reason: str,
           metadata: dict[str, str]) -> ServingError:
    """RESOURCE_EXHAUSTED for a full queue or too many calls: which limit, and when to retry (seconds)."""
    return ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message,
        error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)]),
        error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s)),
        _error_info(reason, **metadata),
    )


def queue_full(plugin: str, size: int) -> ServingError:
    return _quota(f"plugin {plugin!r} has {size} images queued, its limit; retry shortly", f"plugin:{plugin}",
                  f"queue limit {size}", 0.1, "QUEUE_FULL", {"plugin": plugin})


def inflight_full(size: int, held: int, limit_mb: int, waiting: bool) -> ServingError:
    """RESOURCE_EXHAUSTED for a unary call past max_inflight_mb, or queued behind streams waiting for room."""
    why = "streams are waiting for room before it" if waiting else f"this {size}-byte request would pass the limit"
    return _quota(f"the server holds {held / 2**20:.1f} MB of requests not yet answered, of {limit_mb} MB "
                  f"(max_inflight_mb), and {why}: retry shortly", "the server", f"max_inflight_mb {limit_mb}",
                  0.2, "INFLIGHT_FULL", {"bytes": str(size)})


def message_too_large(size: int, limit: int) -> ServingError:
    """RESOURCE_EXHAUSTED (as gRPC's own limit says it) for a request over max_message_bytes, with
    the field and the limit; in a stream it costs that item only."""
    description = f"the request is {size} bytes, over the limit of {limit} (max_message_bytes)"
    return ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, description,
        error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(field="image", description=description)]),
        _error_info("MESSAGE_TOO_LARGE", limit=str(limit)))


def explanations_full(subject: str, limit: int, plugin: str) -> ServingError:
    """RESOURCE_EXHAUSTED: the server's (or this caller's) explanation places are all taken."""
    return _quota(f"{subject} has {limit} explanations in progress, its limit; retry in a few seconds, or ask without "
                  f"explain", subject, f"explanation limit {limit}", 2.0, "EXPLANATIONS_FULL",
                  {"subject": subject, "plugin": plugin})


def too_many_calls(subject: str, limit: int, what: str) -> ServingError:
    """RESOURCE_EXHAUSTED: a caller (or the server) holds its limit of calls or streams."""
    return _quota(f"{subject} has {limit} {what} open, its limit; retry when one ends", subject, f"{what} limit {limit}",
                  1.0, "TOO_MANY_CALLS", {"subject": subject})


def permission_denied(message: str, resource: str) -> ServingError:
    return ServingError(grpc.StatusCode.PERMISSION_DENIED, message, _error_info("PERMISSION_DENIED", resource=resource))


def unauthenticated(message: str, cause: str) -> ServingError:
    """UNAUTHENTICATED; `cause` (no_credentials, unknown_token, unknown_certificate, revoked) in ErrorInfo metadata."""
    return ServingError(grpc.StatusCode.UNAUTHENTICATED, message, _error_info("UNAUTHENTICATED", cause=cause))


def gave_way(subject: str, retry_after_s: float) -> ServingError:
    """RESOURCE_EXHAUSTED: the caller's stream was ended to free its place while the server was full,
    and it may not take a place back before its RetryInfo says."""
    return _quota(f"{subject} gave its place up to callers waiting while the server is full; retry in "
                  f"{retry_after_s:.1f} s", subject, "a freed place goes to another caller first",
                  retry_after_s, "GAVE_WAY", {"subject": subject})


def rate_limited(subject: str, rate: float, retry_after_s: float) -> ServingError:
    """RESOURCE_EXHAUSTED: the caller sends more requests a second than it may."""
    return _quota(f"{subject} sends more than {rate:g} requests a second, its limit; retry in {retry_after_s:.2f} s",
                  subject, f"rate limit {rate:g}/s", min(retry_after_s, 0.999),
                  "RATE_LIMITED", {"subject": subject})


def deadline_exceeded(plugin: str) -> ServingError:
    return ServingError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the deadline passed before plugin {plugin!r} produced a result",
        _error_info("DEADLINE_EXCEEDED", plugin=plugin),
    )


def cancelled() -> ServingError:
    """CANCELLED: the client went away before its answer (for metrics and the audit trail)."""
    return ServingError(grpc.StatusCode.CANCELLED, "the client cancelled the call", _error_info("CANCELLED"))


def plugin_crashed(plugin: str, error: BaseException) -> ServingError:
    """INTERNAL for an exception raised inside a plugin's preprocess or predict."""
    return ServingError(
        grpc.StatusCode.INTERNAL,
        f"plugin {plugin!r} failed on this input: {type(error).__name__}: {error}",
        _error_info("PLUGIN_ERROR", plugin=plugin, exception=type(error).__name__),
    )


def weights_mismatch(plugin: str, version: str, served: str, asked: str) -> ServingError:
    """FAILED_PRECONDITION: the request pinned weights that the version it would get does not have."""
    asked = clip(asked)
    description = (f"the request asks for weights {asked}, but {plugin} {version} serves {served}" if version
                   else f"plugin {plugin!r} serves no version with weights {asked}")
    return ServingError(
        grpc.StatusCode.FAILED_PRECONDITION, description + ": never answered by other weights",
        error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
            type="WEIGHTS_SHA256", subject=f"{plugin}/{version}", description=description)]),
        _error_info("WEIGHTS_MISMATCH", plugin=plugin, model_version=version, weights_sha256=asked))


def site_not_accepted(plugin: str, version: str, description: str) -> ServingError:
    """FAILED_PRECONDITION: a site version whose validation does not meet its site's acceptance
    criteria, or whose parent changed since it was made (`sites.py`)."""
    return ServingError(
        grpc.StatusCode.FAILED_PRECONDITION, description,
        error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
            type="SITE_ACCEPTANCE", subject=f"{plugin}/{version}", description=description)]),
        _error_info("SITE_NOT_ACCEPTED", plugin=plugin, model_version=version))


def version_ungated(plugin: str, version: str, missing: list[str], description: str) -> ServingError:
    """FAILED_PRECONDITION: the version lacks a required safety check and the operator did not allow it."""
    return ServingError(
        grpc.StatusCode.FAILED_PRECONDITION, description,
        error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
            type="SAFETY_CHECKS", subject=f"{plugin}/{version}", description=f"missing: {', '.join(missing)}")]),
        _error_info("VERSION_UNGATED", plugin=plugin, model_version=version, missing=",".join(missing)))


def draining(resume_index: int) -> ServingError:
    """UNAVAILABLE ending a stream while the server stops: every item before `resume_index` was
    answered, none from it on was (those read were dropped unanswered); resend those, to this
    server's successor or a replica."""
    return ServingError(
        grpc.StatusCode.UNAVAILABLE,
        f"the server is stopping: items 0 to {resume_index - 1} were answered; resend from item {resume_index}",
        _error_info("SERVER_DRAINING", resume_index=str(resume_index)),
        error_details_pb2.RetryInfo(retry_delay=_duration(1.0)))


def stream_ended(reason: str, resume_index: int, why: str, retry_after_s: float = 0.0) -> ServingError:
    """UNAVAILABLE ending a stream the server will not keep open (idle, too slow or too old): every
    item before `resume_index` was answered, none from it on was read; open a new stream, after
    `retry_after_s` (RetryInfo), and resend from there."""
    return ServingError(
        grpc.StatusCode.UNAVAILABLE, f"{why}: items 0 to {resume_index - 1} were answered; resend from item {resume_index} "
        "on a new stream", _error_info(reason, resume_index=str(resume_index)),
        error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s)))


def unimplemented(plugin: str, feature: str, description: str) -> ServingError:
    """UNIMPLEMENTED for an optional capability (e.g. explanations) the plugin does not offer."""
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, description, _error_info(f"{feature}_UNSUPPORTED", plugin=plugin))


def unexpected(error: BaseException) -> ServingError:
    """INTERNAL for a fault of the server itself: it costs one item, never the stream."""
    return ServingError(grpc.StatusCode.INTERNAL, f"unexpected server error: {type(error).__name__}",
                        _error_info("SERVER_ERROR", exception=type(error).__name__))

