"""JWKS key sets: fetched with aiohttp, cached, refetched on an unknown key id.

Rules (contract sections 2 and 9 "JWKS"):
- scheduled refresh every `jwks_refresh`, or per `Cache-Control: max-age` clamped to
  1 minute .. 24 hours;
- a token whose `kid` is unknown triggers one refetch, single-flight, at most once per
  30 s per issuer, counting every fetch (scheduled ones too);
- a first fetch that fails is retried with backoff from 1 s to 30 s; until one succeeds
  the issuer is not ready;
- a fetch that fails (HTTP error, not JSON, empty, over 1 MiB, slower than 5 s) keeps the
  last good keys in use;
- only the configured URL is ever fetched: `jku`, `x5u` and `jwk` token headers are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import jwt

from sidecar.observability import logging as logs

MAX_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0
MIN_REFETCH_INTERVAL = 30.0
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


class JwksError(Exception):
    """A key set could not be fetched or used; the message is safe to log."""


class SigningKey:
    """One verification key from a key set: the key object, its type, its declared alg."""

    __slots__ = ("alg", "key", "kty")

    def __init__(self, key: Any, kty: str, alg: str | None) -> None:
        self.key = key
        self.kty = kty
        self.alg = alg

    def fits(self, alg: str) -> bool:
        """True when this key may verify a token signed with `alg`."""
        if self.alg is not None:
            return self.alg == alg
        if alg.startswith(("RS", "PS")):
            return self.kty == "RSA"
        if alg.startswith("ES"):
            return self.kty == "EC"
        if alg == "EdDSA":
            return self.kty == "OKP"
        return False  # HMAC secrets are never taken from a fetched key set


def parse_jwks(body: bytes) -> dict[str, SigningKey]:
    """kid -> key of a JWKS document; keys without a kid get a positional name.

    Keys for encryption (`use: enc`) and keys PyJWT cannot use are skipped; a set with no
    usable key is an error.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise JwksError("key set is not JSON") from None
    raw = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise JwksError("key set has no `keys` list")
    keys: dict[str, SigningKey] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        if item.get("kty") == "oct":
            continue  # a shared secret published at a URL is no secret
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        kid = item.get("kid")
        alg = item.get("alg")
        keys[kid if isinstance(kid, str) else f"#{i}"] = SigningKey(
            key.key, str(item.get("kty")), alg if isinstance(alg, str) else None
        )
    if not keys:
        raise JwksError("key set has no usable signing key")
    return keys


class KeySet:
    """The signing keys of one issuer, kept fresh from its JWKS URL."""

    def __init__(
        self,
        issuer: str,
        url: str,
        *,
        refresh: float,
        on_fetch: Callable[[str], None] = lambda result: None,
        on_keys_removed: Callable[[], None] = lambda: None,
        min_refetch_interval: float = MIN_REFETCH_INTERVAL,
    ) -> None:
        self.issuer = issuer
        self.url = url
        self.refresh = refresh
        self.on_fetch = on_fetch
        self.on_keys_removed = on_keys_removed
        self.min_refetch_interval = min_refetch_interval
        self.keys: Mapping[str, SigningKey] = {}
        self.ready = False
        self.last_error = "not fetched yet"
        self.fetches = 0
        self._last_fetch_at = float("-inf")
        self._max_age: float | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._session: aiohttp.ClientSession | None = None

    def key_for(self, kid: str | None) -> SigningKey | None:
        """The key named by `kid`; without a kid, the only key if there is exactly one."""
        keys = self.keys
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Fetch now, retry with backoff until ready, then refresh on schedule. Until cancelled."""
        self._session = session
        backoff = 1.0
        while True:
            ok = await self.fetch()
            if not self.ready:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if ok and self._max_age is not None:
                wait = min(max(self._max_age, 60.0), 86400.0)
            else:
                wait = self.refresh
            await asyncio.sleep(wait)

    async def refetch_for(self, kid: str | None) -> bool:
        """After an unknown kid: one refetch, shared by every caller, at most once per 30 s.

        Returns True when the kid is known afterwards.
        """
        if self.key_for(kid) is not None:
            return True
        if self._inflight is None and (
            time.monotonic() - self._last_fetch_at < self.min_refetch_interval
        ):
            return False
        await self.fetch()
        return self.key_for(kid) is not None

    async def fetch(self) -> bool:
        """Fetch the key set, joining a fetch already under way (single-flight)."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        self._inflight = asyncio.ensure_future(self._fetch_once())
        try:
            return await asyncio.shield(self._inflight)
        finally:
            self._inflight = None

    async def _fetch_once(self) -> bool:
        self._last_fetch_at = time.monotonic()
        self.fetches += 1
        session = self._session
        if session is None:
            raise RuntimeError("KeySet.run() was not started")
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                async with session.get(
                    self.url, allow_redirects=False, headers={"Accept": "application/json"}
                ) as resp:
                    if resp.status != 200:
                        raise JwksError(f"HTTP {resp.status}")
                    body = await resp.content.read(MAX_BYTES + 1)
                    if len(body) > MAX_BYTES:
                        raise JwksError("key set is over 1 MiB")
                    cache_control = resp.headers.get("Cache-Control", "")
            keys = parse_jwks(body)
        except (JwksError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            message = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                message = "no answer within 5 s"
            self.last_error = message
            self.on_fetch("failure")
            logs.event(
                logging.WARNING,
                "jwks_fetch_failed",
                issuer=self.issuer,
                error=message,
                keeping=len(self.keys),
            )
            return False
        match = _MAX_AGE.search(cache_control)
        self._max_age = float(match.group(1)) if match else None
        removed = set(self.keys) - set(keys)
        self.keys = keys  # swapped whole
        self.ready = True
        self.last_error = ""
        self.on_fetch("success")
        if removed:
            self.on_keys_removed()
        return True

    def status(self) -> str:
        """'ok' once fetched; otherwise why not (for /readyz)."""
        if self.ready:
            return "ok"
        return f"not fetched yet: {self.last_error}"
