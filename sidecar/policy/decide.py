"""Decisions: which rule a request matches, and whether an identity satisfies it."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.auth.identity import Identity
from sidecar.auth.rbac import normalize_permission
from sidecar.policy.match import captures
from sidecar.policy.model import Policy, Requirement, Rule


def match(policy: Policy, method: str, path: str) -> tuple[Rule, dict[str, str]] | None:
    """The first rule whose path pattern and methods match, with its path variables."""
    best = None
    for pattern in policy.matcher.candidates(path):
        rule = policy.rules[pattern.rule_index]
        if rule.methods is not None and method not in rule.methods:
            continue
        if best is None or pattern.rule_index < best.rule_index:
            best = pattern
    if best is None:
        return None
    return policy.rules[best.rule_index], captures(best, path)


def effective(policy: Policy, identity: Identity) -> tuple[frozenset[str], frozenset[str]]:
    """(roles, permissions) of an identity: its roles plus inherited ones, and every
    permission those roles grant plus those its credential lists directly."""
    roles: set[str] = set()
    perms: set[str] = {normalize_permission(p) for p in identity.permissions}
    closure = policy.role_closure
    granted = policy.role_permissions
    for role in identity.roles:
        members = closure.get(role)
        if members is None:
            roles.add(role)  # a role the policy does not define still counts by name
            continue
        roles |= members
        perms |= granted[role]
    return frozenset(roles), frozenset(perms)


def check(
    req: Requirement,
    identity: Identity,
    roles: frozenset[str],
    perms: frozenset[str],
    params: Mapping[str, str],
) -> str | None:
    """None when `req` holds, else the snake_case reason it failed."""
    for need in req.permissions:
        if not any(c in perms for c in need.covered_by):
            return "missing_permission"
    if req.roles is not None and roles.isdisjoint(req.roles):
        return "missing_role"
    if req.tenant is not None:
        expected = req.tenant.resolve(params)
        if identity.tenant is None or identity.tenant != expected:
            return "tenant_mismatch"
    if req.subject is not None and identity.subject != req.subject.resolve(params):
        return "subject_mismatch"
    if req.mfa and not identity.mfa:
        return "mfa_required"
    if req.any_of and all(
        check(branch, identity, roles, perms, params) is not None for branch in req.any_of
    ):
        return "no_branch_held"
    return None


def authorize(
    policy: Policy, rule: Rule, identity: Identity, params: Mapping[str, str]
) -> str | None:
    """None when `identity` satisfies `rule`'s requirement, else the reason it does not."""
    if rule.require is None:
        return None
    roles, perms = effective(policy, identity)
    return check(rule.require, identity, roles, perms, params)
