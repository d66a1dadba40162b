"""JSON Web Tokens: verification for the proxy, minting and checking for the library.

`TokenVerifier` checks a bearer token against the configured issuers: the issuer is chosen
by `iss`, the algorithm must be on that issuer's allow-list (`none` never is, and an HMAC
algorithm is never checked against a public key), `exp` and the other required claims must
be present, and `iss`, `aud`, `exp`, `nbf` are checked with the issuer's leeway.

`JWTService` is the seed's API: `create_access_token`, `create_service_token`,
`verify_token`.
"""

from __future__ import annotations

import base64
import hmac
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sidecar.auth.identity import Identity
from sidecar.auth.jwks import KeySet
from sidecar.config import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, IssuerConfig
from sidecar.errors import ConfigError, Unauthenticated

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/at+jwt"})


def load_public_key(path: Path) -> PublicKey:
    """A PEM public key (or the key of a PEM certificate) from a file."""
    data = path.read_bytes()
    try:
        if b"BEGIN CERTIFICATE" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key or certificate ({exc})") from None
    if not isinstance(key, PublicKey):
        raise ConfigError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _key_fits(alg: str, key: Any) -> bool:
    if alg in HMAC_ALGORITHMS:
        return isinstance(key, bytes)
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def claim_list(value: Any) -> tuple[str, ...]:
    """A claim holding a list of names, or one string of names split on spaces/commas."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if isinstance(v, str | int) and str(v))
    return ()


def _header_safe(value: str) -> bool:
    return bool(value) and all(32 <= ord(ch) != 127 for ch in value) and "," not in value


def decode_checked(
    token: str,
    key: Any,
    *,
    algorithm: str,
    audiences: list[str] | None,
    issuer: str | None,
    leeway: float,
    required: Sequence[str],
    verify_exp: bool = True,
) -> dict[str, Any]:
    """Verify signature and claims; map every PyJWT failure to a precise Unauthenticated."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audiences,
            issuer=issuer,
            leeway=leeway,
            options={
                "require": list(required),
                "verify_aud": audiences is not None,
                "verify_iss": issuer is not None,
                "verify_exp": verify_exp,
            },
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token_expired", "token expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthenticated("token_not_yet_valid", "token not yet valid") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated("wrong_audience", "wrong audience") from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated("wrong_issuer", "wrong issuer") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("bad_signature", "bad signature") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthenticated("missing_claim", f"missing claim {exc.claim}") from None
    except jwt.PyJWTError:
        raise Unauthenticated("invalid_token", "invalid token") from None
    return claims


class UnknownKey(Unauthenticated):
    """The token names a key its issuer's key set does not hold (yet)."""

    def __init__(self, keyset: KeySet, kid: str | None) -> None:
        super().__init__("unknown_key", "unknown signing key")
        self.keyset = keyset
        self.kid = kid


