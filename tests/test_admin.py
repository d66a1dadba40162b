"""Admin port and telemetry: health, readiness, metrics with bounded labels, access log."""

from __future__ import annotations

import io
import json
import logging

import aiohttp

from sidecar.app import free_port
from sidecar.observability.logging import ACCESS, JsonFormatter
from tests.conftest import ACCESS_LOG_KEYS, Keys, Running, SidecarFactory, Upstream, make_token


async def test_health_ready_and_upstream_reported_not_gating(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    up: Running = await make_sidecar(upstream.url)
    down: Running = await make_sidecar(f"http://127.0.0.1:{free_port()}")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{up.admin}/healthz") as r:
            assert r.status == 200
        async with client.get(f"{up.admin}/readyz") as r:
            assert r.status == 200
            body = await r.json()
        assert body["ready"] is True
        assert body["checks"]["policy"] == "ok" and body["checks"]["upstream"] == "ok"
        async with client.get(f"{down.admin}/readyz") as r:
            assert r.status == 200  # the app starts after the sidecar
            assert (await r.json())["checks"]["upstream"] == "unreachable"


async def test_metrics_have_bounded_labels(proxy: Running, keys: Keys) -> None:
    token = make_token(keys, roles=["support"], sub="secret-subject-42")
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"{proxy.url}/api/users?x=1", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
            assert len(r.headers["X-Request-ID"]) == 32
        async with client.get(f"{proxy.url}/api/users") as r:
            assert r.status == 401
        async with client.get(f"{proxy.url}/random/path/123") as r:
            assert r.status == 403
        async with client.get(f"{proxy.url}/metrics-should-not-be-here") as r:
            assert r.status == 403
        async with client.get(f"{proxy.admin}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    assert (
        'dotmac_sidecar_requests_total{method="GET",rule="list-users",status_class="2xx"} 1.0'
        in text
    )
    assert (
        'dotmac_sidecar_requests_total{method="GET",rule="list-users",status_class="4xx"} 1.0'
        in text
    )
    assert 'dotmac_sidecar_requests_total{method="GET",rule="none",status_class="4xx"} 2.0' in text
    assert (
        'dotmac_sidecar_request_duration_seconds_bucket{le="0.00025",method="GET",rule="list-users"}'
        in text
    )
    assert 'dotmac_sidecar_decisions_total{decision="allow",rule="list-users"} 1.0' in text
    assert (
        'dotmac_sidecar_auth_failures_total{method="none",reason="missing_credential"} 1.0' in text
    )
    assert token not in text and "secret-subject-42" not in text and "/random" not in text


async def test_access_log_lines(proxy: Running, keys: Keys) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    ACCESS.addHandler(handler)
    old, ACCESS.disabled = ACCESS.disabled, False
    ACCESS.setLevel(logging.INFO)
    token = make_token(keys, roles=["support"])
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(
                f"{proxy.url}/api/users/../users",
                headers={"Authorization": f"Bearer {token}", "X-Request-ID": "abc-123"},
            ) as r:
                assert r.status == 200
                assert r.headers["X-Request-ID"] == "abc-123"
            async with client.get(f"{proxy.url}/api/users") as r:
                assert r.status == 401
    finally:
        ACCESS.removeHandler(handler)
        ACCESS.disabled = old
    raw = stream.getvalue()
    assert token not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert set(line) == ACCESS_LOG_KEYS
        assert line["msg"] == "access"
    ok, denied = lines
    assert ok["request_id"] == "abc-123"
    assert ok["path"] == "/api/users"
    assert ok["decision"] == "allow" and ok["status"] == 200 and ok["auth_method"] == "jwt"
    assert isinstance(ok["upstream_ms"], float) and isinstance(ok["duration_ms"], float)
    assert denied["decision"] == "deny" and denied["reason"] == "missing_credential"
    assert denied["status"] == 401 and denied["upstream_ms"] is None
