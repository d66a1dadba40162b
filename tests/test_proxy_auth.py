"""End to end over real sockets: tokens in, decisions out, exactly the right headers to the app."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import jwt
import pytest
from multidict import CIMultiDict

from sidecar.errors import Rejected
from sidecar.proxy.upstream import request_head
from tests.conftest import (
    EC_ISSUER,
    HS_ISSUER,
    HS_SECRET,
    Keys,
    Running,
    SidecarFactory,
    Upstream,
    make_token,
)

pytestmark = pytest.mark.asyncio

IDENTITY = {"x-auth-subject", "x-auth-tenant", "x-auth-roles", "x-auth-method", "x-auth-rule"}


def _headers_seen(body: dict[str, object]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in body["headers"]]  # type: ignore[union-attr]


async def test_allowed_request_gets_exactly_the_identity_headers(
    proxy: Running, upstream: Upstream, client: aiohttp.ClientSession, keys: Keys
) -> None:
    token = make_token(keys, roles=["support"], tenant_id="t1", sub="alice")
    spoofed = [
        ("Authorization", f"Bearer {token}"),
        ("X-Auth-Subject", "mallory"),
        ("x-auth-subject", "mallory2"),
        ("X_Auth_Subject", "mallory3"),
        ("X-AUTH-ROLES", "admin"),
        ("X-Auth-Whatever", "spoof"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Original-URL", "/admin"),
        # a client naming the identity headers in Connection must not remove the sidecar's
        ("Connection", "keep-alive, X-Auth-Subject, X-Auth-Rule, X-Request-ID, traceparent"),
    ]
    async with client.get(f"{proxy.url}/api/users", headers=spoofed) as resp:
        assert resp.status == 200
        body = await resp.json()
    seen = _headers_seen(body)
    identity = [
        (k.lower(), v) for k, v in seen if k.lower().replace("_", "-").startswith("x-auth-")
    ]
    assert sorted(identity) == sorted(
        [
            ("x-auth-subject", "alice"),
            ("x-auth-tenant", "t1"),
            ("x-auth-roles", "support"),
            ("x-auth-method", "jwt"),
            ("x-auth-rule", "list-users"),
        ]
    )
    names = [k.lower() for k, _ in seen]
    assert names.count("x-auth-subject") == 1
    assert "x_auth_subject" not in names
    assert "forwarded" not in names
    assert "x-http-method-override" not in names
    assert "x-original-url" not in names
    assert dict((k.lower(), v) for k, v in seen)["x-forwarded-for"] == "127.0.0.1"
    assert "x-request-id" in names and "traceparent" in names
    assert body["method"] == "GET"


async def test_hmac_and_ec_issuers_and_public_rule(
    proxy: Running, client: aiohttp.ClientSession, keys: Keys
) -> None:
    hs = make_token(keys, "HS256", iss=HS_ISSUER, aud=None, roles=["support"])
    es = make_token(keys, "ES256", iss=EC_ISSUER, roles=["support"])
    for token in (hs, es):
        headers = {"Authorization": f"bearer {token}"}  # the scheme is case-insensitive
        async with client.get(f"{proxy.url}/api/users", headers=headers) as r:
            assert r.status == 200
    # an ES256 token presented as the RSA issuer's is refused
    cross = make_token(keys, "ES256", roles=["support"])
    async with client.get(
        f"{proxy.url}/api/users", headers={"Authorization": f"Bearer {cross}"}
    ) as r:
        assert r.status == 401
    async with client.get(f"{proxy.url}/public/x", headers={"X-Auth-Subject": "eve"}) as r:
        assert r.status == 200
        seen = dict((k.lower(), v) for k, v in _headers_seen(await r.json()))
    assert seen["x-auth-method"] == "public"
    assert seen["x-auth-rule"] == "public"
    assert "x-auth-subject" not in seen and "x-auth-roles" not in seen


def _forge_hs256_with_public_key(keys: Keys) -> str:
    """The classic key-confusion attack: HS256 'signed' with the RSA public key bytes."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(
        json.dumps(
            {
                "iss": "https://issuer.test",
                "aud": "orders",
                "sub": "u1",
                "exp": now + 300,
                "roles": ["admin"],
            }
        ).encode()
    )
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(keys.rsa_public_pem, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def _alg_none(keys: Keys) -> str:
    return jwt.encode(
        {
            "iss": "https://issuer.test",
            "aud": "orders",
            "sub": "u1",
            "exp": int(time.time()) + 300,
            "roles": ["admin"],
        },
        None,
        algorithm="none",
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "token_expired"),
        ("not_yet_valid", "token_not_yet_valid"),
        ("wrong_issuer", "wrong_issuer"),
        ("wrong_audience", "wrong_audience"),
        ("alg_none", "algorithm_not_allowed"),
        ("hs256_with_public_key", "algorithm_not_allowed"),
        ("bad_signature", "bad_signature"),
        ("no_exp", "missing_claim"),
        ("garbage", "malformed_token"),
        ("comma_joined", "malformed_token"),
    ],
)
async def test_bad_tokens_get_401_with_the_contract_body(
    proxy: Running,
    upstream: Upstream,
    client: aiohttp.ClientSession,
    keys: Keys,
    case: str,
    reason: str,
) -> None:
    now = int(time.time())
    good = make_token(keys, roles=["admin"])
    tokens = {
        "expired": make_token(keys, roles=["admin"], exp=now - 120, iat=now - 600, nbf=now - 600),
        "not_yet_valid": make_token(keys, roles=["admin"], nbf=now + 600, iat=now),
        "wrong_issuer": make_token(keys, roles=["admin"], iss="https://evil.test"),
        "wrong_audience": make_token(keys, roles=["admin"], aud="billing"),
        "alg_none": _alg_none(keys),
        "hs256_with_public_key": _forge_hs256_with_public_key(keys),
        "bad_signature": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "no_exp": make_token(keys, roles=["admin"], exp=None),
        "garbage": "not.a.token",
        "comma_joined": f"{good}, {good}",
    }
    async with client.get(
        f"{proxy.url}/admin/x", headers={"Authorization": f"Bearer {tokens[case]}"}
    ) as resp:
        assert resp.status == 401
        assert resp.headers["Content-Type"].startswith("application/json")
        challenge = resp.headers["WWW-Authenticate"]
        body = await resp.json()
    assert challenge.startswith('Bearer realm="dotmac", error="invalid_token"')
    assert body["error"] == "unauthenticated"
    assert body["reason"] == reason
    assert body["request_id"]
    assert tokens[case] not in json.dumps(body) and tokens[case] not in challenge
    assert upstream.seen == []


