"""Who is calling, what they may use, and how much of the server they may hold at once.

One grpc.aio server interceptor (`CallerInterceptor`) does it for every method:

1. **Identity.** A bearer token (`authorization: Bearer <token>` metadata), looked up by its
   SHA-256 in the key file, which never holds a token itself; else the client certificate's
   subject under mutual TLS, if the key file names it; else, when the server runs without a
   key file, an anonymous caller named after the peer's address. With a key file, any other
   call is refused UNAUTHENTICATED. Health (and reflection) stay open unless settings close them.
2. **Authorization.** The caller is put in `CALLER` (a context variable) for the call's
   lifetime; `authorize(plugin)` refuses a plugin the caller may not use (PERMISSION_DENIED),
   and `require_admin()` guards the admin methods.
3. **Limits.** Calls (unary) and streams in flight per caller, and in total, are capped:
   one caller cannot starve the others, and health checks, never counted, are always answered.
   A caller whose stream was ended to free its place for others (streams.py) is told when to
   retry, and is held to it: for those seconds it may not take the last places back.
   A per-caller rate (`max_requests_per_s_per_caller`, images a second, stream items included)
   refuses unary calls past it (RESOURCE_EXHAUSTED, RATE_LIMITED) and slows streams down.
4. **Open streams are re-authorised** at their next item after the key file is reloaded: a
   revoked token's stream ends UNAUTHENTICATED, a changed one gets its new rights.
5. **Every refusal is seen**: a metric by reason (`dxserve_auth_refused_total`), and a log line
   and an audit row, each at most once a minute per reason whatever the number of peers, with
   the count since the last one and the peers it came from, so a flood of bad logins from any
   number of addresses cannot fill the disk or the logs.

Tokens are 256 random bits, so their SHA-256 needs no salt or slow hash: it cannot be
inverted or guessed. `dxserve tokens add NAME --plugins ...` makes one, prints it once, and
stores its hash.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import errors
from .streams import CROWD_RETRY_S

log = logging.getLogger("dxserve.auth")
#: The share of max_concurrent_calls taken at which the server is crowded: idle and slow streams
#: then give their places up (streams.py), and a caller that gave way may not take one back.
CROWDED = 0.9

TOKEN_PREFIX = "dxs_"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
#: The Open Inference Protocol's probes, open and unlimited exactly when health is.
PROBES = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")


@dataclass(frozen=True)
class Caller:
    """An identified caller and what it may do."""

    name: str
    plugins: frozenset[str] | None = None  # None: every plugin
    admin: bool = False
    how: str = "anonymous"  # "token", "certificate" or "anonymous"
    #: (plugin, model version) pairs: the version a request of this caller gets when it names
    #: none, e.g. its laboratory's site version (`dxserve tokens add NAME --version P=V`).
    versions: tuple[tuple[str, str], ...] = ()

    def may_use(self, plugin: str) -> bool:
        return self.plugins is None or plugin in self.plugins

    def default_version(self, plugin: str) -> str:
        """The version this caller is bound to for `plugin`; "" for the plugin's own default."""
        return next((v for p, v in self.versions if p == plugin), "")


