"""The compiled policy: frozen roles, rules and requirements, built once per load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.policy.match import PathMatcher

CREDENTIAL_KINDS = frozenset({"jwt", "api_key", "session"})


@dataclass(frozen=True, slots=True)
class Template:
    """A literal value, or `{name}`: the path variable of that name."""

    literal: str | None = None
    var: str | None = None

    def resolve(self, params: Mapping[str, str]) -> str | None:
        """The value this template stands for on one request."""
        return params.get(self.var) if self.var is not None else self.literal

    def __str__(self) -> str:
        return f"{{{self.var}}}" if self.var is not None else str(self.literal)


@dataclass(frozen=True, slots=True)
class PermissionNeed:
    """One required permission and every granted permission that covers it."""

    required: str
    covered_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Requirement:
    """What the caller must have; every key present must hold (any_of: one branch)."""

    permissions: tuple[PermissionNeed, ...] = ()
    roles: frozenset[str] | None = None
    tenant: Template | None = None
    subject: Template | None = None
    mfa: bool = False
    any_of: tuple[Requirement, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule; `index` is its place in first-match order."""

    name: str
    index: int
    paths: tuple[str, ...]
    methods: frozenset[str] | None  # None: every method
    source: str  # file:line
    public: bool = False
    deny: bool = False
    authn: frozenset[str] | None = None  # None: every configured credential kind
    require: Requirement | None = None
    mode: str = "enforce"  # enforce | shadow


@dataclass(frozen=True, slots=True)
class Role:
    """A role as written: its own permissions and the roles it inherits."""

    name: str
    permissions: frozenset[str]
    inherits: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Policy:
    """A compiled, immutable policy snapshot; swapped whole on reload."""

    rules: tuple[Rule, ...]
    roles: Mapping[str, Role]
    role_closure: Mapping[str, frozenset[str]]  # role -> itself + inherited roles
    role_permissions: Mapping[str, frozenset[str]]  # role -> granted, inherited included
    matcher: PathMatcher
    sources: tuple[str, ...]
    digest: str
    rule_names: frozenset[str] = field(default_factory=frozenset)
