"""Who is calling: identities, token verification and role-based access control."""

from sidecar.auth.identity import Identity
from sidecar.auth.jwt import JWTService
from sidecar.auth.rbac import RBACEngine

__all__ = ["Identity", "JWTService", "RBACEngine"]
