"""Find the caller's credential on a request and turn it into an Identity.

Each credential kind answers in three ways (Oathkeeper's model): an Identity, "not my kind
of credential" (absent), or Unauthenticated (present but bad). A bad credential is never
passed over in favour of another one, and two credentials at once are refused as ambiguous.
"""

from __future__ import annotations

from multidict import CIMultiDictProxy

from sidecar.auth.identity import Identity
from sidecar.auth.jwt import TokenVerifier
from sidecar.errors import BadRequest, Unauthenticated


class Authenticator:
    """Authenticates requests with the credential kinds that are configured."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier
        self.kinds = frozenset({"jwt"}) if verifier.configured else frozenset()

    def authenticate(
        self, headers: CIMultiDictProxy[str], accepted: frozenset[str] | None
    ) -> Identity:
        """The Identity behind the one credential of an accepted kind on this request."""
        kinds = self.kinds if accepted is None else self.kinds & accepted
        tokens: list[str] = []
        if "jwt" in kinds:
            authorization = headers.getall("Authorization", ())
            if len(authorization) > 1:
                raise BadRequest("multiple_credentials", "more than one Authorization header")
            for value in authorization:
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    tokens.append(token.strip())
        if not tokens:
            raise Unauthenticated("missing_credential", "credential required", invalid=False)
        token = tokens[0]
        if not token or "," in token or " " in token:
            raise Unauthenticated("malformed_token", "malformed token")
        return self.verifier.verify(token)
