"""Every Prometheus metric of the sidecar, defined in one place, with bounded labels.

Label values come from closed sets: rule names of the loaded policy (or `-` before a rule
was matched, `none` when none matched), a fixed list of methods (others are `OTHER`),
status classes, decisions and snake_case reasons written in this code base.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

from sidecar import __version__

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# sub-millisecond resolution at the bottom: the sidecar's own overhead lives there
DURATION_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def method_label(method: str) -> str:
    """A bounded label for an HTTP method."""
    return method if method in KNOWN_METHODS else "OTHER"


class Metrics:
    """The sidecar's metrics on one registry (one per process; tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "dotmac_sidecar_requests",
            "Requests answered, by rule, method and status class.",
            ["rule", "method", "status_class"],
            registry=r,
        )
        self.duration = Histogram(
            "dotmac_sidecar_request_duration_seconds",
            "Time from request headers read to response finished.",
            ["rule", "method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "dotmac_sidecar_upstream_duration_seconds",
            "Time spent waiting on and streaming from the app.",
            ["rule"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "dotmac_sidecar_decisions",
            "Policy decisions by rule and outcome (allow, deny, shadow_allow, shadow_deny).",
            ["rule", "decision"],
            registry=r,
        )
        self.auth_failures = Counter(
            "dotmac_sidecar_auth_failures",
            "Rejected credentials by credential kind and reason.",
            ["method", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "dotmac_sidecar_rejected_requests",
            "Requests refused before policy evaluation (malformed, too large, ...), by reason.",
            ["reason"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "dotmac_sidecar_policy_reloads",
            "Policy reloads by result (success, failure); a failure keeps the last good policy.",
            ["result"],
            registry=r,
        )
        self.policy_rules = Gauge(
            "dotmac_sidecar_policy_rules", "Rules in the policy in force.", registry=r
        )
        self.jwks_refresh = Counter(
            "dotmac_sidecar_jwks_refresh",
            "JWKS fetches by issuer and result (success, failure).",
            ["issuer", "result"],
            registry=r,
        )
        self.unknown_kid = Counter(
            "dotmac_sidecar_jwks_unknown_kid",
            "Tokens naming a key id their issuer's key set did not hold.",
            ["issuer"],
            registry=r,
        )
        self.secret_refresh = Counter(
            "dotmac_sidecar_secret_refresh",
            "Secret reads by the refresh loop, by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.secret_age = Gauge(
            "dotmac_sidecar_secret_age_seconds",
            "Seconds since each configured secret was last read successfully.",
            ["secret"],
            registry=r,
        )
        self.spans_exported = Counter(
            "dotmac_sidecar_spans_exported",
            "Trace spans the OTLP collector accepted.",
            registry=r,
        )
        self.spans_dropped = Counter(
            "dotmac_sidecar_spans_dropped",
            "Trace spans lost: the export queue was full, or the collector did not take them.",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "dotmac_sidecar_in_flight_requests", "Requests being handled now.", registry=r
        )
        self.ready = Gauge(
            "dotmac_sidecar_ready",
            "1 while /readyz would answer 200 (policy, keys and secrets loaded), else 0.",
            registry=r,
        )
        self.build_info = Gauge(
            "dotmac_sidecar_build_info", "Version of the running sidecar.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)

    def count_spans(self, result: str, count: int) -> None:
        """Spans that left (`exported`) or were lost (`queue_full`, `export_failed`)."""
        if result == "exported":
            self.spans_exported.inc(count)
        else:
            self.spans_dropped.labels(result).inc(count)

    def observe(
        self, rule: str, method: str, status: int, seconds: float, upstream_seconds: float | None
    ) -> None:
        """Count one finished request."""
        m = method_label(method)
        self._child(self.requests, rule, m, f"{status // 100}xx").inc()
        self._child(self.duration, rule, m).observe(seconds)
        if upstream_seconds is not None:
            self._child(self.upstream_duration, rule).observe(upstream_seconds)

    def decided(self, rule: str, decision: str) -> None:
        """Count one policy decision."""
        self._child(self.decisions, rule, decision).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once per label set (the sets are bounded)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child
