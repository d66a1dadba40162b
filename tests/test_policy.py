"""Policy files: validation with file:line, matching semantics, role closure, RBAC API."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.auth.identity import Identity
from sidecar.auth.rbac import RBACEngine, covers
from sidecar.errors import PolicyError
from sidecar.policy import authorize, load_policy, match

ROOT = Path(__file__).resolve().parent.parent


def _policy(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_shipped_example_policy_loads() -> None:
    p = load_policy(ROOT / "policies")
    assert [r.name for r in p.rules][:2] == ["health", "list-users"]
    assert p.role_closure["support"] == {"support", "user"}


def test_first_match_wins_and_methods(tmp_path: Path) -> None:
    p = load_policy(
        _policy(
            tmp_path,
            """
rules:
  - {name: read, paths: ["/a/**"], methods: [GET]}
  - {name: any, paths: ["/a/{x}"]}
  - {name: star, paths: ["/b/*/c"]}
  - {name: root, paths: ["/"]}
""",
        )
    )

    def rule(method: str, path: str) -> str | None:
        found = match(p, method, path)
        return found[0].name if found else None

    assert rule("GET", "/a/1") == "read"
    assert rule("HEAD", "/a/1") == "read"  # GET implies HEAD
    assert rule("POST", "/a/1") == "any"
    assert rule("POST", "/a/1/2") is None
    assert rule("GET", "/a") == "read"  # ** matches zero segments
    assert rule("GET", "/a/") == "read"  # trailing slash ignored for matching
    assert rule("PUT", "/b/x/c") == "star"
    assert rule("PUT", "/b/x/y/c") is None
    assert rule("GET", "/") == "root"
    assert rule("GET", "/A/1") is None  # case-sensitive
    assert match(p, "POST", "/a/42") == (p.rules[1], {"x": "42"})


def test_folder_in_name_order_skips_tests(tmp_path: Path) -> None:
    _policy(tmp_path, "rules:\n  - {name: second, paths: ['/x']}\n", "20-b.yaml")
    _policy(
        tmp_path,
        "roles: {r: {permissions: ['a:b']}}\nrules:\n  - {name: first, paths: ['/x']}\n",
        "10-a.yaml",
    )
    _policy(tmp_path, "cases: []\n", "10-a_test.yaml")
    p = load_policy(tmp_path)
    assert [r.name for r in p.rules] == ["first", "second"]
    assert match(p, "GET", "/x") is not None
    assert match(p, "GET", "/x")[0].name == "first"  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("rules:\n  - name: a\n    paths: ['/a']\n    requre: {}\n", 4, "unknown key 'requre'"),
        ("rules:\n  - name: a\n    paths: ['a']\n", 3, "must start with '/'"),
        ("rules:\n  - name: a\n    paths: ['/**/x']\n", 3, "'**' may only be the last"),
        ("rules:\n  - name: a\n    paths: ['/a{b}']\n", 3, "bad segment"),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n    require: {roles: [ghost]}\n",
            4,
            "unknown role 'ghost'",
        ),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n    require: {permissions: ['read']}\n",
            4,
            "bad permission 'read'",
        ),
        ("roles:\n  a: {inherits: [b]}\n  b: {inherits: [a]}\n", 2, "inheritance cycle"),
        ("roles:\n  a: {inherits: [zz]}\n", 2, "unknown role 'zz'"),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n  - name: a\n    paths: ['/b']\n",
            4,
            "already defined",
        ),
        ("rules:\n  - name: a\n    paths: ['/a']\n    methods: [get]\n", 4, "bad method"),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n    public: true\n    require: {mfa: true}\n",
            5,
            "no effect on a public rule",
        ),
        (
            "rules:\n  - name: a\n    paths: ['/a/{id}']\n    require: {subject: '{user}'}\n",
            4,
            "{user} is not a variable",
        ),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n    authn: [kerberos]\n",
            4,
            "unknown credential kind",
        ),
        (
            "rules:\n  - name: a\n    paths: ['/a']\n    mode: audit\n",
            4,
            "expected enforce or shadow",
        ),
        ("rules:\n  - name: a\n   paths: ['/a']\n", 3, "YAML syntax error"),
        ("rulez: []\n", 1, "unknown key 'rulez'"),
    ],
)
def test_invalid_policies_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    f = _policy(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert str(info.value).startswith(f"{f}:{line}: "), str(info.value)
    assert message in str(info.value)


def test_authorize_reasons(tmp_path: Path) -> None:
    p = load_policy(ROOT / "policies/example.yaml")
    rule, params = match(p, "GET", "/api/tenants/t1/orders/5")  # type: ignore[misc]
    ok = Identity("u", "jwt", tenant="t1", roles=("user",), mfa=True)
    assert authorize(p, rule, ok, params) is None
    assert (
        authorize(p, rule, Identity("u", "jwt", tenant="t2", roles=("user",), mfa=True), params)
        == "tenant_mismatch"
    )
    assert (
        authorize(p, rule, Identity("u", "jwt", tenant="t1", roles=("user",)), params)
        == "mfa_required"
    )
    assert (
        authorize(p, rule, Identity("u", "jwt", tenant="t1", roles=("support",), mfa=True), params)
        is None
    )  # support inherits user
    assert authorize(p, rule, Identity("u", "jwt", tenant="t1", mfa=True), params) == "missing_role"
    rule, params = match(p, "GET", "/api/users")  # type: ignore[misc]
    direct = Identity("u", "jwt", permissions=frozenset({"*:users"}))
    assert authorize(p, rule, direct, params) is None


@pytest.mark.parametrize(
    ("granted", "required", "ok"),
    [
        (["export:*"], "export:csv", True),
        (["export:*"], "export:*", True),
        (["export:csv"], "export:*", False),
        (["*"], "anything:here", True),
        (["*:users"], "read:users", True),
        (["read:users"], "read:orders", False),
        (["read:*"], "*:users", False),
    ],
)
def test_wildcard_coverage(granted: list[str], required: str, ok: bool) -> None:
    assert covers(granted, required) is ok


def test_seed_rbac_engine_api() -> None:
    rbac = RBACEngine()
    rbac.add_role("admin", ["read:*", "write:*", "delete:*"])
    rbac.add_role("user", ["read:own", "write:own"])
    rbac.add_role("support", ["read:users"], inherits=["user"])
    assert rbac.check_permission(user_roles=["admin"], required_permission="write:users")
    assert not rbac.check_permission(user_roles=["user"], required_permission="write:users")
    assert rbac.check_permission(user_roles=["support"], required_permission="write:own")
    assert not rbac.check_permission(user_roles=["nobody"], required_permission="read:own")
    with pytest.raises(ValueError, match="bad permission"):
        rbac.add_role("x", ["no-colon"])


def test_benchmark_scenario_is_a_real_allowed_decision() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_policy", ROOT / "bench/policy_decision.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from sidecar.policy.load import compile_sources

    for n in (10, 500):
        policy = compile_sources([("b.yaml", bench.policy_text(n))])
        assert len(policy.rules) == n
        method, path = bench.request_for(n)
        rule, params = match(policy, method, path)  # type: ignore[misc]
        assert rule.index >= n - 4
        ident = Identity("u1", "jwt", tenant="t1", roles=("clerk",))
        assert authorize(policy, rule, ident, params) is None
