"""AuthService: token verification and RBAC together, for apps that use the library."""

from __future__ import annotations

from sidecar.auth.identity import Identity
from sidecar.auth.jwt import JWTService, claim_list
from sidecar.auth.rbac import RBACEngine, covering, normalize_permission


class AuthService:
    """Authenticate a bearer token and authorize its holder against roles and permissions.

    `authenticate(token)` returns the Identity (subject, roles, permissions, tenant, and
    whether it is a service); `authorize(identity, "write:users")` grants through the
    identity's roles in the RBAC engine or a permission listed in the token itself.
    """

    def __init__(self, jwt_service: JWTService, rbac: RBACEngine | None = None) -> None:
        self.jwt = jwt_service
        self.rbac = rbac or RBACEngine()

    def authenticate(self, token: str) -> Identity:
        """The identity of a valid token; raises Unauthenticated otherwise."""
        claims = self.jwt.verify_token(token)
        tenant = claims.get("tenant_id")
        return Identity(
            subject=str(claims["sub"]),
            method="jwt",
            tenant=str(tenant) if tenant is not None else None,
            roles=claim_list(claims.get("roles")),
            permissions=frozenset(claim_list(claims.get("permissions"))),
            mfa="mfa" in claim_list(claims.get("amr")),
            service=claims.get("token_type") == "service",
        )

    def authorize(self, identity: Identity, permission: str) -> bool:
        """True when the identity's roles or its own permissions cover `permission`."""
        own = {normalize_permission(p) for p in identity.permissions}
        if any(c in own for c in covering(permission)):
            return True
        return self.rbac.check_permission(user_roles=identity.roles, required_permission=permission)
