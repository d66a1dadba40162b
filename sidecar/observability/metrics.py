"""Every Prometheus metric of the sidecar, defined in one place, with bounded labels.

Label values come from closed sets: rule names of the loaded policy (or `-` before a rule
was matched, `none` when none matched), a fixed list of methods (others are `OTHER`),
status classes, decisions and snake_case reasons written in this code base.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
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


_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
_BOUNDS = list(DURATION_BUCKETS)
_BUCKET_LABELS = [*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf"]  # as prometheus_client


class HotPath:
    """The per-request families (requests, request and upstream durations, decisions, in
    flight) as plain dicts of numbers, written from the event loop and read at scrape time.

    prometheus_client takes a lock for every increment: eight per request, the largest
    share of the metrics' cost per request. A counter here is one dict update, a histogram
    observation one bisect and two list updates. Names, help, labels and the text a scrape
    returns are what the prometheus_client objects gave (counters with `_created`).
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], list[float]] = {}
        self.duration: dict[tuple[str, str], list[float]] = {}
        self.upstream: dict[tuple[str], list[float]] = {}
        self.decisions: dict[tuple[str, str], list[float]] = {}
        self.in_flight = 0

    def count(self, rule: str, method: str, status: int) -> None:
        m = method if method in KNOWN_METHODS else "OTHER"
        key = (rule, m, _STATUS_CLASS.get(status // 100, "5xx"))
        cell = self.requests.get(key)
        if cell is None:
            self.requests[key] = [1.0, time.time()]
        else:
            cell[0] += 1

    def observe(
        self, rule: str, method: str, status: int, seconds: float, upstream_seconds: float | None
    ) -> None:
        self.count(rule, method, status)
        _observe(self.duration, (rule, method if method in KNOWN_METHODS else "OTHER"), seconds)
        if upstream_seconds is not None:
            _observe(self.upstream, (rule,), upstream_seconds)

    def decided(self, rule: str, decision: str) -> None:
        key = (rule, decision)
        cell = self.decisions.get(key)
        if cell is None:
            self.decisions[key] = [1.0, time.time()]
        else:
            cell[0] += 1

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "dotmac_sidecar_requests",
            "Requests answered, by rule, method and status class.",
            labels=["rule", "method", "status_class"],
        )
        for key, (value, created) in list(self.requests.items()):
            requests.add_metric(key, value, created=created)
        yield requests
        yield _histogram(
            "dotmac_sidecar_request_duration_seconds",
            "Time from request headers read to response finished.",
            ["rule", "method"],
            self.duration,
        )
        yield _histogram(
            "dotmac_sidecar_upstream_duration_seconds",
            "Time spent waiting on and streaming from the app.",
            ["rule"],
            self.upstream,
        )
        decisions = CounterMetricFamily(
            "dotmac_sidecar_decisions",
            "Policy decisions by rule and outcome (allow, deny, shadow_allow, shadow_deny).",
            labels=["rule", "decision"],
        )
        for pair, (value, created) in list(self.decisions.items()):
            decisions.add_metric(pair, value, created=created)
        yield decisions
        yield GaugeMetricFamily(
            "dotmac_sidecar_in_flight_requests", "Requests being handled now.", value=self.in_flight
        )


def _observe(table: dict[Any, list[float]], key: Any, value: float) -> None:
    """One histogram observation: counts per bucket (the last is +Inf), then the sum."""
    cell = table.get(key)
    if cell is None:
        cell = table[key] = [0.0] * (len(_BOUNDS) + 2)
    cell[bisect_left(_BOUNDS, value)] += 1
    cell[-1] += value


def _histogram(
    name: str, documentation: str, labels: list[str], table: dict[Any, list[float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, cell in list(table.items()):
        running = 0.0
        buckets = []
        for label, count in zip(_BUCKET_LABELS, cell, strict=False):
            running += count
            buckets.append((label, running))
        family.add_metric(list(key), buckets, cell[-1])
    return family


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
        # the four families every request touches: plain numbers, no locks (see HotPath)
        self.hot = HotPath()
        r.register(self.hot)
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
        self.hot.observe(rule, method, status, seconds, upstream_seconds)

    def decided(self, rule: str, decision: str) -> None:
        """Count one policy decision."""
        self.hot.decided(rule, decision)

    def count_request(self, rule: str, method: str, status: int) -> None:
        """Count a request answered without a duration (refused by the listening side)."""
        self.hot.count(rule, method, status)

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once per label set (the sets are bounded)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child
