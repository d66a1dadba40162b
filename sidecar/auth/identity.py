"""Identity: what the sidecar knows about an authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller, as read from its credential.

    `roles` and `permissions` are what the credential says; the policy adds what the roles
    inherit and grant. `method` is how the caller authenticated: jwt, api_key, session.
    """

    subject: str
    method: str
    tenant: str | None = None
    roles: tuple[str, ...] = ()
    permissions: frozenset[str] = frozenset()
    mfa: bool = False
    service: bool = False
