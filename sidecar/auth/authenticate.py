"""Find the caller's credential on a request and turn it into an Identity.

Each credential kind answers in three ways (Oathkeeper's model): an Identity, "not my kind
of credential" (absent), or Unauthenticated (present but bad). A bad credential is never
passed over in favour of another one, and two credentials at once are refused as ambiguous.

Kinds: `jwt` (Authorization: Bearer, optionally a cookie or a query parameter) and
`api_key` (the API-key header, or Authorization: Bearer dmk_...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from multidict import CIMultiDictProxy, MultiMapping

from sidecar.auth.apikeys import KeyStore, parse_key
from sidecar.auth.identity import Identity
from sidecar.auth.jwt import TokenVerifier, UnknownKey
from sidecar.errors import BadRequest, Unauthenticated


class Request(Protocol):
    """What authentication reads of a request: aiohttp's BaseRequest, and the proxy fast
    lane's FastRequest, both have it."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def query_string(self) -> str: ...
    @property
    def query(self) -> MultiMapping[str]: ...


class Authenticator:
    """Authenticates requests with the credential kinds that are configured."""

    def __init__(
        self,
        verifier: TokenVerifier,
        keys: KeyStore | None = None,
        *,
        api_key_header: str = "X-API-Key",
        cookies: tuple[str, ...] = (),
        query_params: tuple[str, ...] = (),
        on_unknown_kid: Callable[[str], None] = lambda issuer: None,
    ) -> None:
        self.verifier = verifier
        self.keys = keys
        self.api_key_header = api_key_header
        self.cookies = cookies
        self.query_params = query_params
        self.on_unknown_kid = on_unknown_kid
        kinds = set()
        if verifier.configured:
            kinds.add("jwt")
        if keys is not None:
            kinds.add("api_key")
        self.kinds = frozenset(kinds)

    def credentials(self, request: Request, kinds: frozenset[str]) -> list[tuple[str, str]]:
        """Every credential of the accepted kinds on the request, as (kind, value)."""
        headers = request.headers
        found: list[tuple[str, str]] = []
        authorization = headers.getall("Authorization", ())
        if len(authorization) > 1:
            raise BadRequest("multiple_credentials", "more than one Authorization header")
        for value in authorization:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                continue
            token = token.strip()
            kind = "api_key" if token.startswith("dmk_") else "jwt"
            if kind in kinds:
                found.append((kind, token))
        if "api_key" in kinds:
            found.extend(("api_key", v.strip()) for v in headers.getall(self.api_key_header, ()))
        if "jwt" in kinds:
            if self.cookies and "Cookie" in headers:
                cookies = request.cookies
                found.extend(("jwt", cookies[n]) for n in self.cookies if n in cookies)
            if self.query_params and request.query_string:
                query = request.query
                for name in self.query_params:
                    found.extend(("jwt", v) for v in query.getall(name, ()))
        if len(found) > 1:
            raise BadRequest("multiple_credentials", "more than one credential on the request")
        return found

    async def authenticate(self, request: Request, accepted: frozenset[str] | None) -> Identity:
        """The Identity behind the one credential of an accepted kind on this request."""
        kinds = self.kinds if accepted is None else self.kinds & accepted
        found = self.credentials(request, kinds)
        if not found:
            raise Unauthenticated("missing_credential", "credential required", invalid=False)
        kind, value = found[0]
        try:
            if kind == "api_key":
                return await self._api_key(value)
            if value and "," not in value and " " not in value:
                try:
                    return self.verifier.verify(value)  # cached or known key: no coroutine
                except UnknownKey:
                    pass
            return await self._jwt(value)
        except Unauthenticated as exc:
            exc.method = kind
            raise

    async def _jwt(self, token: str) -> Identity:
        if not token or "," in token or " " in token:
            raise Unauthenticated("malformed_token", "malformed token")
        try:
            return self.verifier.verify(token)
        except UnknownKey as exc:
            self.on_unknown_kid(exc.keyset.issuer)
            if await exc.keyset.refetch_for(exc.kid):
                return self.verifier.verify(token)
            raise Unauthenticated("unknown_key", "unknown signing key") from None

    async def _api_key(self, value: str) -> Identity:
        parsed = parse_key(value)
        if parsed is None:
            raise Unauthenticated("malformed_api_key", "malformed API key")
        key_id, secret = parsed
        assert self.keys is not None
        record = await self.keys.lookup(key_id)
        if record is None:
            raise Unauthenticated("unknown_api_key", "unknown API key")
        now = time.time()
        if not record.accepts(secret, now):
            state = record.state(now)
            if state == "revoked":
                raise Unauthenticated("api_key_revoked", "API key revoked")
            if state == "expired":
                raise Unauthenticated("api_key_expired", "API key expired")
            raise Unauthenticated("bad_api_key", "invalid API key")
        return record.identity()
