"""Policy test cases (`*_test.yaml`), the runner behind `policy test`, and `policy explain`.

Cases are data, decided by the same code the proxy uses (canonical path, first matching
rule, verdict), with the identity written in the case instead of a credential. The caller
passes the proxy's path canonicalizer in (`normalize`): policy does not import proxy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar import yamldoc
from sidecar.auth.identity import Identity
from sidecar.errors import ERROR_CODES, BadRequest, PolicyError
from sidecar.policy.decide import Trace, effective, match, verdict
from sidecar.policy.model import Policy, Rule

EXPECTATIONS = ("allow", "deny", "unauthenticated", "bad_request")
_IDENTITY_KEYS = {"subject", "tenant", "roles", "permissions", "mfa", "method"}
_CASE_KEYS = {"name", "request", "identity", "expect"}
_RESULT = {
    200: "allow",
    401: "unauthenticated",
    403: "deny",
    400: "bad_request",
    405: "bad_request",
}
_NEVER_PROXIED = frozenset({"TRACE", "TRACK", "CONNECT"})
# target -> (normalized path, query), raising BadRequest: sidecar.proxy.paths.canonical
Normalizer = Callable[[str], tuple[str, str]]


@dataclass(frozen=True)
class Case:
    """One test case: a request, who makes it, and the expected outcome."""

    name: str
    method: str
    target: str
    identity: Identity | None
    expect: str
    source: str


@dataclass
class Outcome:
    """What the policy decides for one request."""

    status: int
    reason: str
    path: str | None = None
    rule: Rule | None = None
    params: dict[str, str] = field(default_factory=dict)
    shadow: str = ""  # "shadow_deny" / "shadow_allow" on a shadow-mode rule
    trace: Trace = field(default_factory=list)

    @property
    def result(self) -> str:
        """allow | deny | unauthenticated | bad_request."""
        return _RESULT.get(self.status, "bad_request")


def evaluate(
    policy: Policy,
    normalize: Normalizer,
    method: str,
    target: str,
    identity: Identity | None,
    *,
    explain: bool = False,
) -> Outcome:
    """Decide a request as the proxy would, for a known identity (None: anonymous)."""
    if method in _NEVER_PROXIED:
        return Outcome(405, "method_not_allowed")
    try:
        path, _ = normalize(target)
    except BadRequest as exc:
        return Outcome(400, exc.reason)
    found = match(policy, method, path)
    if found is None:
        return Outcome(403, "no_matching_rule", path)
    rule, params = found
    trace: Trace | None = [] if explain else None
    status, reason = verdict(policy, rule, params, identity, trace)
    outcome = Outcome(status, reason, path, rule, params, trace=trace or [])
    if rule.mode == "shadow":
        outcome.shadow = "shadow_deny" if status in (401, 403) else "shadow_allow"
        if status in (401, 403):
            outcome.status = 200  # shadow mode: decided and logged, then let through
    return outcome


def identity_from(data: Any, where: str) -> Identity | None:
    """An Identity from a case's or explain's `identity` mapping; None for no mapping."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise PolicyError(where, "identity: expected a mapping")
    for key in data:
        if key not in _IDENTITY_KEYS:
            raise PolicyError(
                where,
                f"identity: unknown key '{key}' (expected {', '.join(sorted(_IDENTITY_KEYS))})",
            )

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(where, f"identity.{key}: expected a list of names")
        return tuple(value)

    mfa = data.get("mfa", False)
    if not isinstance(mfa, bool):
        raise PolicyError(where, "identity.mfa: expected true or false")
    tenant = data.get("tenant")
    return Identity(
        subject=str(data.get("subject", "test-subject")),
        method=str(data.get("method", "jwt")),
        tenant=str(tenant) if tenant is not None else None,
        roles=names("roles"),
        permissions=frozenset(names("permissions")),
        mfa=mfa,
    )


