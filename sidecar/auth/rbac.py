"""Role-based access control: roles, inheritance and wildcard permissions.

Permissions are `action:resource`; `*` in either part is a wildcard, and `*` alone means
`*:*`. A granted permission covers a required one when, part by part, the granted part is
`*` or equal: granted `export:*` covers `export:csv` and `export:*`; granted `export:csv`
does not cover `export:*`. The policy engine and the seed's `RBACEngine` share this code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_PART = r"(?:\*|[A-Za-z0-9_.\-/]+)"
PERMISSION_RE = re.compile(rf"^(?:\*|{_PART}:{_PART})$")


def normalize_permission(permission: str) -> str:
    """`*` -> `*:*`; anything else unchanged."""
    return "*:*" if permission == "*" else permission


def covering(required: str) -> tuple[str, ...]:
    """Every granted permission that would cover `required` (at most four).

    Computed once per requirement at load time, so a check is a few set lookups.
    """
    required = normalize_permission(required)
    action, sep, resource = required.partition(":")
    if not sep:
        return (required, "*:*")
    actions = {action, "*"}
    resources = {resource, "*"}
    return tuple(sorted(f"{a}:{r}" for a in actions for r in resources))


def covers(granted: Iterable[str], required: str) -> bool:
    """True when some granted permission covers `required`."""
    normalized = {normalize_permission(p) for p in granted}
    return any(c in normalized for c in covering(required))


class RoleError(ValueError):
    """A role definition is inconsistent; `role` names the role at fault, `involved` every
    role of the cycle (or just `role`)."""

    def __init__(self, role: str, message: str, involved: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.role = role
        self.involved = involved or (role,)


def role_closure(inherits: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """role -> itself plus every role it inherits, transitively.

    Raises RoleError naming the cycle or the unknown role.
    """
    closure: dict[str, frozenset[str]] = {}

    def visit(role: str, stack: list[str]) -> frozenset[str]:
        if role in closure:
            return closure[role]
        if role in stack:
            members = stack[stack.index(role) :]
            cycle = " -> ".join([*members, role])
            raise RoleError(role, f"inheritance cycle: {cycle}", tuple(members))
        if role not in inherits:
            raise RoleError(stack[-1], f"unknown role '{role}' inherited by '{stack[-1]}'")
        result = {role}
        for parent in inherits[role]:
            result |= visit(parent, [*stack, role])
        closure[role] = frozenset(result)
        return closure[role]

    for name in inherits:
        visit(name, [])
    return closure


class RBACEngine:
    """The seed's RBAC API: `add_role(name, permissions, inherits=...)`, `check_permission`."""

    def __init__(self) -> None:
        self._permissions: dict[str, frozenset[str]] = {}
        self._inherits: dict[str, tuple[str, ...]] = {}
        self._granted: dict[str, frozenset[str]] | None = None

    def add_role(
        self, name: str, permissions: Iterable[str] = (), inherits: Iterable[str] = ()
    ) -> None:
        """Define (or redefine) a role; permissions must be `action:resource` or `*`."""
        perms = tuple(permissions)
        for p in perms:
            if not PERMISSION_RE.match(p):
                raise ValueError(f"bad permission {p!r}: expected action:resource")
        self._permissions[name] = frozenset(normalize_permission(p) for p in perms)
        self._inherits[name] = tuple(inherits)
        self._granted = None

    def _table(self) -> dict[str, frozenset[str]]:
        if self._granted is None:
            closure = role_closure(self._inherits)
            self._granted = {
                role: frozenset().union(*(self._permissions[r] for r in roles))
                for role, roles in closure.items()
            }
        return self._granted

    def get_permissions(self, role: str) -> frozenset[str]:
        """Every permission `role` grants, inherited ones included."""
        return self._table().get(role, frozenset())

    def check_permission(self, user_roles: Iterable[str], required_permission: str) -> bool:
        """True when any of `user_roles` grants a permission covering the required one."""
        table = self._table()
        granted: set[str] = set()
        for role in user_roles:
            granted |= table.get(role, frozenset())
        return any(c in granted for c in covering(required_permission))
