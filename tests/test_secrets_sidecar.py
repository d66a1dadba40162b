"""Secrets through the sidecar against a real OpenBao dev server: header injection that
follows new versions under load, atomic files, provider outages, tenant isolation, a short
token TTL, and no secret value in any log line or metric."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.observability.logging import JsonFormatter
from tests.conftest import Bao, Keys, Running, SidecarFactory, Upstream, make_token

TEMPLATE = "DB_USER=${username}\\nDB_PASS=${password}\\n"


def secrets_config(
    bao: Bao,
    tmp: Path,
    interval: str = "500ms",
    auth: str = "{method: token}",
    extra_headers: str = "",
) -> str:
    return f"""
secrets:
  provider: vault
  refresh_interval: {interval}
  vault:
    url: "{bao.url}"
    auth: {auth}
  headers:
    - {{name: X-Db-Password, secret: database/orders, field: password}}
{extra_headers}
  files:
    - {{path: "{tmp}/run/db.env", secret: database/orders, mode: "0400",
       template: "{TEMPLATE}"}}
audit:
  sink: "file:{tmp}/audit.log"
"""


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line the sidecar writes during the test, as JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    access = logging.getLogger("sidecar.access")
    old_disabled, access.disabled = access.disabled, False
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)
    access.disabled = old_disabled


async def _ready(running: Running, client: aiohttp.ClientSession, wait: float = 15) -> None:
    deadline = time.monotonic() + wait
    while True:
        async with client.get(f"{running.admin}/readyz") as r:
            if r.status == 200:
                return
            body = await r.json()
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


def _seen_header(body: dict[str, object], name: str) -> str | None:
    for k, v in body["headers"]:  # type: ignore[union-attr, misc]
        if k.lower() == name.lower():
            return str(v)
    return None


async def test_header_follows_new_versions_under_load_and_files_are_atomic(
    bao: Bao,
    tmp_path: Path,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    keys: Keys,
    captured_logs: io.StringIO,
) -> None:
    root = bao.client()
    root.secrets.kv.v2.create_or_update_secret(
        path="database/orders", secret={"username": "orders", "password": "pw-v1-3f9a7c"}
    )
    running: Running = await make_sidecar(
        upstream.url, extra=secrets_config(bao, tmp_path), env={"DOTMAC_VAULT_TOKEN": bao.token}
    )
    env_file = tmp_path / "run/db.env"
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    seen: list[tuple[float, int, str | None]] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as client:
        await _ready(running, client)
        # ready means the file is there, complete, with its mode
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o400
        assert env_file.read_text() == "DB_USER=orders\nDB_PASS=pw-v1-3f9a7c\n"

        async def loop() -> None:
            while not stop.is_set():
                async with client.get(f"{running.url}/app/x", headers=auth) as r:
                    body = await r.json() if r.status == 200 else {"headers": []}
                    seen.append((time.monotonic(), r.status, _seen_header(body, "X-Db-Password")))
                    assert "x-db-password" not in {k.lower() for k in r.headers}

        loops = [asyncio.ensure_future(loop()) for _ in range(3)]
        await asyncio.sleep(0.5)
        written = time.monotonic()
        root.secrets.kv.v2.create_or_update_secret(
            path="database/orders", secret={"username": "orders", "password": "pw-v2-81d0e2"}
        )
        while True:
            await asyncio.sleep(0.05)
            after = [v for t, _, v in seen if t > written]
            if after and after[-1] == "pw-v2-81d0e2":
                switched = time.monotonic() - written
                break
            assert time.monotonic() - written < 3, "new version not injected in time"
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*loops)
        async with client.get(f"{running.admin}/metrics") as r:
            metrics = await r.text()

    assert {status for _, status, _ in seen} == {200}, "a request failed across the change"
    values = [v for _, _, v in seen]
    assert set(values) == {"pw-v1-3f9a7c", "pw-v2-81d0e2"}
    first_new = values.index("pw-v2-81d0e2")
    assert "pw-v1-3f9a7c" not in values[first_new + 5 :]  # in flight at the switch at most
    assert switched < 0.5 * 1.1 + 0.6  # one refresh interval (+jitter) and a poll
    assert env_file.read_text() == "DB_USER=orders\nDB_PASS=pw-v2-81d0e2\n"
    print(f"\n{len(seen)} requests across the change, new value after {switched:.2f}s")

    audit = (tmp_path / "audit.log").read_text()
    everything = captured_logs.getvalue() + audit + metrics
    for value in ("pw-v1-3f9a7c", "pw-v2-81d0e2"):
        assert value not in everything, "a secret value leaked into logs, audit or metrics"
    events = [json.loads(line) for line in audit.splitlines()]
    reads = [e for e in events if e["event"] == "secret_read" and e["request_id"]]
    assert len(reads) == len(seen)
    assert {e["version"] for e in reads} == {"1", "2"}
    assert all(e["path"] == "database/orders" and e["rule"] == "app" for e in reads)
    assert 'dotmac_sidecar_secret_age_seconds{secret="database/orders"}' in metrics


async def test_fifty_rotations_never_show_a_partial_file(
    bao: Bao, tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    root = bao.client()
    root.secrets.kv.v2.create_or_update_secret(
        path="database/orders", secret={"username": "orders", "password": "p" * 43}
    )
    running: Running = await make_sidecar(
        upstream.url,
        extra=secrets_config(bao, tmp_path, interval="100ms"),
        env={"DOTMAC_VAULT_TOKEN": bao.token},
    )
    env_file = tmp_path / "run/db.env"
    async with aiohttp.ClientSession() as client:
        await _ready(running, client)
    shape = re.compile(r"DB_USER=orders\nDB_PASS=[A-Za-z0-9_\-]{43}\n")
    bad: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            text = env_file.read_text()
            reads[0] += 1
            if not shape.fullmatch(text):
                bad.append(text)

    thread = threading.Thread(target=reader)
    thread.start()
    from sidecar.secrets.rotation import rotate
    from sidecar.secrets.vault import VaultProvider

    provider = VaultProvider(url=bao.url, token=bao.token)
    try:
        for _ in range(50):
            new = await asyncio.to_thread(rotate, provider, "database/orders", ["password"])
            expected = f"DB_PASS={new.data['password']}\n"
            deadline = time.monotonic() + 3
            while not env_file.read_text().endswith(expected):
                assert time.monotonic() < deadline, "rotation not rendered"
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert reads[0] > 200
    print(f"\n50 rotations, {reads[0]} reads of the file, none partial or empty")


async def test_openbao_down_keeps_last_values_and_recovers(
    bao: Bao, tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="database/orders", secret={"username": "orders", "password": "before-outage"}
    )
    running: Running = await make_sidecar(
        upstream.url,
        extra=secrets_config(bao, tmp_path, interval="200ms"),
        env={"DOTMAC_VAULT_TOKEN": bao.token},
    )
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}

    async def injected(client: aiohttp.ClientSession) -> tuple[int, str | None]:
        async with client.get(f"{running.url}/app/x", headers=auth) as r:
            return r.status, _seen_header(await r.json(), "X-Db-Password")

    async def failures(client: aiohttp.ClientSession) -> float:
        async with client.get(f"{running.admin}/metrics") as r:
            text = await r.text()
        m = re.search(r'dotmac_sidecar_secret_refresh_total\{result="failure"\} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    async with aiohttp.ClientSession() as client:
        await _ready(running, client)
        assert await injected(client) == (200, "before-outage")
        await asyncio.to_thread(bao.stop)
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 1.5:
            assert await injected(client) == (200, "before-outage")
            await asyncio.sleep(0.05)
        assert await failures(client) >= 3
        async with client.get(f"{running.admin}/readyz") as r:
            assert r.status == 200  # loaded once: stays ready on the last good value
        await asyncio.to_thread(bao.start)  # a dev server comes back empty: seed it again
        bao.client().secrets.kv.v2.create_or_update_secret(
            path="database/orders", secret={"username": "orders", "password": "after-outage"}
        )
        back = time.monotonic()
        while (await injected(client))[1] != "after-outage":
            assert time.monotonic() - back < 5, (
                f"did not recover after OpenBao came back: {running.sidecar.secret_store.errors}"
            )
            await asyncio.sleep(0.05)


async def test_tenant_paths_are_isolated_and_audited(
    bao: Bao, tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    root = bao.client()
    root.secrets.kv.v2.create_or_update_secret(
        path="database/orders", secret={"username": "orders", "password": "shared"}
    )
    for tenant in ("a", "b"):
        root.secrets.kv.v2.create_or_update_secret(
            path=f"tenants/{tenant}/db", secret={"password": f"tenant-{tenant}-pw"}
        )
    header = (
        '    - {name: X-Tenant-Db, secret: "tenants/{tenant}/db", field: password, rules: [app]}'
    )
    running: Running = await make_sidecar(
        upstream.url,
        extra=secrets_config(bao, tmp_path, extra_headers=header),
        env={"DOTMAC_VAULT_TOKEN": bao.token},
    )
    ids: dict[str, list[str]] = {"a": [], "b": []}
    async with aiohttp.ClientSession() as client:
        await _ready(running, client)
        for i in range(20):
            tenant = "ab"[i % 2]
            token = make_token(keys, roles=["admin"], tenant_id=tenant)
            async with client.get(
                f"{running.url}/app/{i}", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200
                assert _seen_header(await r.json(), "X-Tenant-Db") == f"tenant-{tenant}-pw"
                ids[tenant].append(r.headers["X-Request-ID"])
        for claim in ("../b", "a/../b", "b%2f", "b\\", "."):
            token = make_token(keys, roles=["admin"], tenant_id=claim)
            async with client.get(
                f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 403, claim
                assert (await r.json())["reason"] == "invalid_tenant"
        token = make_token(keys, roles=["admin"])  # no tenant at all
        async with client.get(
            f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 403
            assert (await r.json())["reason"] == "tenant_required"
    events = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    tenant_reads = [e for e in events if e["event"] == "secret_read" and e["tenant"]]
    assert len(tenant_reads) == 20
    for e in tenant_reads:
        owner = "a" if e["request_id"] in ids["a"] else "b"
        assert e["request_id"] in ids[owner]
        assert e["tenant"] == owner and e["path"] == f"tenants/{owner}/db"


async def test_ten_second_token_ttl_sidecar_keeps_working_for_a_minute(
    bao: Bao, tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    root = bao.client()
    root.sys.create_or_update_policy(
        name="orders-read", policy='path "secret/data/*" { capabilities = ["read"] }'
    )
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        "orders", token_policies=["orders-read"], token_ttl="10s", token_max_ttl="20s"
    )
    role_id = root.auth.approle.read_role_id("orders")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("orders")["data"]["secret_id"]
    root.secrets.kv.v2.create_or_update_secret(
        path="database/orders", secret={"username": "orders", "password": "pw-0"}
    )
    running: Running = await make_sidecar(
        upstream.url,
        extra=secrets_config(
            bao, tmp_path, interval="1s", auth=f"{{method: approle, role_id: {role_id}}}"
        ),
        env={"DOTMAC_VAULT_SECRET_ID": secret_id},
    )
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    store = running.sidecar.secret_store
    assert store is not None
    async with aiohttp.ClientSession() as client:
        await _ready(running, client)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 60:
            n += 1
            root.secrets.kv.v2.create_or_update_secret(
                path="database/orders", secret={"username": "orders", "password": f"pw-{n}"}
            )
            await asyncio.sleep(2.0)
            async with client.get(f"{running.url}/app/x", headers=auth) as r:
                assert r.status == 200
                assert _seen_header(await r.json(), "X-Db-Password") == f"pw-{n}"
    provider = store.provider
    assert store.errors == {}
    assert provider.renewals >= 1 and provider.logins >= 3  # type: ignore[attr-defined]
    print(
        f"\n60 s on 10 s tokens: {provider.renewals} renewals, "  # type: ignore[attr-defined]
        f"{provider.logins} logins"
    )  # type: ignore[attr-defined]