class _Issuer:
    __slots__ = ("algorithms", "audiences", "config", "key", "keyset", "name", "secrets")

    def __init__(self, config: IssuerConfig, keyset: KeySet | None) -> None:
        self.config = config
        self.name = config.issuer
        self.algorithms = frozenset(config.algorithms)
        self.audiences = list(config.audiences) or None
        self.keyset = keyset
        self.key: bytes | PublicKey | None = None
        # HMAC secrets from the secrets provider: (secret, valid until), newest first
        self.secrets: list[tuple[bytes, float]] = []
        if keyset is not None or config.secret_path is not None:
            return
        key: bytes | PublicKey
        if config.secret is not None:
            key = config.secret
        else:
            assert config.public_key_file is not None
            key = load_public_key(config.public_key_file)
        for alg in config.algorithms:
            if not _key_fits(alg, key):
                raise ConfigError(
                    f"auth.jwt issuer {config.issuer or '(any)'}: algorithm {alg} does not fit "
                    f"its key ({type(key).__name__})"
                )
        self.key = key

    def set_secret(self, secret: bytes) -> None:
        """A new HMAC secret; the previous one keeps verifying for the grace period."""
        now = time.time()
        if self.secrets and hmac.compare_digest(self.secrets[0][0], secret):
            return
        kept = [(k, until) for k, until in self.secrets if until > now]
        if kept:
            kept[0] = (kept[0][0], min(kept[0][1], now + self.config.secret_grace))
        self.secrets = [(secret, float("inf")), *kept]

    def keys_for(self, header: Mapping[str, Any], alg: str) -> list[tuple[Any, float]]:
        """The keys to try, each with how long a verification by it may be trusted."""
        if self.config.secret_path is not None:
            now = time.time()
            keys = [(k, until) for k, until in self.secrets if until > now]
            if not keys:
                raise Unauthenticated("key_not_loaded", "signing key not loaded yet")
            return keys
        return [(self.key_for(header, alg), float("inf"))]

    def key_for(self, header: Mapping[str, Any], alg: str) -> Any:
        """The key to check this token with; raises UnknownKey for a kid not (yet) known."""
        if self.keyset is None:
            return self.key
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        found = self.keyset.key_for(kid)
        if found is None:
            raise UnknownKey(self.keyset, kid)
        if not found.fits(alg):
            raise Unauthenticated("algorithm_not_allowed", "token algorithm does not fit its key")
        return found.key


