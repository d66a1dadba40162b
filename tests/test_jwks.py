"""JWKS over real HTTP: rotation on first sight, throttled single-flight refetch, readiness,
stale keys when the provider is down, and no fetch from addresses a token names."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.app import free_port
from tests.conftest import (
    AUDIENCE,
    JwksServer,
    Running,
    SidecarFactory,
    Upstream,
    rsa_jwk,
)

JWKS_ISSUER = "https://idp.test"


def jwks_config(url: str) -> str:
    return f"""  jwt:
    - issuer: "{JWKS_ISSUER}"
      audiences: ["{AUDIENCE}"]
      algorithms: ["RS256"]
      jwks_url: "{url}"
"""


def _sign(key: rsa.RSAPrivateKey, kid: str, **claims: object) -> str:
    now = int(time.time())
    payload = {
        "iss": JWKS_ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "exp": now + 300,
        "roles": ["admin"],
        **claims,
    }
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


async def _sidecar_with_jwks(make_sidecar: SidecarFactory, upstream: Upstream, url: str) -> Running:
    # the test config's own issuers are replaced by the JWKS one
    running: Running = await make_sidecar(upstream.url, auth_override=jwks_config(url))
    return running


async def _ready(admin: str, client: aiohttp.ClientSession) -> tuple[int, dict[str, object]]:
    async with client.get(f"{admin}/readyz") as r:
        return r.status, await r.json()


async def test_rotation_first_sight_and_refetch_throttle(
    make_sidecar: SidecarFactory, upstream: Upstream, jwks_server: JwksServer
) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [rsa_jwk(k1, "k1")]
    await jwks_server.start()
    running = await _sidecar_with_jwks(make_sidecar, upstream, jwks_server.url)
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        for _ in range(100):
            if (await _ready(running.admin, client))[0] == 200:
                break
            await asyncio.sleep(0.05)
        assert jwks_server.fetches == 1

        async def status(token: str) -> int:
            async with client.get(
                f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                await r.read()
                return r.status

        assert await status(_sign(k1, "k1")) == 200
        # within 30 s of the last fetch, unknown kids never cause a fetch
        codes = await asyncio.gather(*(status(_sign(k1, uuid.uuid4().hex)) for _ in range(200)))
        assert set(codes) == {401}
        assert jwks_server.fetches == 1

        # the provider rotates; 30 s after the last fetch, a burst of 1000 tokens with random
        # unknown kids and the first token signed with the new key arrive together
        jwks_server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]
        await asyncio.sleep(max(0.0, 30.5 - (time.monotonic() - started)))
        burst = [status(_sign(k1, uuid.uuid4().hex)) for _ in range(1000)]
        new_key = status(_sign(k2, "k2"))
        results = await asyncio.gather(new_key, *burst)
        assert results[0] == 200  # the new key is accepted on first sight
        assert set(results[1:]) == {401}
        assert jwks_server.fetches == 2  # exactly one refetch for all of them
        assert await status(_sign(k2, "k2")) == 200
        async with client.get(f"{running.admin}/metrics") as r:
            metrics = await r.text()
    assert (
        f'dotmac_sidecar_jwks_refresh_total{{issuer="{JWKS_ISSUER}",result="success"}} 2.0'
        in metrics
    )
    assert f'dotmac_sidecar_jwks_unknown_kid_total{{issuer="{JWKS_ISSUER}"}} 1201.0' in metrics


async def test_not_ready_until_provider_up_and_stale_keys_when_it_goes_down(
    make_sidecar: SidecarFactory, upstream: Upstream, jwks_server: JwksServer
) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [rsa_jwk(k1, "k1")]
    jwks_server.port = free_port()  # nothing listens there yet
    running = await _sidecar_with_jwks(make_sidecar, upstream, jwks_server.url)
    async with aiohttp.ClientSession() as client:
        code, body = await _ready(running.admin, client)
        assert code == 503
        assert str(body["checks"][f"jwks:{JWKS_ISSUER}"]).startswith("not fetched yet")  # type: ignore[index]
        await asyncio.sleep(1.5)
        assert (await _ready(running.admin, client))[0] == 503
        await jwks_server.start(jwks_server.port)
        came_up = time.monotonic()
        while (await _ready(running.admin, client))[0] != 200:
            assert time.monotonic() - came_up < 10, "not ready 10 s after the provider came up"
            await asyncio.sleep(0.1)
        token = _sign(k1, "k1")
        async with client.get(
            f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200

        await jwks_server.stop()  # the provider goes down
        keyset = running.sidecar.keysets[JWKS_ISSUER]
        assert await keyset.fetch() is False  # a scheduled refresh now fails...
        fresh = _sign(k1, "k1", sub="u2")  # ...and a token not seen before still verifies
        async with client.get(
            f"{running.url}/app/x", headers={"Authorization": f"Bearer {fresh}"}
        ) as r:
            assert r.status == 200
        assert (await _ready(running.admin, client))[0] == 200
        async with client.get(f"{running.admin}/metrics") as r:
            assert (
                f'dotmac_sidecar_jwks_refresh_total{{issuer="{JWKS_ISSUER}",result="failure"}}'
            ) in await r.text()


async def test_token_headers_never_make_the_sidecar_fetch(
    make_sidecar: SidecarFactory, upstream: Upstream, jwks_server: JwksServer, tmp_path: Path
) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [rsa_jwk(k1, "k1")]
    await jwks_server.start()
    evil = JwksServer(keys=[rsa_jwk(attacker, "evil")])
    await evil.start()
    try:
        running = await _sidecar_with_jwks(make_sidecar, upstream, jwks_server.url)
        await asyncio.sleep(0.3)
        now = int(time.time())
        claims = {
            "iss": JWKS_ISSUER,
            "aud": AUDIENCE,
            "sub": "u1",
            "exp": now + 300,
            "roles": ["admin"],
        }
        tokens = [
            jwt.encode(claims, attacker, "RS256", headers={"kid": "evil", "jku": evil.url}),
            jwt.encode(claims, attacker, "RS256", headers={"kid": "evil", "x5u": evil.url}),
            jwt.encode(
                claims, attacker, "RS256", headers={"kid": "k1", "jwk": rsa_jwk(attacker, "k1")}
            ),
        ]
        async with aiohttp.ClientSession() as client:
            for token in tokens:
                async with client.get(
                    f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    assert r.status == 401
        assert evil.fetches == 0
    finally:
        await evil.stop()
