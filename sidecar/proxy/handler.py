"""handle(): the request path, in order, and nothing else.

canonical path -> match rule -> authenticate -> authorize -> strip + set headers -> forward

Every exception becomes a response in exactly one place (`ProxyHandler.__call__`), and
every request, answered or refused, leaves one access-log line and one metrics sample.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from sidecar.auth.authenticate import Authenticator
from sidecar.auth.identity import Identity
from sidecar.config import ProxyConfig
from sidecar.errors import BadRequest, MethodNotAllowed, Rejected, Unauthenticated
from sidecar.observability import logging as logs
from sidecar.observability.metrics import Metrics
from sidecar.observability.tracing import Outcome, RequestTrace, Tracing
from sidecar.policy.decide import match, verdict
from sidecar.policy.model import Policy, Rule
from sidecar.proxy.fastlane import Answer, Incoming
from sidecar.proxy.forward import Forwarder
from sidecar.proxy.headers import HeaderRules, request_id
from sidecar.proxy.paths import canonical
from sidecar.proxy.server import error_body
from sidecar.secrets.audit import AuditLog
from sidecar.secrets.inject import SecretHeaders

_NEVER_PROXIED = frozenset({"TRACE", "TRACK", "CONNECT"})


class Exchange(Outcome):
    """What one request has gathered on its way through; read by the access log and the
    server span."""

    __slots__ = ("request_id", "trace", "upstream_s")

    def __init__(self, rid: str, trace: RequestTrace) -> None:
        Outcome.__init__(self)
        self.request_id = rid
        self.trace = trace
        self.upstream_s: list[float] = [-1.0]


def error_response(rejection: Rejected, rid: str) -> web.Response:
    """The JSON error response of contract section 6 for a rejection."""
    headers = rejection.headers()
    headers["X-Request-ID"] = rid
    return web.Response(
        status=rejection.status,
        body=error_body(rejection.status, rejection.reason, rejection.message, rid),
        content_type="application/json",
        headers=headers,
    )


class ProxyHandler:
    """The request handler of the proxy port; `policy` is swapped whole on reload."""

    def __init__(
        self,
        *,
        policy: Policy,
        authenticator: Authenticator,
        forwarder: Forwarder,
        headers: HeaderRules,
        metrics: Metrics,
        proxy: ProxyConfig,
        secret_headers: SecretHeaders | None = None,
        audit: AuditLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.policy = policy
        self.tracing = tracing or Tracing(service_name="", otlp_endpoint="", sample_ratio=1.0)
        self.secret_headers = secret_headers
        self.audit = audit
        self.authenticator = authenticator
        self.forwarder = forwarder
        self.headers = headers
        self.metrics = metrics
        self.proxy = proxy

    async def __call__(self, request: Incoming) -> Answer:
        started = time.perf_counter()
        h = request.headers
        trace = self.tracing.start(request.method, h.get("traceparent"), h.get("tracestate"))
        ex = Exchange(request_id(h.get("X-Request-ID")), trace)
        token = logs.REQUEST.set((ex.request_id, trace.trace_id, trace.span_id))
        hot = self.metrics.hot
        hot.in_flight += 1
        status = 500
        try:
            response = await self._handle(request, ex)
            status = response.status
        except Rejected as rejection:
            response = self._refuse(rejection, ex)
            status = rejection.status
        except Exception:
            logs.LOG.exception("request failed")
            response = self._refuse(Rejected(500, "internal_error", "internal error"), ex)
        finally:
            hot.in_flight -= 1
        ex.status = status
        self._finish(request, ex, status, time.perf_counter() - started)
        logs.REQUEST.reset(token)
        return response

    def _refuse(self, rejection: Rejected, ex: Exchange) -> web.Response:
        ex.reason = rejection.reason
        if rejection.status in (401, 403) and not ex.decision:
            ex.decision = "deny"
        if rejection.status == 401:
            self.metrics.auth_failures.labels(ex.auth_method or "none", rejection.reason).inc()
        return error_response(rejection, ex.request_id)

    def _finish(self, request: Incoming, ex: Exchange, status: int, seconds: float) -> None:
        upstream = ex.upstream_s[0]
        self.metrics.observe(
            ex.rule, request.method, status, seconds, upstream if upstream >= 0 else None
        )
        if ex.decision:
            self.metrics.decided(ex.rule, ex.decision)
            if self.audit is not None:
                self.audit.decision(
                    decision=ex.decision,
                    rule=ex.rule,
                    reason=ex.reason,
                    subject_kind=ex.auth_method or "anonymous",
                    method=request.method,
                    path=ex.path,
                    request_id=ex.request_id,
                    trace_id=ex.trace.trace_id,
                )
        elif ex.rule == "-" and ex.reason:
            self.metrics.rejected.labels(ex.reason).inc()
        ex.trace.finish(ex)
        logs.request_access(
            ex.request_id,
            ex.trace.trace_id,
            ex.trace.span_id,
            request.method,
            ex.path,
            ex.rule,
            ex.decision,
            ex.reason,
            status,
            ex.auth_method,
            round(upstream * 1000, 3) if upstream >= 0 else None,
            round(seconds * 1000, 3),
            sampled=status < 500 and ex.decision in ("allow", "shadow_allow"),
        )

    async def _handle(self, request: Incoming, ex: Exchange) -> Answer:
        # 1. the request itself: method, version, target
        method = request.method
        if method in _NEVER_PROXIED:
            raise MethodNotAllowed(method)
        version = request.version
        if version.major != 1:
            if version.major >= 2:
                raise Rejected(505, "http_version_not_supported", "only HTTP/1.x on this port")
            raise BadRequest("http_0_9", "HTTP/0.9 is not accepted")
        target = request.raw_path
        if len(target) > self.proxy.max_target_bytes:
            raise Rejected(414, "uri_too_long", "request target too long")
        path, query = canonical(target, allow_encoded_slashes=self.proxy.allow_encoded_slashes)
        ex.path = path

        # 2. the rule
        policy = self.policy
        found = match(policy, method, path)
        if found is None:
            ex.rule = "none"
            ex.decision = "deny"
            raise Rejected(403, "no_matching_rule", "no rule allows this request")
        rule, params = found
        ex.rule = rule.name
        if len(rule.paths) == 1:
            ex.route = rule.paths[0]

        # 3. authenticate and authorize
        identity = await self._decide(request, rule, params, policy, ex)

        # 4. headers the app trusts
        websocket = isinstance(request, web.BaseRequest) and _is_websocket(request)
        if (
            isinstance(request, web.BaseRequest)
            and version.minor >= 1
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        own = self._sidecar_headers(request, rule, identity, ex)
        if self.secret_headers is not None:
            own += await self.secret_headers.for_request(rule.name, identity, ex.request_id)
        outgoing = self.headers.upstream(
            request.headers,
            own,
            strip_credentials=identity is not None,
            websocket=websocket,
        )

        # 5. forward, inside the upstream span
        trace = ex.trace
        for name, value in trace.upstream_headers(method, self.forwarder.base_url + path):
            outgoing[name] = value
        response: Answer
        try:
            if websocket and isinstance(request, web.BaseRequest):
                response = await self.forwarder.forward_websocket(request, path, query, outgoing)
            else:
                response = await self.forwarder.forward(
                    request, path, query, outgoing, ex.upstream_s, ex.request_id
                )
        except Rejected as exc:
            trace.end_upstream(None, exc.reason)
            raise
        trace.end_upstream(response.status)
        return response

    async def _decide(
        self,
        request: Incoming,
        rule: Rule,
        params: dict[str, str],
        policy: Policy,
        ex: Exchange,
    ) -> Identity | None:
        """The caller's identity if the rule lets the request through; raises otherwise."""
        shadow = rule.mode == "shadow"
        identity: Identity | None = None
        try:
            if not (rule.deny or rule.public):
                try:
                    identity = await self.authenticator.authenticate(request, rule.authn)
                except Unauthenticated as exc:
                    ex.auth_method = exc.method
                    raise
                ex.auth_method = identity.method
            status, reason = verdict(policy, rule, params, identity)
            if status == 403:
                raise Rejected(
                    403, reason, "denied by policy" if rule.deny else "not allowed by policy"
                )
            if status == 401:
                raise Unauthenticated(reason, "credential required", invalid=False)
        except Rejected as rejection:
            if not shadow or rejection.status not in (401, 403):
                raise
            ex.decision = "shadow_deny"
            ex.reason = rejection.reason
            if rejection.status == 401:
                identity = None
            if identity is None:
                ex.auth_method = "public"
            logs.event(
                logging.INFO,
                "shadow_deny",
                request_id=ex.request_id,
                rule=rule.name,
                reason=rejection.reason,
            )
            return identity
        if rule.public:
            ex.auth_method = "public"
        ex.decision = "shadow_allow" if shadow else "allow"
        return identity

    def _sidecar_headers(
        self,
        request: Incoming,
        rule: Rule,
        identity: Identity | None,
        ex: Exchange,
    ) -> list[tuple[str, str]]:
        h = self.headers
        out: list[tuple[str, str]] = []
        if identity is None:
            out.append((h.method, "public"))
        else:
            out.append((h.subject, identity.subject))
            if identity.tenant is not None:
                out.append((h.tenant, identity.tenant))
            if identity.roles:
                out.append((h.roles, ",".join(identity.roles)))
            out.append((h.method, identity.method))
        out.append((h.rule, rule.name))
        out.append(("X-Request-ID", ex.request_id))
        peer = request.remote
        if peer:
            out.append(("X-Forwarded-For", peer))
        out.append(("X-Forwarded-Proto", "https" if request.secure else "http"))
        host = request.headers.get("Host")
        if host:
            out.append(("X-Forwarded-Host", host))
        return out


def _is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def reject_hook(metrics: Metrics) -> Any:
    """The hook the listening protocol calls for requests it refuses itself."""

    def on_reject(status: int, reason: str, rid: str) -> None:
        metrics.count_request("-", "OTHER", status)
        metrics.rejected.labels(reason).inc()
        logs.access(
            {
                "request_id": rid,
                "trace_id": None,
                "method": None,
                "path": None,
                "rule": "-",
                "decision": "",
                "reason": reason,
                "status": status,
                "auth_method": "",
                "upstream_ms": None,
                "duration_ms": None,
            }
        )

    return on_reject