class TokenVerifier:
    """Verifies bearer tokens against the configured issuers and maps claims to an Identity.

    Verified tokens are cached (bounded, least recently used first out); an entry is keyed
    by the whole token, so a token differing in one byte is verified afresh, and it is
    never used past the token's `exp`.
    """

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        keysets: Mapping[str, KeySet] | None = None,
        *,
        cache_size: int = 10_000,
    ) -> None:
        keysets = keysets or {}
        self._issuers = {cfg.issuer: _Issuer(cfg, keysets.get(cfg.issuer or "")) for cfg in issuers}
        self._any = self._issuers.get(None)
        self._algorithms = frozenset(a for i in self._issuers.values() for a in i.algorithms)
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def configured(self) -> bool:
        """True when at least one issuer is configured."""
        return bool(self._issuers)

    def forget(self) -> None:
        """Drop every cached verification (a key was removed from a key set)."""
        self._cache.clear()

    def set_secret(self, issuer: str, secret: bytes) -> None:
        """Install a new HMAC secret for an issuer whose secret comes from the provider.

        Cached verifications are dropped, so a token verified by the old secret is checked
        again and trusted only until the old secret's grace period ends.
        """
        self._issuers[issuer].set_secret(secret)
        self.forget()

    def verify(self, token: str) -> Identity:
        """The Identity a valid token carries; raises Unauthenticated with a precise reason."""
        cached = self._cache.get(token)
        if cached is not None:
            if cached[0] > time.time():
                self._cache.move_to_end(token)
                return cached[1]
            del self._cache[token]
        identity, exp = self._verify(token)
        cache = self._cache
        cache[token] = (exp, identity)  # exp already bounded by the key's own validity
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return identity

    def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed_token", "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthenticated("algorithm_not_allowed", "token algorithm not allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            raise Unauthenticated("bad_token_type", "token type not accepted")
        issuer = self._pick_issuer(token)
        if alg not in issuer.algorithms:
            raise Unauthenticated("algorithm_not_allowed", "token algorithm not allowed")
        cfg = issuer.config
        claims, trusted_until = self._decode_first(token, issuer, issuer.keys_for(header, alg), alg)
        exp = claims.get("exp")
        until = min(float(exp) if isinstance(exp, int | float) else 0.0, trusted_until)
        return self._identity(claims, cfg), until

    @staticmethod
    def _decode_first(
        token: str, issuer: _Issuer, keys: list[tuple[Any, float]], alg: str
    ) -> tuple[dict[str, Any], float]:
        """Claims from the first key whose signature matches (newest secret first)."""
        cfg = issuer.config
        for i, (key, trusted_until) in enumerate(keys):
            try:
                claims = decode_checked(
                    token,
                    key,
                    algorithm=alg,
                    audiences=issuer.audiences,
                    issuer=issuer.name,
                    leeway=cfg.leeway,
                    required=cfg.required_claims,
                )
            except Unauthenticated as exc:
                if exc.reason != "bad_signature" or i == len(keys) - 1:
                    raise
                continue
            return claims, trusted_until
        raise Unauthenticated("key_not_loaded", "signing key not loaded yet")

    def _pick_issuer(self, token: str) -> _Issuer:
        if self._any is not None:
            return self._any
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("malformed_token", "malformed token") from None
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthenticated("wrong_issuer", "wrong issuer")
        return issuer

    @staticmethod
    def _identity(claims: Mapping[str, Any], cfg: IssuerConfig) -> Identity:
        m = cfg.claims
        subject = claims.get(m.subject)
        if isinstance(subject, int) and not isinstance(subject, bool):
            subject = str(subject)
        if not isinstance(subject, str) or not _header_safe(subject):
            raise Unauthenticated("invalid_claim", "token has no usable subject")
        tenant = claims.get(m.tenant)
        if tenant is not None:
            tenant = str(tenant)
            if not _header_safe(tenant):
                raise Unauthenticated("invalid_claim", "token has an unusable tenant")
        roles = tuple(r for r in claim_list(claims.get(m.roles)) if _header_safe(r))
        permissions = frozenset(claim_list(claims.get(m.permissions)))
        amr = claims.get(m.mfa)
        mfa = amr is True or any(v in cfg.mfa_values for v in claim_list(amr))
        service = claims.get("token_type") == "service"
        return Identity(
            subject=subject,
            method="jwt",
            tenant=tenant,
            roles=roles,
            permissions=permissions,
            mfa=mfa,
            service=service,
        )


def _default_expiry_minutes() -> float:
    raw = os.environ.get("DOTMAC_JWT_ACCESS_TOKEN_EXPIRE_MINUTES", "15")
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(
            f"DOTMAC_JWT_ACCESS_TOKEN_EXPIRE_MINUTES: expected a number of minutes, got {raw!r}"
        ) from None


class JWTService:
    """Mint and verify tokens (the seed's API).

    HS*: `JWTService(secret_key="...", algorithm="HS256")`.
    RS*/ES*/EdDSA: `JWTService(algorithm="RS256", private_key=PEM, public_key=PEM)`; with only
    a public key it can verify but not mint.
    """

    def __init__(
        self,
        secret_key: str | bytes | None = None,
        algorithm: str = "HS256",
        *,
        private_key: str | bytes | None = None,
        public_key: str | bytes | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        access_token_expire_minutes: float | None = None,
        leeway: float = 0.0,
        required_claims: Sequence[str] = ("exp", "sub"),
    ) -> None:
        if algorithm.lower() == "none" or algorithm not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required_claims = tuple(required_claims)
        self.expire_minutes = (
            access_token_expire_minutes
            if access_token_expire_minutes is not None
            else _default_expiry_minutes()
        )
        self._signing: Any
        self._verifying: Any
        if algorithm in HMAC_ALGORITHMS:
            if not secret_key:
                raise ValueError(f"{algorithm} needs secret_key")
            key = secret_key.encode() if isinstance(secret_key, str) else secret_key
            self._signing = self._verifying = key
        else:
            if secret_key is not None:
                raise ValueError(f"{algorithm} takes private_key/public_key, not secret_key")
            self._signing = (
                serialization.load_pem_private_key(_pem(private_key), password=None)
                if private_key is not None
                else None
            )
            if public_key is not None:
                self._verifying = serialization.load_pem_public_key(_pem(public_key))
            elif self._signing is not None:
                self._verifying = self._signing.public_key()
            else:
                raise ValueError(f"{algorithm} needs private_key or public_key")

    def _encode(self, claims: dict[str, Any], expires: timedelta | float | None) -> str:
        if self._signing is None:
            raise ValueError("this JWTService has no private key and cannot mint tokens")
        now = int(time.time())
        if expires is None:
            seconds = self.expire_minutes * 60
        elif isinstance(expires, timedelta):
            seconds = expires.total_seconds()
        else:
            seconds = float(expires)
        payload: dict[str, Any] = {"iat": now, "nbf": now, "exp": now + int(seconds)}
        payload["jti"] = uuid.uuid4().hex
        if self.issuer:
            payload["iss"] = self.issuer
        if self.audience:
            payload["aud"] = self.audience
        payload.update(claims)
        return jwt.encode(payload, self._signing, algorithm=self.algorithm, headers={"typ": "JWT"})

    def create_access_token(
        self,
        subject: str,
        permissions: Iterable[str] | None = None,
        *,
        roles: Iterable[str] | None = None,
        tenant_id: str | None = None,
        expires_delta: timedelta | float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed access token for `subject`; expiry in seconds or a timedelta."""
        claims: dict[str, Any] = {"sub": subject, "token_type": "access"}
        if permissions is not None:
            claims["permissions"] = list(permissions)
        if roles is not None:
            claims["roles"] = list(roles)
        if tenant_id is not None:
            claims["tenant_id"] = tenant_id
        if extra_claims:
            claims.update(extra_claims)
        return self._encode(claims, expires_delta)

    def create_service_token(
        self,
        service: str,
        audience: str,
        permissions: Iterable[str] | None = None,
        expires_delta: timedelta | float | None = None,
    ) -> str:
        """A token for service-to-service calls; its identity is marked as a service."""
        claims: dict[str, Any] = {"sub": service, "aud": audience, "token_type": "service"}
        if permissions is not None:
            claims["permissions"] = list(permissions)
        return self._encode(claims, expires_delta)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], algorithm: str, **options: Any) -> JWTService:
        """A service whose key is a JWK (RFC 7517): `oct` for HS*, else a public or
        private RSA, EC or OKP key."""
        if jwk.get("kty") == "oct":
            secret = base64.urlsafe_b64decode(str(jwk["k"]) + "=" * (-len(str(jwk["k"])) % 4))
            return cls(secret_key=secret, algorithm=algorithm, **options)
        return cls._with_key(jwt.PyJWK(dict(jwk), algorithm).key, algorithm, **options)

    @classmethod
    def _with_key(cls, key: Any, algorithm: str, **options: Any) -> JWTService:
        private = hasattr(key, "sign")
        pem = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if private
            else key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if private:
            return cls(algorithm=algorithm, private_key=pem, **options)
        return cls(algorithm=algorithm, public_key=pem, **options)

    def verify_token(
        self, token: str, audience: str | None = None, *, verify_exp: bool = True
    ) -> dict[str, Any]:
        """The claims of a valid token; raises Unauthenticated with a precise reason.

        `verify_exp=False` skips only the expiry check (for known test vectors).
        """
        aud = audience or self.audience
        return decode_checked(
            token,
            self._verifying,
            algorithm=self.algorithm,
            audiences=[aud] if aud else None,
            issuer=self.issuer,
            leeway=self.leeway,
            required=self.required_claims,
            verify_exp=verify_exp,
        )

    def verify_signature(self, token: str) -> bytes:
        """The payload of a compact JWS whose signature verifies (any payload, not only
        JWT claims); raises Unauthenticated otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed_token", "malformed token") from None
        if header.get("alg") != self.algorithm:
            raise Unauthenticated("algorithm_not_allowed", "token algorithm not allowed")
        try:
            payload: bytes = jwt.api_jws.decode(token, self._verifying, algorithms=[self.algorithm])
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad_signature", "bad signature") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid_token", "invalid token") from None
        return payload


def _pem(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value
