"""Warnings about a policy that loads but probably does not do what its author meant.

- a rule that can never match, because an earlier rule matches every request it would;
- a role that changes no decision: no rule requires it (or a role it inherits), and it
  grants no permission that a rule requires;
- a permission a rule requires that no role grants (only tokens listing it directly can
  ever satisfy it).
"""

from __future__ import annotations

from collections.abc import Iterator

from sidecar.policy.match import parse_pattern
from sidecar.policy.model import Policy, Requirement, Rule


def _segments(pattern: str) -> tuple[list[str], bool]:
    """(one-segment keys, ends with **): keys are '' for a wildcard, '/x' for literal x."""
    keys, _ = parse_pattern(pattern, 0)
    tail = bool(keys) and keys[-1] == "**"
    return (keys[:-1] if tail else keys), tail


def pattern_covers(wide: str, narrow: str) -> bool:
    """True when every path matching `narrow` also matches `wide`."""
    a, a_tail = _segments(wide)
    b, b_tail = _segments(narrow)
    if a_tail:
        if len(b) < len(a):
            return False
    elif b_tail or len(a) != len(b):
        return False
    return all(x == "" or x == y for x, y in zip(a, b, strict=False))


def shadowed_by(earlier: Rule, later: Rule) -> bool:
    """True when `earlier` takes every request `later` would match."""
    if earlier.methods is not None and (
        later.methods is None or not later.methods <= earlier.methods
    ):
        return False
    return all(any(pattern_covers(a, b) for a in earlier.paths) for b in later.paths)


def _requirements(req: Requirement | None) -> Iterator[Requirement]:
    if req is None:
        return
    yield req
    for branch in req.any_of:
        yield from _requirements(branch)


def warnings(policy: Policy) -> list[str]:
    """`file:line: warning: ...` lines, in file order."""
    out: list[tuple[str, str]] = []
    rules = policy.rules
    for j, later in enumerate(rules):
        for earlier in rules[:j]:
            if shadowed_by(earlier, later):
                out.append(
                    (
                        later.source,
                        f"rule '{later.name}' can never match: rule '{earlier.name}' "
                        f"({earlier.source}) comes first and matches every request it would",
                    )
                )
                break

    required_roles: set[str] = set()
    required_perms: dict[str, tuple[Rule, tuple[str, ...]]] = {}
    for rule in rules:
        for req in _requirements(rule.require):
            if req.roles:
                required_roles |= req.roles
            for need in req.permissions:
                required_perms.setdefault(need.required, (rule, need.covered_by))

    for name, role in policy.roles.items():
        members = policy.role_closure.get(name, frozenset({name}))
        granted = policy.role_permissions.get(name, frozenset())
        if members & required_roles:
            continue
        if any(any(c in granted for c in cover) for _, cover in required_perms.values()):
            continue
        out.append(
            (
                role.source,
                f"role '{name}' is never used: no rule requires it or a role it inherits, "
                "and it grants no permission a rule requires",
            )
        )

    for required, (rule, cover) in required_perms.items():
        if not any(
            any(c in granted for c in cover) for granted in policy.role_permissions.values()
        ):
            out.append(
                (
                    rule.source,
                    f"permission '{required}' required by rule '{rule.name}' is granted by no "
                    "role; only credentials that list it directly can satisfy it",
                )
            )
    return [f"{where}: warning: {text}" for where, text in sorted(out, key=_order)]


def _order(item: tuple[str, str]) -> tuple[str, int]:
    file, _, line = item[0].rpartition(":")
    return file, int(line) if line.isdigit() else 0