def test_files(path: Path) -> list[Path]:
    """The `*_test.yaml` files for a policy folder, or the one beside a policy file."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.endswith(("_test.yaml", "_test.yml")))
    sibling = path.with_name(f"{path.stem}_test{path.suffix}")
    return [sibling] if sibling.is_file() else []


def load_cases(files: list[Path]) -> list[Case]:
    """Read every case; malformed cases are PolicyErrors naming file:line."""
    cases: list[Case] = []
    for file in files:
        try:
            doc = yamldoc.load_file(file)
        except yamldoc.YamlError as exc:
            source, _, message = str(exc).partition(": ")
            raise PolicyError(source, message) from None
        if doc is None:
            continue
        if not isinstance(doc, yamldoc.LocatedDict) or set(doc) - {"cases"}:
            raise PolicyError(f"{file}:1", "expected a mapping with one key, `cases`")
        items = doc.get("cases") or []
        if not isinstance(items, yamldoc.LocatedList):
            raise PolicyError(doc.where("cases"), "cases: expected a list")
        for i, item in enumerate(items):
            cases.append(_case(item, items.where(i), i))
    return cases


def _case(item: Any, where: str, index: int) -> Case:
    if not isinstance(item, yamldoc.LocatedDict):
        raise PolicyError(where, "cases: each case must be a mapping")
    for key in item:
        if key not in _CASE_KEYS:
            raise PolicyError(item.where(key), f"case: unknown key '{key}'")
    name = item.get("name") or f"case {index + 1}"
    request = item.get("request")
    if (
        not isinstance(request, Mapping)
        or set(request) - {"method", "path"}
        or "path" not in request
    ):
        raise PolicyError(
            item.where("request") if "request" in item else where,
            "request: expected {method: M, path: P}",
        )
    expect = item.get("expect")
    if expect not in EXPECTATIONS:
        raise PolicyError(
            item.where("expect") if "expect" in item else where,
            f"expect: expected one of {', '.join(EXPECTATIONS)}, got {expect!r}",
        )
    return Case(
        name=str(name),
        method=str(request.get("method", "GET")),
        target=str(request["path"]),
        identity=identity_from(item.get("identity"), item.where("identity")),
        expect=str(expect),
        source=where,
    )


def describe(outcome: Outcome) -> str:
    """A short account of an outcome: result, rule and reason."""
    parts = [outcome.result]
    if outcome.rule is not None:
        parts.append(f"by rule '{outcome.rule.name}' ({outcome.rule.source})")
    if outcome.reason:
        parts.append(f"reason {outcome.reason}")
    if outcome.shadow:
        parts.append(f"[{outcome.shadow}]")
    return ", ".join(parts)


def run_cases(
    policy: Policy, normalize: Normalizer, cases: list[Case]
) -> tuple[list[str], int, int]:
    """(report lines, passed, failed) for the cases against the policy."""
    lines: list[str] = []
    passed = failed = 0
    for case in cases:
        outcome = evaluate(policy, normalize, case.method, case.target, case.identity)
        if outcome.result == case.expect:
            passed += 1
            lines.append(f"PASS  {case.name}")
        else:
            failed += 1
            lines.append(f"FAIL  {case.name}  ({case.source})")
            lines.append(f"        request   {case.method} {case.target}")
            lines.append(f"        expected  {case.expect}")
            lines.append(f"        actual    {describe(outcome)}")
    return lines, passed, failed


def explain(
    policy: Policy, normalize: Normalizer, method: str, target: str, identity: Identity | None
) -> str:
    """A plain-language account of how the policy decides one request."""
    out = [f"request    {method} {target}"]
    outcome = evaluate(policy, normalize, method, target, identity, explain=True)
    if outcome.path is None:
        out.append(
            f"decision   {_status_text(outcome)}: the request is refused before any "
            "rule is consulted"
        )
        return "\n".join(out)
    out.append(f"path       {outcome.path}" + ("" if outcome.path == target else "  (normalized)"))
    if identity is None:
        out.append("identity   anonymous (no credential)")
    else:
        roles, perms = effective(policy, identity)
        out.append(
            f"identity   subject {identity.subject}, roles {_list(identity.roles)}, "
            f"tenant {identity.tenant or '-'}, mfa {'yes' if identity.mfa else 'no'}, "
            f"via {identity.method}"
        )
        out.append(
            f"           effective roles {_list(sorted(roles))}; permissions {_list(sorted(perms))}"
        )
    if outcome.rule is None:
        out.append("rule       none matches (rules are tried in order; the first match decides)")
    else:
        rule = outcome.rule
        methods = "any method" if rule.methods is None else ", ".join(sorted(rule.methods))
        shadow = "; mode shadow (decides and logs, never blocks)" if rule.mode == "shadow" else ""
        out.append(f"rule       {rule.name}  ({rule.source}), the first rule that matches")
        out.append(f"           paths {', '.join(rule.paths)}; {methods}{shadow}")
        if outcome.params:
            variables = ", ".join(f"{{{k}}} = {v!r}" for k, v in outcome.params.items())
            out.append(f"           path variables {variables}")
        out.append("conditions")
        for depth, text, held in outcome.trace:
            out.append(f"  {'held  ' if held else 'FAILED'}  {'  ' * depth}{text}")
    out.append(f"decision   {_status_text(outcome)}")
    return "\n".join(out)


def _status_text(outcome: Outcome) -> str:
    code = ERROR_CODES.get(outcome.status, "")
    text = f"{outcome.result.upper()} ({outcome.status}{' ' + code if code else ''})"
    if outcome.reason:
        text += f", reason {outcome.reason}"
    if outcome.shadow == "shadow_deny":
        text += (
            "; the rule is in shadow mode, so the request is logged as shadow_deny and let through"
        )
    return text


def _list(items: Any) -> str:
    items = list(items)
    return ", ".join(items) if items else "-"


def parse_identity_json(text: str) -> Identity | None:
    """The `--identity` argument of `policy explain`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--identity: not JSON ({exc.msg})") from None
    try:
        return identity_from(data, "--identity")
    except PolicyError as exc:
        raise ValueError(f"--identity: {exc.detail}") from None
