"""The library API: the seed's JWTService snippet, RFC 7515 / 7520 JWS examples, the
verified-token cache."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from sidecar.auth.jwt import JWTService, TokenVerifier
from sidecar.config import IssuerConfig
from sidecar.errors import Unauthenticated

SEED_SNIPPET = """
from dotmac.platform.auth import AuthService, JWTService, RBACEngine

# JWT token management
jwt_service = JWTService(
    secret_key="your-secret",
    algorithm="HS256"
)

token = jwt_service.create_access_token(
    subject="user123",
    permissions=["read:users", "write:users"]
)

# RBAC permissions
rbac = RBACEngine()
rbac.add_role("admin", ["read:*", "write:*", "delete:*"])
rbac.add_role("user", ["read:own", "write:own"])

has_permission = rbac.check_permission(
    user_roles=["admin"],
    required_permission="write:users"
)
"""


# the seed's example secret is 11 bytes: PyJWT rightly warns, and the snippet still runs
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_seed_quick_start_runs_as_written() -> None:
    seed = Path(__file__).resolve().parents[2] / "shared/seed/dotmac-platform-services-README.md"
    if seed.is_file():  # beside the repository in CI and in a session: the text is the seed's
        assert SEED_SNIPPET.strip() in seed.read_text()
    scope: dict[str, object] = {}
    exec(compile(SEED_SNIPPET, "seed-quick-start", "exec"), scope)
    assert scope["has_permission"] is True
    service = scope["jwt_service"]
    assert isinstance(service, JWTService)
    claims = service.verify_token(str(scope["token"]))
    assert claims["sub"] == "user123"
    assert claims["permissions"] == ["read:users", "write:users"]
    assert 14 * 60 <= claims["exp"] - claims["iat"] <= 15 * 60  # the default 15 minutes

    from dotmac.platform.auth import AuthService

    auth = AuthService(service, scope["rbac"])  # type: ignore[arg-type]
    identity = auth.authenticate(str(scope["token"]))
    assert identity.subject == "user123"
    assert auth.authorize(identity, "write:users")
    assert not auth.authorize(identity, "delete:users")


def test_expiry_default_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOTMAC_JWT_ACCESS_TOKEN_EXPIRE_MINUTES", "5")
    service = JWTService(secret_key="k" * 32)
    claims = service.verify_token(service.create_access_token("u"))
    assert claims["exp"] - claims["iat"] == 300


def test_rs256_key_pair_and_service_tokens(keys: object) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = JWTService._with_key(private, "RS256")
    token = pem.create_service_token("billing", audience="orders", permissions=["read:orders"])
    verifier = JWTService._with_key(private.public_key(), "RS256")
    claims = verifier.verify_token(token, audience="orders")
    assert claims["sub"] == "billing" and claims["token_type"] == "service"
    with pytest.raises(Unauthenticated) as info:
        verifier.verify_token(token, audience="payments")
    assert info.value.reason == "wrong_audience"
    with pytest.raises(ValueError, match="cannot mint"):
        verifier.create_access_token("x")
    with pytest.raises(ValueError, match="unsupported algorithm"):
        JWTService(secret_key="x", algorithm="none")


# RFC 7515 appendix A: JWT claims, exp 1300819380 (2011)
A_PAYLOAD = (
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
)
RFC7515 = [
    (
        "A.1 HS256",
        "HS256",
        {
            "kty": "oct",
            "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow",
        },
        "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9."
        + A_PAYLOAD
        + ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
    ),
    (
        "A.2 RS256",
        "RS256",
        {
            "kty": "RSA",
            "e": "AQAB",
            "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx"
            "HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs"
            "D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH"
            "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV"
            "MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8"
            "NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
        },
        "eyJhbGciOiJSUzI1NiJ9." + A_PAYLOAD + "."
        "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7"
        "AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4"
        "BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K"
        "0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv"
        "hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB"
        "p0igcN_IoypGlUPQGe77Rw",
    ),
    (
        "A.3 ES256",
        "ES256",
        {
            "kty": "EC",
            "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        },
        "eyJhbGciOiJFUzI1NiJ9." + A_PAYLOAD + "."
        "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q",
    ),
]

# RFC 7520 section 4: a text payload ("It's a dangerous business, Frodo, ...")
FRODO = (
    "SXTigJlzIGEgZGFuZ2Vyb3VzIGJ1c2luZXNzLCBGcm9kbywgZ29pbmcgb3V0IHlvdXIgZG9vci4gWW91IHN0ZX"
    "Agb250byB0aGUgcm9hZCwgYW5kIGlmIHlvdSBkb24ndCBrZWVwIHlvdXIgZmVldCwgdGhlcmXigJlzIG5vIGtu"
    "b3dpbmcgd2hlcmUgeW91IG1pZ2h0IGJlIHN3ZXB0IG9mZiB0by4"
)
RFC7520_RSA = {
    "kty": "RSA",
    "e": "AQAB",
    "n": "n4EPtAOCc9AlkeQHPzHStgAbgs7bTZLwUBZdR8_KuKPEHLd4rHVTeT-O-XV2jRojdNhxJWTDvNd7nqQ0VEiZQHz_A"
    "JmSCpMaJMRBSFKrKb2wqVwGU_NsYOYL-QtiWN2lbzcEe6XC0dApr5ydQLrHqkHHig3RBordaZ6Aj-oBHqFEHYpPe"
    "7Tpe-OfVfHd1E6cS6M1FZcD1NNLYD5lFHpPI9bTwJlsde3uhGqC0ZCuEHg8lhzwOHrtIQbS0FVbb9k3-tVTU4fg_"
    "3L_vniUFAKwuCLqKnS2BYwdq_mzSnbLY7h_qixoR7jig3__kRhuaxwUkRz5iaiQkqgc5gHdrNP5zw",
}
RFC7520 = [
    (
        "4.1 RS256",
        "RS256",
        RFC7520_RSA,
        "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZXhhbXBsZSJ9." + FRODO + "."
        "MRjdkly7_-oTPTS3AXP41iQIGKa80A0ZmTuV5MEaHoxnW2e5CZ5NlKtainoFmKZopdHM1O2U4mwzJdQx996ivp83xu"
        "glII7PNDi84wnB-BDkoBwA78185hX-Es4JIwmDLJK3lfWRa-XtL0RnltuYv746iYTh_qHRD68BNt1uSNCrUCTJDt5a"
        "AE6x8wW1Kt9eRo4QPocSadnHXFxnt8Is9UzpERV0ePPQdLuW3IS_de3xyIrDaLGdjluPxUAhb6L2aXic1U12podGU"
        "0KLUQSE_oI-ZnmKJ3F4uOZDnd6QZWJushZ41Axf_fcIe8u9ipH84ogoree7vjbU5y18kDquDg",
    ),
    (
        "4.2 PS384",
        "PS384",
        RFC7520_RSA,
        "eyJhbGciOiJQUzM4NCIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZXhhbXBsZSJ9." + FRODO + "."
        "cu22eBqkYDKgIlTpzDXGvaFfz6WGoz7fUDcfT0kkOy42miAh2qyBzk1xEsnk2IpN6-tPid6VrklHkqsGqDqHCdP6O8"
        "TTB5dDDItllVo6_1OLPpcbUrhiUSMxbbXUvdvWXzg-UD8biiReQFlfz28zGWVsdiNAUf8ZnyPEgVFn442ZdNqiVJRm"
        "BqrYRXe8P_ijQ7p8Vdz0TTrxUeT3lm8d9shnr2lfJT8ImUjvAA2Xez2Mlp8cBE5awDzT0qI0n6uiP1aCN_2_jLAeQT"
        "lqRHtfa64QQSUmFAAjVKPbByi7xho0uTOcbH510a6GYmJUAfmWjwZ6oD4ifKo8DYM-X72Eaw",
    ),
    (
        "4.3 ES512",
        "ES512",
        {
            "kty": "EC",
            "crv": "P-521",
            "x": "AHKZLLOsCOzz5cY97ewNUajB957y-C-U88c3v13nmGZx6sYl_oJXu9A5RkTKqjqvjyekWF-7ytDyRXYgCF5cj0Kt",
            "y": "AdymlHvOiLxXkEhayXQnNCvDX4h9htZaCJN34kfmC6pV5OhQHiraVySsUdaQkAgDPrwQrJmbnX9cwlGfP-HqHZR1",
        },
        "eyJhbGciOiJFUzUxMiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZXhhbXBsZSJ9." + FRODO + "."
        "AE_R_YZCChjn4791jSQCrdPZCNYqHXCTZH0-JZGYNlaAjP2kqaluUIIUnC9qvbu9Plon7KRTzoNEuT4Va2cmL1eJAQy"
        "3mtPBu_u_sDDyYjnAMDxXPn7XrT0lw-kvAD890jl8e2puQens_IEKBpHABlsbEPX6sFY8OcGDqoRuBomu9xQ2",
    ),
    (
        "4.4 HS256",
        "HS256",
        {"kty": "oct", "k": "hJtXIZ2uSN5kbQfbtTNWbpdmhkV8FJG-Onbc6mxCcYg"},
        "eyJhbGciOiJIUzI1NiIsImtpZCI6IjAxOGMwYWU1LTRkOWItNDcxYi1iZmQ2LWVlZjMxNGJjNzAzNyJ9."
        + FRODO
        + ".s0h6KThzkfBBBkLspW1h84VsJZFTsPPqMDA7g1Md7p0",
    ),
]


def _tampered(token: str) -> list[str]:
    header, payload, sig = token.split(".")
    flipped_sig = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    other_payload = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    return [f"{header}.{payload}.{flipped_sig}", f"{header}.{other_payload}.{sig}"]


@pytest.mark.parametrize(("name", "alg", "jwk", "token"), RFC7515, ids=[v[0] for v in RFC7515])
def test_rfc7515_appendix_a(name: str, alg: str, jwk: dict[str, str], token: str) -> None:
    service = JWTService.from_jwk(jwk, alg, required_claims=("exp",))
    claims = service.verify_token(token, verify_exp=False)
    assert claims == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
    with pytest.raises(Unauthenticated) as info:
        service.verify_token(token)  # the expiry check is on by default: 2011 has passed
    assert info.value.reason == "token_expired"
    for bad in _tampered(token):
        with pytest.raises(Unauthenticated):
            service.verify_token(bad, verify_exp=False)


@pytest.mark.parametrize(("name", "alg", "jwk", "token"), RFC7520, ids=[v[0] for v in RFC7520])
def test_rfc7520_section_4(name: str, alg: str, jwk: dict[str, str], token: str) -> None:
    service = JWTService.from_jwk(jwk, alg)
    payload = service.verify_signature(token)
    assert payload.decode().startswith("It\u2019s a dangerous business, Frodo")
    for bad in _tampered(token):
        with pytest.raises(Unauthenticated):
            service.verify_signature(bad)
    other = "HS256" if alg != "HS256" else "RS256"
    with pytest.raises(Unauthenticated, match="algorithm"):
        JWTService.from_jwk(jwk, alg).verify_signature(
            token.replace(
                token.split(".")[0],
                jwt.utils.base64url_encode(f'{{"alg":"{other}"}}'.encode()).decode(),
                1,
            )
        )


def test_cached_verification_never_outlives_exp_and_misses_on_one_byte() -> None:
    secret = b"s" * 32
    cfg = IssuerConfig(
        issuer="i", audiences=(), algorithms=("HS256",), secret_env="X", secret=secret, leeway=0.0
    )
    verifier = TokenVerifier([cfg])
    now = int(time.time())
    token = jwt.encode({"iss": "i", "sub": "u", "exp": now + 2}, secret, algorithm="HS256")
    assert verifier.verify(token).subject == "u"
    assert verifier.verify(token).subject == "u"  # from the cache
    header, payload, sig = token.split(".")
    flipped = f"{header}.{payload}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(flipped)
    assert info.value.reason == "bad_signature"
    time.sleep(max(0.0, now + 2 - time.time()) + 0.1)
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    assert info.value.reason == "token_expired"


def test_cache_is_bounded() -> None:
    secret = b"s" * 32
    cfg = IssuerConfig(
        issuer="i", audiences=(), algorithms=("HS256",), secret_env="X", secret=secret
    )
    verifier = TokenVerifier([cfg], cache_size=50)
    exp = int(time.time()) + 300
    for n in range(200):
        verifier.verify(jwt.encode({"iss": "i", "sub": f"u{n}", "exp": exp}, secret, "HS256"))
    assert len(verifier._cache) == 50


@pytest.mark.parametrize(
    "alg",
    ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"],
)
def test_every_allowed_algorithm_verifies_and_others_do_not(alg: str, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    signing: object
    if alg.startswith("HS"):
        signing = b"k" * 64
        cfg = IssuerConfig(
            issuer="i", audiences=(), algorithms=(alg,), secret_env="X", secret=signing
        )
    else:
        if alg.startswith(("RS", "PS")):
            private: object = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES384":
            private = ec.generate_private_key(ec.SECP384R1())
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        pem = private.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (tmp_path / "k.pem").write_bytes(pem)
        signing = private
        cfg = IssuerConfig(
            issuer="i", audiences=(), algorithms=(alg,), public_key_file=tmp_path / "k.pem"
        )
    verifier = TokenVerifier([cfg])
    claims = {"iss": "i", "sub": "u", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, signing, algorithm=alg)  # type: ignore[arg-type]
    assert verifier.verify(token).subject == "u"
    other = "HS256" if not alg.startswith("HS") else "HS512" if alg != "HS512" else "HS384"
    forged = jwt.encode(claims, b"k" * 64, algorithm=other)
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(forged)
    assert info.value.reason == "algorithm_not_allowed"
