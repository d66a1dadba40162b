"""API keys end to end: the CLI makes them, the sidecar takes them, revocation bites fast,
and no store ever holds a plaintext secret. File store in-process; Redis store shared by
two sidecar processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import redis

from tests.conftest import Process, Running, SidecarFactory, Upstream


def apikey(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "apikey", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("DOTMAC_")},
    )


async def _status(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with client.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def test_file_store_create_use_rotate_revoke(
    tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    keys_file = tmp_path / "keys.yaml"
    auth = f"  api_keys:\n    store: file\n    file: {keys_file}\n"
    admin_cfg = tmp_path / "admin.yaml"
    admin_cfg.write_text(f"auth:\n{auth}")
    made = apikey(
        admin_cfg,
        "create",
        "--name",
        "reports",
        "--roles",
        "admin",
        "--tenant",
        "t9",
        "--expires",
        "30d",
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("dmk_") and "\n" not in key
    key_id = key.split("_")[1]
    assert f"created API key {key_id}" in made.stderr
    secret = key.split("_", 2)[2]
    assert secret not in keys_file.read_text()

    running: Running = await make_sidecar(upstream.url, auth_override=auth)
    url = f"{running.url}/app/x"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers={"X-API-Key": key}) as r:
            assert r.status == 200
            seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        assert seen["x-auth-subject"] == f"apikey:{key_id}"
        assert seen["x-auth-method"] == "api_key"
        assert seen["x-auth-tenant"] == "t9"
        assert await _status(client, url, {"Authorization": f"Bearer {key}"}) == 200
        wrong = key[:-3] + ("AAA" if not key.endswith("AAA") else "BBB")
        assert await _status(client, url, {"X-API-Key": wrong}) == 401
        assert (
            await _status(client, url, {"X-API-Key": key, "Authorization": f"Bearer {key}"}) == 400
        )

        listed = apikey(admin_cfg, "list")
        assert key_id in listed.stdout and "reports" in listed.stdout and "active" in listed.stdout
        assert secret not in listed.stdout

        rotated = apikey(admin_cfg, "rotate", key_id, "--grace", "2s")
        assert rotated.returncode == 0, rotated.stderr
        new_key = rotated.stdout.strip()
        assert new_key.startswith(f"dmk_{key_id}_") and new_key != key
        deadline = time.monotonic() + 3
        while await _status(client, url, {"X-API-Key": new_key}) != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await _status(client, url, {"X-API-Key": key}) == 200  # within the grace period
        await asyncio.sleep(2.2)
        assert await _status(client, url, {"X-API-Key": key}) == 401  # grace over

        revoked = apikey(admin_cfg, "revoke", new_key)  # the full key works as well as the id
        assert revoked.returncode == 0
        started = time.monotonic()
        while await _status(client, url, {"X-API-Key": new_key}) != 401:
            assert time.monotonic() - started < 2.0, "revocation not in force within 2 s"
            await asyncio.sleep(0.05)
        async with client.get(url, headers={"X-API-Key": new_key}) as r:
            assert (await r.json())["reason"] == "api_key_revoked"
    text = keys_file.read_text()
    assert new_key.split("_", 2)[2] not in text and secret not in text


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "none.yaml"
    cfg.write_text("listen: '127.0.0.1:0'\n")
    out = apikey(cfg, "list")
    assert out.returncode == 1
    assert "no API key store" in out.stderr and "Traceback" not in out.stderr
    cfg.write_text(f"auth:\n  api_keys:\n    file: {tmp_path / 'k.yaml'}\n")
    out = apikey(cfg, "revoke", "0123456789abcdef")
    assert out.returncode == 1
    assert out.stderr.strip() == "dotmac-sidecar: no API key with id 0123456789abcdef"


async def test_redis_store_revocation_within_one_second_on_two_sidecars(
    tmp_path: Path,
    redis_url: str,
    sidecar_process: Callable[..., Process],
    upstream: Upstream,
) -> None:
    auth = f"  redis_url: {redis_url}\n  api_keys:\n    store: redis\n"
    admin_cfg = tmp_path / "admin.yaml"
    admin_cfg.write_text(f"auth:\n{auth}")
    made = apikey(
        admin_cfg, "create", "--name", "shared", "--subject", "svc-reports", "--roles", "admin"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    first = sidecar_process(upstream.url, auth_override=auth)
    second = sidecar_process(upstream.url, auth_override=auth)
    urls = [f"{p.url}/app/x" for p in (first, second)]
    headers = {"X-API-Key": key}
    async with aiohttp.ClientSession() as client:
        for url in urls:
            async with client.get(url, headers=headers) as r:
                assert r.status == 200
                seen = {k.lower(): v for k, v in (await r.json())["headers"]}
                assert seen["x-auth-subject"] == "svc-reports"
        assert apikey(admin_cfg, "revoke", key.split("_")[1]).returncode == 0
        revoked_at = time.monotonic()
        pending = set(urls)
        while pending:
            for url in list(pending):
                if await _status(client, url, headers) == 401:
                    pending.discard(url)
            elapsed = time.monotonic() - revoked_at
            assert elapsed < 1.0, f"revocation not in force on {pending} after {elapsed:.2f}s"
            await asyncio.sleep(0.02)
    print(f"\nrevocation in force on both sidecars after {elapsed:.3f}s")

    # the store holds hashes only
    client = redis.Redis.from_url(redis_url)
    secret = key.split("_", 2)[2]
    everything = b""
    for name in client.scan_iter("*"):
        kind = client.type(name)
        if kind == b"string":
            everything += client.get(name) or b""
        elif kind == b"set":
            everything += b" ".join(client.smembers(name))
    client.close()
    assert b"sha256" in everything
    assert secret.encode() not in everything and key.encode() not in everything


async def test_redis_sentinel_url_reaches_the_master(tmp_path: Path, redis_url: str) -> None:
    """`redis+sentinel://HOST:PORT/MASTER` goes through a real redis-sentinel."""
    import shutil

    from sidecar.app import free_port
    from sidecar.auth import apikeys

    master_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {master_port} 1\n"
    )
    binary = shutil.which("redis-server")
    assert binary
    proc = subprocess.Popen(
        [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        record, key = apikeys.created(
            "via-sentinel",
            subject=None,
            roles=("admin",),
            permissions=(),
            tenant=None,
            expires_in=None,
        )
        direct = apikeys.RedisKeyStore(redis_url)
        await direct.put(record)
        await direct.close()
        store = apikeys.RedisKeyStore(f"redis+sentinel://127.0.0.1:{port}/main")
        deadline = time.monotonic() + 10
        while True:
            try:
                found = await store.lookup(record.id)
                break
            except Exception:
                assert time.monotonic() < deadline, "sentinel never answered"
                await asyncio.sleep(0.2)
        assert found is not None and found.accepts(key.split("_", 2)[2], time.time())
        await store.close()
    finally:
        proc.terminate()
        proc.wait(10)