ANONYMOUS = Caller("anonymous")
#: The caller of the call being served (set by CallerInterceptor for its lifetime).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("dxserve_caller", default=ANONYMOUS)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class KeyFile:
    """The callers the server knows (JSON): per caller a name, the token's SHA-256 or a
    certificate subject, the plugins it may use ("*" for all) and whether it is an admin."""

    path: Path
    callers: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "KeyFile":
        if not path.exists():
            return cls(path)
        callers = json.loads(path.read_text())["callers"]
        for entry in callers:
            if not entry.get("name") or not (entry.get("token_sha256") or entry.get("certificate_subject")):
                raise ValueError(f"{path}: every caller needs a name and a token_sha256 or certificate_subject: {entry}")
            if not isinstance(entry.get("versions", {}), dict):
                raise ValueError(f"{path}: caller {entry['name']!r}: versions must map plugin names to model versions")
        return cls(path, callers)

    def save(self) -> None:
        """Written to a new file, then renamed over the old one, readable by its owner only."""
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"callers": self.callers}, indent=2) + "\n")
        os.chmod(temporary, 0o600)
        temporary.replace(self.path)

    def add(self, name: str, plugins: list[str], admin: bool = False, certificate_subject: str = "",
            versions: dict[str, str] | None = None) -> str:
        """Add a caller; returns its new token (shown once, never stored), or "" for a certificate.
        `versions`: {plugin: model version} its requests get when they name none (a site version)."""
        if any(entry["name"] == name for entry in self.callers):
            raise ValueError(f"a caller named {name!r} exists already")
        token = "" if certificate_subject else TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = {"name": name, "plugins": plugins or ["*"], "admin": admin, **({"versions": versions} if versions else {})}
        entry.update({"certificate_subject": certificate_subject} if certificate_subject else {"token_sha256": hash_token(token)})
        self.callers.append(entry)
        return token

    def _caller(self, entry: dict, how: str) -> Caller:
        plugins = entry.get("plugins", ["*"])
        versions = tuple(sorted((str(p), str(v)) for p, v in (entry.get("versions") or {}).items()))
        return Caller(entry["name"], None if "*" in plugins else frozenset(plugins), bool(entry.get("admin")), how, versions)

    def by_token(self, token: str) -> Caller | None:
        digest = hash_token(token)
        for entry in self.callers:
            if "token_sha256" in entry and hmac.compare_digest(entry["token_sha256"], digest):
                return self._caller(entry, "token")
        return None

    def by_certificate(self, subject: str) -> Caller | None:
        entry = next((e for e in self.callers if e.get("certificate_subject") == subject), None)
        return self._caller(entry, "certificate") if entry else None


def authorize(plugin: str) -> None:
    """Refuse (PERMISSION_DENIED) a plugin the current caller may not use."""
    caller = CALLER.get()
    if not caller.may_use(plugin):
        raise errors.permission_denied(f"caller {caller.name!r} may not use plugin {errors.clip(plugin)!r}", f"plugin:{errors.clip(plugin)}")


def require_admin() -> None:
    caller = CALLER.get()
    if not caller.admin:
        raise errors.permission_denied(f"caller {caller.name!r} is not an admin", "admin")


