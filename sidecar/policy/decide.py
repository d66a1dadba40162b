"""Decisions: which rule a request matches, and whether an identity satisfies it.

The proxy, `policy test` and `policy explain` all decide through these functions; explain
passes a `trace` list to record every condition and whether it held.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.auth.identity import Identity
from sidecar.auth.rbac import normalize_permission
from sidecar.policy.match import captures
from sidecar.policy.model import Policy, Requirement, Rule

# (depth, description, held) for explain
Trace = list[tuple[int, str, bool]]


def match(policy: Policy, method: str, path: str) -> tuple[Rule, dict[str, str]] | None:
    """The first rule whose path pattern and methods match, with its path variables."""
    best = None
    rules = policy.rules
    for pattern in policy.matcher.candidates(path):
        if best is not None and pattern.rule_index >= best.rule_index:
            continue
        methods = rules[pattern.rule_index].methods
        if methods is None or method in methods:
            best = pattern
    if best is None:
        return None
    return rules[best.rule_index], captures(best, path)


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
    trace: Trace | None = None,
    depth: int = 0,
) -> str | None:
    """None when `req` holds, else the snake_case reason of the first condition that failed.

    With `trace`, every condition is evaluated and recorded; without, it stops at the
    first failure.
    """
    failed: str | None = None
    for need in req.permissions:
        held = any(c in perms for c in need.covered_by)
        if trace is not None:
            trace.append((depth, f"has permission {need.required}", held))
        if not held:
            failed = failed or "missing_permission"
            if trace is None:
                return failed
    if req.roles is not None:
        held = not roles.isdisjoint(req.roles)
        if trace is not None:
            trace.append((depth, f"has one of the roles {', '.join(sorted(req.roles))}", held))
        if not held:
            failed = failed or "missing_role"
            if trace is None:
                return failed
    if req.tenant is not None:
        expected = req.tenant.resolve(params)
        held = identity.tenant is not None and identity.tenant == expected
        if trace is not None:
            trace.append(
                (
                    depth,
                    f"tenant is {_shown(req.tenant, expected)}; caller's tenant "
                    f"is {identity.tenant!r}",
                    held,
                )
            )
        if not held:
            failed = failed or "tenant_mismatch"
            if trace is None:
                return failed
    if req.subject is not None:
        expected = req.subject.resolve(params)
        held = identity.subject == expected
        if trace is not None:
            trace.append(
                (
                    depth,
                    f"subject is {_shown(req.subject, expected)}; caller is {identity.subject!r}",
                    held,
                )
            )
        if not held:
            failed = failed or "subject_mismatch"
            if trace is None:
                return failed
    if req.mfa:
        if trace is not None:
            trace.append((depth, "multi-factor authentication completed", identity.mfa))
        if not identity.mfa:
            failed = failed or "mfa_required"
            if trace is None:
                return failed
    if req.any_of:
        at = len(trace) if trace is not None else 0
        branches_held = False
        for i, branch in enumerate(req.any_of, 1):
            if trace is not None:
                trace.append((depth + 1, f"branch {i}", True))
                mark = len(trace) - 1
                ok = check(branch, identity, roles, perms, params, trace, depth + 2) is None
                trace[mark] = (depth + 1, f"branch {i}", ok)
            else:
                ok = check(branch, identity, roles, perms, params) is None
            if ok:
                branches_held = True
                if trace is None:
                    break
        if trace is not None:
            trace.insert(at, (depth, "any_of: at least one branch", branches_held))
        if not branches_held:
            failed = failed or "no_branch_held"
    return failed


def _shown(template: object, value: str | None) -> str:
    text = str(template)
    return f"{value!r} ({text} in the path)" if text.startswith("{") else repr(value)


def authorize(
    policy: Policy,
    rule: Rule,
    identity: Identity,
    params: Mapping[str, str],
    trace: Trace | None = None,
) -> str | None:
    """None when `identity` satisfies `rule`'s requirement, else the reason it does not."""
    if rule.require is None:
        return None
    roles, perms = effective(policy, identity)
    return check(rule.require, identity, roles, perms, params, trace)


def verdict(
    policy: Policy,
    rule: Rule,
    params: Mapping[str, str],
    identity: Identity | None,
    trace: Trace | None = None,
) -> tuple[int, str]:
    """(status, reason) of `rule` for an identity (None: anonymous), before shadow mode.

    200 allows; 401 needs a credential; 403 forbids. The reason is "" when allowed.
    """
    if rule.deny:
        if trace is not None:
            trace.append((0, "rule denies every caller", False))
        return 403, "denied_by_rule"
    if rule.public:
        if trace is not None:
            trace.append((0, "public rule: no credential needed", True))
        return 200, ""
    if identity is None:
        if trace is not None:
            trace.append((0, "a credential is presented", False))
        return 401, "missing_credential"
    if rule.authn is not None and identity.method not in rule.authn:
        if trace is not None:
            trace.append((0, f"credential kind is one of {', '.join(sorted(rule.authn))}", False))
        return 401, "credential_not_accepted"
    if trace is not None:
        trace.append((0, f"authenticated ({identity.method})", True))
    failed = authorize(policy, rule, identity, params, trace)
    return (403, failed) if failed is not None else (200, "")
