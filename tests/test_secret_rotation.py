"""`dotmac-sidecar secrets rotate`: a new random version, older ones readable; a JWT HMAC
secret rotated this way verifies tokens of both versions for the grace period."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import jwt
import yaml

from sidecar.secrets.providers import FileProvider
from tests.conftest import Running, SidecarFactory, Upstream


def rotate_cli(config: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "secrets", "rotate", path, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rotate_keeps_older_versions_readable(tmp_path: Path) -> None:
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text("database/orders: {username: orders, password: first}\n")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(f"secrets:\n  provider: file\n  file: {secrets_file}\n")
    provider = FileProvider(secrets_file)
    v1 = provider.read("database/orders")
    out = rotate_cli(cfg, "database/orders")
    assert out.returncode == 0, out.stderr
    assert "new version" in out.stderr and "first" not in out.stderr and out.stdout == ""
    v2 = provider.read("database/orders")
    assert v2.version != v1.version
    assert v2.data["password"] != "first" and len(v2.data["password"]) >= 40
    assert v2.data["username"] != "orders"  # every field is renewed unless --field is given
    assert provider.read("database/orders", v1.version).data["password"] == "first"
    env_cfg = tmp_path / "env.yaml"
    env_cfg.write_text("secrets:\n  provider: env\n")
    refused = rotate_cli(env_cfg, "database/orders")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "dotmac-sidecar: the env secrets provider is read-only"


async def test_rotated_hmac_secret_accepted_in_both_versions_for_the_grace_period(
    tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text("jwt/signing: {key: " + "k1" * 24 + "}\n")
    auth = """  jwt:
    - issuer: rotating
      algorithms: [HS256]
      secret: {path: jwt/signing, field: key}
      secret_grace: 3s
"""
    extra = f"secrets:\n  provider: file\n  file: {secrets_file}\n  refresh_interval: 200ms\n"
    running: Running = await make_sidecar(upstream.url, auth_override=auth, extra=extra)

    def token(key: str, sub: str) -> str:
        return jwt.encode(
            {"iss": "rotating", "sub": sub, "exp": int(time.time()) + 300, "roles": ["admin"]},
            key,
            algorithm="HS256",
        )

    def current_key() -> str:
        return str(yaml.safe_load(secrets_file.read_text())["jwt/signing"]["key"])

    async with aiohttp.ClientSession() as client:

        async def status(t: str) -> int:
            async with client.get(
                f"{running.url}/app/x", headers={"Authorization": f"Bearer {t}"}
            ) as r:
                return r.status

        deadline = time.monotonic() + 5
        while (await client.get(f"{running.admin}/readyz")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        old_key = current_key()
        cached_old = token(old_key, "seen-before")
        assert await status(cached_old) == 200
        cfg = tmp_path / "rotate.yaml"
        cfg.write_text(extra)
        assert (await asyncio.to_thread(rotate_cli, cfg, "jwt/signing")).returncode == 0
        rotated = time.monotonic()
        new_key = current_key()
        assert new_key != old_key
        while await status(token(new_key, "new")) != 200:
            assert time.monotonic() - rotated < 2, "new secret not in use"
            await asyncio.sleep(0.05)
        # during the grace period both versions verify
        assert await status(token(old_key, "old-fresh")) == 200
        assert await status(cached_old) == 200
        await asyncio.sleep(max(0.0, 3.6 - (time.monotonic() - rotated)))
        assert await status(token(old_key, "old-late")) == 401
        assert await status(cached_old) == 401  # the cache never outlives the grace period
        assert await status(token(new_key, "new-2")) == 200


def test_env_provider_reads_json_or_plain_values() -> None:
    from sidecar.secrets.providers import EnvProvider, SecretError

    env = {
        "DOTMAC_SECRET_DATABASE_ORDERS": '{"username": "orders", "password": "pw"}',
        "DOTMAC_SECRET_API_TOKEN": "plain",
    }
    provider = EnvProvider(env)
    assert provider.variable("database/orders") == "DOTMAC_SECRET_DATABASE_ORDERS"
    assert provider.read("database/orders").data == {"username": "orders", "password": "pw"}
    assert provider.read("api/token").data == {"value": "plain"}
    try:
        provider.read("missing/one")
    except SecretError as exc:
        assert "DOTMAC_SECRET_MISSING_ONE" in str(exc)
    else:
        raise AssertionError("a missing variable must be an error")


async def test_file_change_notifies_the_app_by_post_and_by_signal(
    tmp_path: Path, make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    import os
    import signal as signals

    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text("app/config: {token: one}\n")
    marker = tmp_path / "hup-received"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import signal, sys, time, pathlib\n"
                f"p = pathlib.Path({str(marker)!r})\n"
                "signal.signal(signal.SIGHUP, lambda *a: p.write_text('hup'))\n"
                "time.sleep(30)\n"
            ),
        ]
    )
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(str(child.pid))
    extra = f"""secrets:
  provider: file
  file: {secrets_file}
  refresh_interval: 200ms
  files:
    - path: {tmp_path}/out/a.conf
      secret: app/config
      template: "token=${{token}}\\n"
      mode: "0440"
      on_change: {{post: "{upstream.url}/reload"}}
    - path: {tmp_path}/out/b.conf
      secret: app/config
      template: "${{token}}"
      on_change: {{signal: HUP, pid_file: {pid_file}}}
"""
    try:
        running: Running = await make_sidecar(upstream.url, extra=extra)
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 5
            while (await client.get(f"{running.admin}/readyz")).status != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        out = tmp_path / "out"
        assert (out / "a.conf").read_text() == "token=one\n"
        assert oct((out / "a.conf").stat().st_mode & 0o777) == "0o440"
        assert [s for s in upstream.seen if s["path"] == "/reload"] == []  # no nudge at start
        secrets_file.write_text("app/config: {token: two}\n")
        deadline = time.monotonic() + 5
        while not marker.exists() or not any(s["path"] == "/reload" for s in upstream.seen):
            assert time.monotonic() < deadline, "the app was not told about the change"
            await asyncio.sleep(0.05)
        assert (out / "b.conf").read_text() == "two"
        posts = [s for s in upstream.seen if s["path"] == "/reload"]
        assert len(posts) == 1 and posts[0]["method"] == "POST"
    finally:
        if child.poll() is None:
            os.kill(child.pid, signals.SIGTERM)
        child.wait(10)
