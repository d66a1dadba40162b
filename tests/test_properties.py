"""Property tests: canonicalization is idempotent, and the compiled decision engine agrees
with a brute-force reference evaluator on random policies and requests."""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.auth.identity import Identity
from sidecar.errors import BadRequest
from sidecar.policy.load import compile_sources
from sidecar.policy.testing import evaluate
from sidecar.proxy.paths import canonical

# ------------------------------------------------------------------------------------------
# canonicalization

_PIECES = [
    "/",
    "/",
    "a",
    "b",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%41",
    "%25",
    "%20",
    "%c3%a9",
    "%7e",
    "~",
    "-",
    "_",
    "%",
    "%zz",
    ";",
    "\\",
    "%3b",
    "//",
    "/./",
    "/../",
    "%00",
]


@given(st.lists(st.sampled_from(_PIECES), max_size=12))
@settings(max_examples=2000, deadline=None)
def test_canonical_is_idempotent(pieces: list[str]) -> None:
    target = "/" + "".join(pieces)
    try:
        path, query = canonical(target)
    except BadRequest:
        return
    assert query == ""
    assert canonical(path) == (path, "")
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    assert "%2f" not in path.lower()
    assert re.search(r"%25[0-9a-fA-F]{2}", path) is None


# ------------------------------------------------------------------------------------------
# random policies vs a reference evaluator

PERMS = ["read:users", "read:*", "*:users", "write:orders", "*", "export:csv", "export:*"]
ROLES = ["r0", "r1", "r2", "r3"]
METHODS = ["GET", "POST", "DELETE"]
LITERALS = ["a", "b", "c"]


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    roles: dict[str, Any] = {}
    for i, name in enumerate(ROLES):
        spec: dict[str, Any] = {"permissions": draw(st.lists(st.sampled_from(PERMS), max_size=2))}
        parents = draw(st.lists(st.sampled_from(ROLES[:i]), max_size=2)) if i else []
        if parents:
            spec["inherits"] = sorted(set(parents))
        roles[name] = spec
    rules = []
    for n in range(draw(st.integers(1, 8))):
        paths = []
        for _ in range(draw(st.integers(1, 2))):
            segs = []
            used: set[str] = set()
            for _ in range(draw(st.integers(0, 3))):
                kind = draw(st.sampled_from(["lit", "lit", "var", "star"]))
                if kind == "lit":
                    segs.append(draw(st.sampled_from(LITERALS)))
                elif kind == "star":
                    segs.append("*")
                else:
                    var = "x" if "x" not in used else "y"
                    if var in used:
                        segs.append("*")
                        continue
                    used.add(var)
                    segs.append("{" + var + "}")
            if draw(st.booleans()):
                segs.append("**")
            paths.append("/" + "/".join(segs))
        rule: dict[str, Any] = {"name": f"rule{n}", "paths": paths}
        if draw(st.booleans()):
            rule["methods"] = sorted(
                set(draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=2)))
            )
        kind = draw(st.sampled_from(["public", "deny", "auth", "require", "require"]))
        if kind in ("public", "deny"):
            rule[kind] = True
        elif kind == "require":
            common = set.intersection(*(set(re.findall(r"\{(\w+)\}", p)) for p in paths))
            rule["require"] = draw(requirements(sorted(common), depth=0))
        rules.append(rule)
    return {"roles": roles, "rules": rules}


@st.composite
def requirements(draw: st.DrawFn, variables: list[str], depth: int) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if draw(st.booleans()):
        req["permissions"] = draw(st.lists(st.sampled_from(PERMS), min_size=1, max_size=2))
    if draw(st.booleans()):
        req["roles"] = sorted(set(draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=2))))
    for key in ("tenant", "subject"):
        if draw(st.integers(0, 3)) == 0:
            options = ["a", "u"] + [f"{{{v}}}" for v in variables]
            req[key] = draw(st.sampled_from(options))
    if draw(st.integers(0, 3)) == 0:
        req["mfa"] = True
    if depth == 0 and draw(st.integers(0, 2)) == 0:
        req["any_of"] = [draw(requirements(variables, 1)) for _ in range(draw(st.integers(1, 3)))]
    if not req:
        req["mfa"] = True
    return req


identities = st.one_of(
    st.none(),
    st.builds(
        lambda subject, tenant, roles, perms, mfa: Identity(
            subject=subject,
            method="jwt",
            tenant=tenant,
            roles=tuple(roles),
            permissions=frozenset(perms),
            mfa=mfa,
        ),
        st.sampled_from(["a", "b", "u"]),
        st.sampled_from([None, "a", "b"]),
        st.lists(st.sampled_from([*ROLES, "stranger"]), max_size=2),
        st.lists(st.sampled_from(PERMS), max_size=2),
        st.booleans(),
    ),
)
requests = st.tuples(
    st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT"]),
    st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4).map(lambda s: "/" + "/".join(s)),
    st.booleans(),
)