async def test_missing_credential_is_a_plain_challenge(
    proxy: Running, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/api/users") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="dotmac"'
        assert (await resp.json())["reason"] == "missing_credential"
    assert upstream.seen == []


async def test_forbidden_and_unmatched(
    proxy: Running, upstream: Upstream, client: aiohttp.ClientSession, keys: Keys
) -> None:
    user = {"Authorization": f"Bearer {make_token(keys, roles=['user'])}"}
    async with client.get(f"{proxy.url}/api/users", headers=user) as resp:
        assert resp.status == 403
        body = await resp.json()
        assert body == {
            "error": "forbidden",
            "message": "not allowed by policy",
            "reason": "missing_permission",
            "request_id": body["request_id"],
        }
    for anonymous in (True, False):
        async with client.get(f"{proxy.url}/nowhere", headers={} if anonymous else user) as resp:
            assert resp.status == 403
            assert (await resp.json())["reason"] == "no_matching_rule"
    admin = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with client.get(f"{proxy.url}/internal/x", headers=admin) as resp:
        assert resp.status == 403
        assert (await resp.json())["reason"] == "denied_by_rule"
    assert upstream.seen == []


async def test_requirements_subject_tenant_mfa(
    proxy: Running, client: aiohttp.ClientSession, keys: Keys
) -> None:
    def auth(**claims: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(keys, **claims)}"}

    cases = [
        ("/api/users/u1", auth(sub="u1"), 200),  # the caller named in the path
        ("/api/users/u2", auth(sub="u1"), 403),
        ("/api/users/u2", auth(sub="u1", roles=["support"]), 200),  # inherited read:users
        ("/api/tenants/t1/orders/9", auth(roles=["user"], tenant_id="t1", amr=["pwd", "mfa"]), 200),
        ("/api/tenants/t1/orders/9", auth(roles=["user"], tenant_id="t2", amr=["mfa"]), 403),
        ("/api/tenants/t1/orders/9", auth(roles=["user"], tenant_id="t1", amr=["pwd"]), 403),
        ("/api/tenants/t1/orders", auth(roles=["support"], tenant_id="t1", amr=["mfa"]), 200),
        ("/admin/", auth(roles=["admin"]), 200),
        ("/api/export/csv", auth(), 200),  # shadow mode: denied, logged, let through
    ]
    for path, headers, expected in cases:
        async with client.get(f"{proxy.url}{path}", headers=headers) as resp:
            assert resp.status == expected, (path, headers, await resp.text())


async def test_multiple_credentials_are_ambiguous(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    from tests.conftest import raw_exchange, status_of

    token = make_token(keys, roles=["admin"])
    raw = await raw_exchange(
        proxy.sidecar.listen_port,
        (
            f"GET /admin/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(raw) == 400
    assert b"multiple_credentials" in raw
    assert upstream.seen == []


async def test_hmac_secret_never_in_responses(
    proxy: Running, client: aiohttp.ClientSession, keys: Keys
) -> None:
    async with client.get(
        f"{proxy.url}/admin/x", headers={"Authorization": "Bearer " + make_token(keys, "HS256")}
    ) as r:
        text = await r.text()
    assert r.status == 401
    assert HS_SECRET not in text


async def test_strip_authorization_hides_the_credential_from_the_app(
    make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    running: Running = await make_sidecar(
        upstream.url, extra="proxy:\n  strip_authorization: true\n"
    )
    token = make_token(keys, roles=["admin"])
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{running.url}/app/x", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        assert r.status == 200
        body = await r.json()
    names = {k.lower() for k, _ in body["headers"]}
    assert "authorization" not in names
    assert "x-auth-subject" in names
    assert token not in json.dumps(body)


async def test_cookie_and_query_tokens_when_configured(
    make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys, tmp_path: object
) -> None:
    auth = f"""  jwt:
    - issuer: "https://issuer.test"
      audiences: ["orders"]
      algorithms: ["RS256"]
      public_key_file: "{keys.rsa_public_file}"
      cookie: session
      query_param: access_token
"""
    running: Running = await make_sidecar(upstream.url, auth_override=auth)
    token = make_token(keys, roles=["admin"])
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"{running.url}/app/x", headers={"Cookie": f"theme=dark; session={token}"}
        ) as r:
            assert r.status == 200
        async with client.get(f"{running.url}/app/x?access_token={token}") as r:
            assert r.status == 200
        # a token in two places is ambiguous, even when both are good
        async with client.get(
            f"{running.url}/app/x?access_token={token}",
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            assert r.status == 400
            assert (await r.json())["reason"] == "multiple_credentials"
        # a bad cookie is a 401: no falling through to anonymous
        async with client.get(f"{running.url}/app/x", headers={"Cookie": "session=junk"}) as r:
            assert r.status == 401


async def test_token_cli_with_a_private_key_file(keys: Keys, proxy: Running) -> None:
    import subprocess
    import sys

    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "sidecar",
            "token",
            "--key",
            str(keys.rsa_private_file),
            "--sub",
            "cli-user",
            "--roles",
            "support",
            "--issuer",
            "https://issuer.test",
            "--audience",
            "orders",
            "--ttl",
            "2m",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{proxy.url}/api/users", headers={"Authorization": f"Bearer {out.stdout.strip()}"}
        ) as r,
    ):
        assert r.status == 200


@pytest.mark.parametrize("sub", ["alice\r\nX-Evil: 1", "alice\nX-Evil: 1", "ali\rce", "ali\x00ce"])
async def test_a_subject_with_a_control_character_is_refused(
    proxy: Running, upstream: Upstream, client: aiohttp.ClientSession, keys: Keys, sub: str
) -> None:
    token = make_token(keys, roles=["support"], sub=sub)
    async with client.get(
        f"{proxy.url}/api/users", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert "X-Evil" not in json.dumps(body)
    assert upstream.seen == []


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b"])
async def test_the_upstream_head_never_carries_a_control_character(value: str) -> None:
    # behind the claim checks, the writer of the app's request head refuses them too
    ok = request_head("GET", "/x", CIMultiDict([("X-Auth-Subject", "alice")]), "app:80", False)
    assert ok == b"GET /x HTTP/1.1\r\nHost: app:80\r\nX-Auth-Subject: alice\r\n\r\n"
    with pytest.raises(Rejected) as err:
        request_head("GET", "/x", CIMultiDict([("X-Auth-Subject", value)]), "app:80", False)
    assert err.value.status == 400 and err.value.reason == "bad_header_value"
    assert "X-Auth-Subject" in err.value.message