def _certificate_subject(context: grpc.aio.ServicerContext) -> str:
    names = context.auth_context().get("x509_subject") or context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:5432", "ipv6:[::1]:5432", "unix:..."
    return peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class RateLimit:
    """A token bucket per caller name: `rate` requests a second, bursts of up to one second's worth."""

    def __init__(self, rate: float):
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def take(self, name: str) -> float:
        """0 when the request may go now (a token is taken), else the seconds until one is free."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        tokens, at = self._buckets.get(name, (self.rate, now))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        if len(self._buckets) > 10_000:  # bounded: forget the idle (their buckets are full anyway)
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 1.0}
        if tokens >= 1:
            self._buckets[name] = (tokens - 1, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (1 - tokens) / self.rate


class Refusals:
    """Counts every refused call by reason; logs it and records it in the audit trail at most
    once per `window_s` per reason, however many peers it comes from (a flood from many
    addresses is one row a minute, issue 32), with the count since then and its peers (how
    many, and the most frequent five)."""

    MAX_PEERS = 1000  # peers counted by name per report; the rest as "others"

    def __init__(self, audit=None, window_s: float = 60.0):
        self.audit, self.window_s = audit, window_s
        self._seen: dict[str, tuple[int, float, Counter]] = {}  # reason -> (unreported count, last report, peers)

    def refused(self, reason: str, peer: str, error: errors.ServingError) -> None:
        from . import metrics

        metrics.AUTH_REFUSED.labels(reason).inc()
        now = time.monotonic()
        reason = errors.clip(reason)
        count, reported, peers = self._seen.get(reason, (0, -self.window_s, Counter()))
        peer = errors.clip(peer)
        peers[peer if peer in peers or len(peers) < self.MAX_PEERS else "others"] += 1
        count += 1
        if now - reported < self.window_s:
            self._seen[reason] = (count, reported, peers)
            return
        if len(self._seen) > 1000:  # reasons can name a plugin a caller asked for: bounded
            self._seen = {k: v for k, v in self._seen.items() if now - v[1] < self.window_s}
        self._seen[reason] = (0, now, Counter())
        source = peer if len(peers) == 1 else f"{len(peers)} peers"
        named = ", ".join(f"{p} ({n})" for p, n in peers.most_common(5))
        detail = f"{count} call(s) refused ({reason}) from {source} since the last report ({named}): {error.message}"
        log.warning("calls refused", extra={"reason": reason, "peer": source, "peers": named, "count": count,
                                            "code": error.code.name})
        if self.audit is not None:
            asyncio.ensure_future(self._record(reason, source, error, detail))

    async def _record(self, reason: str, peer: str, error: errors.ServingError, detail: str) -> None:
        try:
            await self.audit.record(event="refused", caller=peer, status=error.code.name, detail=detail)
        except Exception as failure:  # AuditUnavailable: said in the log, never a reason to fail harder
            log.error("refusal not recorded in the audit trail", extra={"reason": reason, "error": str(failure)})


def refusal_reason(error: errors.ServingError) -> str:
    info = next((d for d in error.details if d.DESCRIPTOR.name == "ErrorInfo"), None)
    if info is None:
        return "other"
    return info.metadata.get("cause") or info.reason.lower()


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Identity, authorization context and per-caller limits for every call (see the module)."""

    def __init__(self, keys: KeyFile | None, open_methods: Callable[[str], bool], max_calls: int, max_calls_per_caller: int,
                 max_streams_per_caller: int, max_requests_per_s: float = 0.0, refusals: Refusals | None = None):
        self.keys, self.is_open = keys, open_methods
        self.max_calls, self.max_per_caller, self.max_streams = max_calls, max_calls_per_caller, max_streams_per_caller
        self.calls, self.streams = Counter(), Counter()  # per caller name; the event loop is the only writer
        self._leaving = 0  # idle streams told to give their places up, not yet gone (`crowded`)
        self._gave_way: dict[str, float] = {}  # caller -> loop time before which it may not take a freed place back
        self.rate = RateLimit(max_requests_per_s)
        self.refusals = refusals or Refusals()

    async def checked_requests(self, requests, context, caller: Caller):
        """A stream's requests, each within the caller's rate (waited for: streams slow down,
        not refused) and, after a key-file reload, by a caller the new file still knows."""
        keys = self.keys
        async for request in requests:
            if self.keys is not keys:  # reloaded: re-identify before this item goes further
                keys = self.keys
                try:
                    caller = self.identify(context)
                except errors.ServingError as error:
                    error = errors.unauthenticated(f"{error.message}: the credentials of this stream were revoked", "revoked")
                    self.refusals.refused("revoked", _peer_host(context), error)
                    raise error from None
                CALLER.set(caller)
            while (wait := self.rate.take(caller.name)) > 0:
                await asyncio.sleep(wait)
            yield request

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        return self.identify_by(str(metadata.get("authorization", "")), lambda: _certificate_subject(context),
                                _peer_host(context))

    def identify_by(self, authorization: str, certificate_subject: Callable[[], str], peer: str) -> Caller:
        """The caller of an `authorization` header (or metadata), else of its client certificate's
        subject, else (no key file) the anonymous caller at `peer`: for gRPC and HTTP alike."""
        scheme, _, token = authorization.partition(" ")
        if self.keys is None:
            return Caller(f"anonymous@{peer}")
        if scheme.lower() == "bearer" and token:
            caller = self.keys.by_token(token.strip())
            if caller is None:
                raise errors.unauthenticated("unknown or revoked token", "unknown_token")
            return caller
        subject = certificate_subject()
        caller = self.keys.by_certificate(subject) if subject else None
        if caller is None:
            presented = f" (the client certificate's subject {errors.clip(subject)!r} is not a known caller)" if subject else ""
            raise errors.unauthenticated(f"this server needs a bearer token (authorization: Bearer <token>) or a known client "
                                         f"certificate{presented}", "unknown_certificate" if subject else "no_credentials")
        return caller

    def crowded(self) -> bool:
        """Whether 90% of the server's call places are taken, not counting streams already told to
        give theirs up; a True answer tells the asking idle stream to give its place up (streams.py),
        and counts it as leaving for a second, so that idle streams leave one by one, not all at once."""
        if sum(self.calls.values()) - self._leaving < CROWDED * self.max_calls:
            return False
        self._leaving += 1
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, self._left)  # by then its call has ended and left `calls`
        now = loop.time()  # the asking stream's caller gives way for as long as it is told to wait (RetryInfo)
        self._gave_way = {name: until for name, until in self._gave_way.items() if until > now}
        self._gave_way[CALLER.get().name] = now + CROWD_RETRY_S
        return True

    def _left(self) -> None:
        self._leaving -= 1

    def admit(self, caller: Caller, streaming: bool, counted: bool = True) -> None:
        """Count a call in, or refuse it (RESOURCE_EXHAUSTED) past the caller's or the server's limits;
        every admitted call is `release`d when it ends."""
        if counted:
            self._admit(caller, streaming)
        self.calls[caller.name] += counted
        self.streams[caller.name] += counted and streaming

    def release(self, caller: Caller, streaming: bool, counted: bool = True) -> None:
        self.calls[caller.name] -= counted
        self.streams[caller.name] -= counted and streaming
        for counter in (self.calls, self.streams):
            if counter[caller.name] <= 0:
                del counter[caller.name]

    def _admit(self, caller: Caller, streaming: bool) -> None:
        if not streaming and (wait := self.rate.take(caller.name)) > 0:
            raise errors.rate_limited(f"caller {caller.name!r}", self.rate.rate, wait)
        if sum(self.calls.values()) >= self.max_calls:
            raise errors.too_many_calls("the server", self.max_calls, "calls")
        # A caller that gave its place up may not take it straight back while others need it (a
        # client that ignores its RetryInfo would otherwise win the place it was asked to free).
        wait = self._gave_way.get(caller.name, 0.0) - asyncio.get_running_loop().time()
        if wait > 0 and sum(self.calls.values()) + 1 >= CROWDED * self.max_calls:
            raise errors.gave_way(f"caller {caller.name!r}", wait)
        if streaming and self.streams[caller.name] >= self.max_streams:
            raise errors.too_many_calls(f"caller {caller.name!r}", self.max_streams, "streams")
        if not streaming and self.calls[caller.name] - self.streams[caller.name] >= self.max_per_caller:
            raise errors.too_many_calls(f"caller {caller.name!r}", self.max_per_caller, "calls")

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or self.is_open(details.method):
            return handler
        streaming = handler.request_streaming or handler.response_streaming
        counted = not details.method.startswith((HEALTH_PREFIX, *PROBES))  # health is never limited, even when closed
        interceptor = self

        def enter(context) -> Caller | None:
            """The call's caller, admitted; None when refused (the call's status is then set: end it)."""
            try:
                caller = interceptor.identify(context)
                interceptor.admit(caller, streaming, counted)
            except errors.ServingError as refusal:
                interceptor.refusals.refused(refusal_reason(refusal), _peer_host(context), refusal)
                refusal.end(context)
                return None
            CALLER.set(caller)  # each call runs in its own task, whose context ends with it
            return caller

        def leave(caller: Caller) -> None:
            interceptor.release(caller, streaming, counted)

        if handler.response_streaming:
            behavior = handler.stream_stream or handler.unary_stream

            async def wrapped(request, context):
                if (caller := enter(context)) is None:
                    return
                if handler.request_streaming:
                    request = interceptor.checked_requests(request, context, caller)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    leave(caller)
        else:
            behavior = handler.stream_unary or handler.unary_unary

            async def wrapped(request, context):
                if (caller := enter(context)) is None:
                    return None
                try:
                    return await behavior(request, context)
                finally:
                    leave(caller)

        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return make[handler.request_streaming, handler.response_streaming](
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def open_methods(health_open: bool, reflection_open: bool) -> Callable[[str], bool]:
    """Which methods skip identity and limits: health (always uncounted) and reflection, by setting."""
    return lambda method: ((health_open and method.startswith((HEALTH_PREFIX, *PROBES)))
                           or (reflection_open and method.startswith(REFLECTION_PREFIX)))