def _ref_pattern(pattern: str) -> re.Pattern[str]:
    body = pattern.rstrip("/")
    out = ""
    for seg in body.split("/")[1:] if body else []:
        if seg == "**":
            out += "(?:/[^/]+)*"
        elif seg == "*" or seg.startswith("{"):
            out += "/[^/]+"
        else:
            out += "/" + re.escape(seg)
    return re.compile("^" + out + "$")


def _ref_vars(pattern: str, path: str) -> dict[str, str]:
    p = pattern.rstrip("/").split("/")[1:]
    s = path.rstrip("/").split("/")[1:]
    return {seg[1:-1]: s[i] for i, seg in enumerate(p) if seg.startswith("{")}


def _ref_roles(roles: dict[str, Any], name: str) -> set[str]:
    if name not in roles:
        return {name}
    out = {name}
    for parent in roles[name].get("inherits", []):
        out |= _ref_roles(roles, parent)
    return out


def _ref_grants(granted: str, required: str) -> bool:
    g = "*:*" if granted == "*" else granted
    r = "*:*" if required == "*" else required
    return all(a == "*" or a == b for a, b in zip(g.split(":"), r.split(":"), strict=True))


def _ref_holds(
    req: dict[str, Any], ident: Identity, roles: set[str], perms: set[str], params: dict[str, str]
) -> bool:
    def value(template: str) -> str | None:
        return params.get(template[1:-1]) if template.startswith("{") else template

    if not all(any(_ref_grants(g, p) for g in perms) for p in req.get("permissions", [])):
        return False
    if "roles" in req and not roles & set(req["roles"]):
        return False
    if "tenant" in req and (ident.tenant is None or ident.tenant != value(req["tenant"])):
        return False
    if "subject" in req and ident.subject != value(req["subject"]):
        return False
    if req.get("mfa") and not ident.mfa:
        return False
    return not (
        "any_of" in req
        and not any(_ref_holds(b, ident, roles, perms, params) for b in req["any_of"])
    )


def reference(doc: dict[str, Any], method: str, path: str, ident: Identity | None) -> int:
    for rule in doc["rules"]:
        methods = rule.get("methods")
        if (
            methods is not None
            and method not in methods
            and not (method == "HEAD" and "GET" in methods)
        ):
            continue
        hit = next((p for p in rule["paths"] if _ref_pattern(p).match(path.rstrip("/"))), None)
        if hit is None:
            continue
        if rule.get("deny"):
            return 403
        if rule.get("public"):
            return 200
        if ident is None:
            return 401
        if "require" not in rule:
            return 200
        roles: set[str] = set()
        for r in ident.roles:
            roles |= _ref_roles(doc["roles"], r)
        perms = set(ident.permissions)
        for r in roles:
            perms |= set(doc["roles"].get(r, {}).get("permissions", []))
        ok = _ref_holds(rule["require"], ident, roles, perms, _ref_vars(hit, path))
        return 200 if ok else 403
    return 403


def _instance(draw: st.DrawFn, pattern: str) -> str:
    """A path that the pattern matches (so that random requests reach deep rules)."""
    out = []
    for seg in pattern.strip("/").split("/") if pattern.strip("/") else []:
        if seg == "**":
            out += draw(st.lists(st.sampled_from(["a", "b", "u"]), max_size=2))
        elif seg == "*" or seg.startswith("{"):
            out.append(draw(st.sampled_from(["a", "b", "u"])))
        else:
            out.append(seg)
    return "/" + "/".join(out)


@given(policies(), st.data())
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decisions_match_the_reference(doc: dict[str, Any], data: st.DataObject) -> None:
    policy = compile_sources([("random.yaml", yaml.safe_dump(doc))])
    patterns = [p for rule in doc["rules"] for p in rule["paths"]]
    for _ in range(data.draw(st.integers(1, 12))):
        method, path, trailing = data.draw(requests)
        if data.draw(st.booleans()):
            path = _instance(data.draw, data.draw(st.sampled_from(patterns)))
        ident = data.draw(identities)
        target = path + ("/" if trailing and path != "/" else "")
        got = evaluate(policy, canonical, method, target, ident).status
        assert got == reference(doc, method, target, ident), (method, target, ident, doc)
