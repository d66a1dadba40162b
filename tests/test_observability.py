"""Traces, metrics and logs, checked with real receivers and real tools.

An OTLP/HTTP receiver (aiohttp, decoding the protobuf with opentelemetry-proto) takes the
sidecar's spans; `promtool` (Debian package `prometheus`) checks the live /metrics and the
shipped alert rules; the dashboard's and alerts' metric names are checked against /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar.app import free_port
from tests.conftest import (
    ACCESS_LOG_KEYS,
    Keys,
    Process,
    Running,
    SidecarFactory,
    Upstream,
    make_token,
    serve_loopback,
)

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    service: str


@dataclass
class Receiver:
    """A real OTLP/HTTP traces endpoint that keeps every span it is sent."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for(self, count: int, within: float = 10.0) -> list[Span]:
        """The spans received once there are `count` of them, or when `within` s passed."""
        deadline = time.monotonic() + within
        while len(self.spans) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return list(self.spans)


def _attr(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    record = Receiver()

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        record.posts += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _attr(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    record.spans.append(
                        Span(
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _attr(a.value) for a in s.attributes},
                            service=str(resource.get("service.name")),
                        )
                    )
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner, record.port = await serve_loopback(app)
    yield record
    await runner.cleanup()


SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


def _traceparent(seen: dict[str, Any]) -> str:
    values = [v for k, v in seen["headers"] if k.lower() == "traceparent"]
    assert len(values) == 1, seen["headers"]
    return str(values[0])


async def test_server_and_upstream_spans_parented_and_propagated(
    make_sidecar: SidecarFactory, upstream: Upstream, receiver: Receiver, keys: Keys
) -> None:
    running: Running = await make_sidecar(
        upstream.url,
        extra=f'observability: {{otlp_endpoint: "{receiver.url}", service_name: orders}}',
    )
    token = make_token(keys, roles=["support"], sub="subject-not-in-spans")
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    client_span = "00f067aa0ba902b7"
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"{running.url}/api/users", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
            first_rid = r.headers["X-Request-ID"]
        async with client.get(
            f"{running.url}/api/users",
            headers={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{client_trace}-{client_span}-01",
                "tracestate": "vendor=abc",
            },
        ) as r:
            assert r.status == 200
        async with client.get(f"{running.url}/api/users") as r:
            assert r.status == 401  # a denial: a server span, no upstream span
    await asyncio.to_thread(running.sidecar.tracing.flush)
    spans = await receiver.wait_for(5)
    assert len(spans) == 5, spans
    assert {s.service for s in spans} == {"orders"}

    servers = [s for s in spans if s.kind == SERVER]
    clients = [s for s in spans if s.kind == CLIENT]
    assert len(servers) == 3 and len(clients) == 2
    # request 1: a new trace; the upstream span is the server span's child, and the app was
    # handed a traceparent in the same trace naming the upstream span as its parent
    tp1 = _traceparent(upstream.seen[0]).split("-")
    server1 = next(s for s in servers if s.trace_id == tp1[1] and s.parent_id == "")
    client1 = next(s for s in clients if s.trace_id == tp1[1])
    assert client1.parent_id == server1.span_id
    assert tp1[2] == client1.span_id and int(tp1[3], 16) & 1  # sampled
    assert server1.name == "GET /api/users"
    assert server1.attributes["http.route"] == "/api/users"
    assert server1.attributes["http.request.method"] == "GET"
    assert server1.attributes["http.response.status_code"] == 200
    assert server1.attributes["dotmac.rule"] == "list-users"
    assert server1.attributes["dotmac.decision"] == "allow"
    assert client1.attributes["http.response.status_code"] == 200
    assert first_rid  # every response names its request

    # request 2: the client's trace is continued, and its tracestate goes on to the app
    server2 = next(s for s in servers if s.trace_id == client_trace)
    assert server2.parent_id == client_span
    client2 = next(s for s in clients if s.trace_id == client_trace)
    assert client2.parent_id == server2.span_id
    seen2 = upstream.seen[1]
    assert _traceparent(seen2) == f"00-{client_trace}-{client2.span_id}-01"
    assert ("tracestate", "vendor=abc") in [(k.lower(), v) for k, v in seen2["headers"]]

    # request 3: denied before the upstream; the reason is on the span
    server3 = next(s for s in servers if s.attributes["http.response.status_code"] == 401)
    assert server3.attributes["dotmac.decision"] == "deny"
    assert server3.attributes["dotmac.reason"] == "missing_credential"

    # no credential or subject id in any attribute
    for s in spans:
        for value in s.attributes.values():
            assert token not in str(value) and "subject-not-in-spans" not in str(value)


async def test_collector_down_requests_unaffected_and_drops_counted(
    make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    running: Running = await make_sidecar(
        upstream.url, extra=f'observability: {{otlp_endpoint: "{dead}"}}'
    )
    token = make_token(keys, roles=["support"])
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        for _ in range(50):
            async with client.get(
                f"{running.url}/api/users", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200
        elapsed = time.monotonic() - started
        await asyncio.to_thread(running.sidecar.tracing.flush, 10.0)
        async with client.get(f"{running.admin}/metrics") as r:
            text = await r.text()
    # 50 requests against a dead collector take no longer than a few ms each
    assert elapsed < 5, elapsed
    dropped = _sample(text, 'dotmac_sidecar_spans_dropped_total{reason="export_failed"}')
    assert dropped >= 100, text  # a server and an upstream span per request, none delivered
    assert _sample(text, "dotmac_sidecar_spans_exported_total") == 0


async def test_full_export_queue_drops_and_counts_without_blocking(
    upstream: Upstream, receiver: Receiver
) -> None:
    from sidecar.observability.tracing import Tracing

    counted: dict[str, int] = {}

    def on_spans(result: str, n: int) -> None:
        counted[result] = counted.get(result, 0) + n

    tracing = Tracing(
        service_name="t",
        otlp_endpoint=receiver.url,
        sample_ratio=1.0,
        on_spans=on_spans,
        queue_size=8,
    )
    try:
        from sidecar.observability.tracing import Outcome

        started = time.perf_counter()
        for _ in range(500):
            tracing.start("GET", None, None).finish(Outcome())
        per_span_us = (time.perf_counter() - started) / 500 * 1e6
        await asyncio.to_thread(tracing.flush)
    finally:
        await asyncio.to_thread(tracing.shutdown)
    assert counted.get("queue_full", 0) > 0, counted
    assert counted.get("queue_full", 0) + counted.get("exported", 0) == 500, counted
    assert per_span_us < 2000  # never waits on the exporter


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _series(text: str) -> set[str]:
    """Sample names with their labels, of the sidecar's own metrics."""
    return {
        line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("dotmac_sidecar_")
    }


def _exposed_names(text: str) -> set[str]:
    """Every sample name /metrics can hold, from its TYPE lines (a labelled metric with no
    series yet still has one)."""
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if not m:
            continue
        name, kind = m.groups()
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names |= {name if name.endswith("_total") else f"{name}_total", f"{name}_created"}
        else:
            names.add(name)
    return names


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "promtool is needed (apt-get install prometheus; .ci/run does it)"
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


async def test_promtool_accepts_live_metrics_and_distinct_paths_add_no_series(
    proxy: Running, keys: Keys
) -> None:
    token = make_token(keys, roles=["support"])
    auth = {"Authorization": f"Bearer {token}"}

    async def round_of(client: aiohttp.ClientSession, start: int, count: int) -> None:
        for i in range(start, start + count):
            # an allowed templated path, a forbidden one, an unmatched one, a malformed one
            async with client.get(f"{proxy.url}/api/users/user-{i}", headers=auth) as r:
                assert r.status == 200
            async with client.get(f"{proxy.url}/internal/{i}/x", headers=auth) as r:
                assert r.status == 403
            async with client.get(f"{proxy.url}/nothing/{i}") as r:
                assert r.status == 403
            async with client.get(f"{proxy.url}/a%2F{i}") as r:
                assert r.status == 400

    async with aiohttp.ClientSession() as client:
        await round_of(client, 0, 5)
        async with client.get(f"{proxy.admin}/metrics") as r:
            before = await r.text()
        await round_of(client, 5, 250)  # 1000 requests, 1000 distinct paths
        async with client.get(f"{proxy.admin}/metrics") as r:
            after = await r.text()
    checked = _promtool("check", "metrics", stdin=after)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _series(after) == _series(before)
    assert len(_series(after)) < 400
    for line in after.splitlines():
        assert not re.search(r"user-\d|/internal/|nothing", line), line
    count = 'dotmac_sidecar_requests_total{method="GET",rule="user-record",status_class="2xx"}'
    assert _sample(after, count) == 255


async def test_alert_rules_pass_promtool_and_name_only_real_metrics(proxy: Running) -> None:
    alerts = ROOT / "deploy/prometheus/alerts.yaml"
    dashboard = ROOT / "deploy/grafana/dotmac-sidecar.json"
    checked = _promtool("check", "rules", str(alerts))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "7 rules found" in checked.stdout

    async with aiohttp.ClientSession() as client, client.get(f"{proxy.admin}/metrics") as r:
        exposed = _exposed_names(await r.text())
    board = json.loads(dashboard.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    used = set(re.findall(r"dotmac_sidecar_[a-z_]+", "\n".join(exprs)))
    used |= set(re.findall(r"dotmac_sidecar_[a-z_]+", alerts.read_text()))
    assert len(used) >= 14
    missing = used - exposed
    assert not missing, f"names the dashboard or alerts use that /metrics lacks: {missing}"
    # the panels the issue asks for
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for word in ("requests per second", "5xx", "p50 / p99", "decisions", "jwks", "secret"):
        assert word in titles, word


async def test_every_log_line_is_json_and_access_lines_share_the_trace_id(
    sidecar_process: Any, upstream: Upstream, receiver: Receiver, keys: Keys
) -> None:
    proc: Process = sidecar_process(
        upstream.url,
        extra=f'observability: {{otlp_endpoint: "{receiver.url}"}}',
    )
    token = make_token(keys, roles=["support"])
    async with aiohttp.ClientSession() as client:
        for path, headers, status in [
            ("/api/users", {"Authorization": f"Bearer {token}"}, 200),
            ("/api/users", {}, 401),
            ("/api/users", {"Authorization": "Bearer not-a-token"}, 401),
            ("/nothing", {}, 403),
            ("/a%2Fb", {}, 400),
            ("/healthz", {}, 200),
        ]:
            async with client.get(f"{proc.url}{path}", headers=headers) as r:
                assert r.status == status, path
    spans = await receiver.wait_for(6)  # 5 server spans + 1 upstream span; exported each 1 s
    proc.proc.terminate()
    assert proc.proc.wait(30) == 0
    lines = proc.log.read_text().splitlines()
    records = []
    for line in lines:
        record = json.loads(line)  # every line, start-up and shutdown included, is JSON
        assert "request_id" in record, line
        assert "ts" in record and "level" in record and "msg" in record, line
        records.append(record)
    access = [r for r in records if r["msg"] == "access"]
    assert len(access) == 6
    span_traces = {s.trace_id for s in spans if s.kind == SERVER}
    for line in access:
        assert line["request_id"], line
        assert ACCESS_LOG_KEYS - {"span_id"} <= set(line), line
        if line["rule"] != "-":  # refused before a span could start: nothing to match
            assert line["trace_id"] in span_traces, line
    audit = [r for r in records if r["msg"] == "audit" and r.get("event") == "decision"]
    assert {a["decision"] for a in audit} == {"allow", "deny"}
    assert all(a["request_id"] for a in audit)
    for record in records:
        assert token not in json.dumps(record)
    decisions = {(a["decision"], a["reason"]) for a in audit}
    assert ("deny", "no_matching_rule") in decisions


SEED_SNIPPET = """
from dotmac.platform.observability import init_observability, get_tracer, get_metrics

# Initialize observability
init_observability(
    service_name="my-service",
    otlp_endpoint="http://jaeger:14268",
    prometheus_port=9090
)

# Distributed tracing
tracer = get_tracer(__name__)
with tracer.start_as_current_span("operation"):
    # Your code here
    pass

# Custom metrics
metrics = get_metrics()
counter = metrics.create_counter("requests_total")
counter.add(1, {"method": "GET", "status": "200"})
"""

CHECK = """
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=5).read().decode())
"""


def test_seed_observability_snippet_runs_as_written(tmp_path: Path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 9090)) == 0:
            pytest.fail("port 9090, which the seed's snippet names, is taken on this machine")
    script = tmp_path / "snippet.py"
    script.write_text(SEED_SNIPPET + CHECK)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert 'requests_total{method="GET",status="200"} 1.0' in done.stdout
    assert "# TYPE requests_total counter" in done.stdout


def test_library_logs_carry_the_current_span(tmp_path: Path) -> None:
    script = tmp_path / "logs.py"
    script.write_text(
        """
import logging
from dotmac.platform.observability import init_observability, get_tracer, get_metrics
obs = init_observability(service_name="svc", otlp_endpoint="", prometheus_port=0)
tracer = get_tracer("app")
log = logging.getLogger("app")
with tracer.start_as_current_span("work") as span:
    log.info("inside")
    print("SPAN", format(span.get_span_context().trace_id, "032x"), flush=True)
log.info("outside")
hist = get_metrics().create_histogram("work_seconds")
hist.record(0.25, {"kind": "a"})
import urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{obs.prometheus_port}/metrics").read().decode())
"""
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    trace_id = next(line.split()[1] for line in out if line.startswith("SPAN"))
    logged = [json.loads(line) for line in out if line.startswith("{")]
    inside = next(r for r in logged if r["msg"] == "inside")
    outside = next(r for r in logged if r["msg"] == "outside")
    assert inside["trace_id"] == trace_id and len(inside["span_id"]) == 16
    assert "trace_id" not in outside
    assert 'work_seconds_count{kind="a"} 1.0' in done.stdout
