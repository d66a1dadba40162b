"""`from dotmac.platform.auth import AuthService, JWTService, RBACEngine` (the seed's API)."""

from sidecar.auth.identity import Identity
from sidecar.auth.jwt import JWTService
from sidecar.auth.rbac import RBACEngine
from sidecar.auth.service import AuthService

__all__ = ["AuthService", "Identity", "JWTService", "RBACEngine"]
