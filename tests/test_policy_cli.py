"""`dotmac-sidecar policy check | test | explain`, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


EXPECTED_CHECK = """\
tests/fixtures/policy_check/10-roles.yaml:4: error: roles.loop-a: inheritance cycle: loop-a -> loop-b -> loop-a
tests/fixtures/policy_check/10-roles.yaml:6: error: roles.orphan: unknown role 'nobody' inherited by 'orphan'
tests/fixtures/policy_check/10-roles.yaml:7: error: roles.reader.permissions: bad permission 'read' (expected action:resource or *)
tests/fixtures/policy_check/20-rules.yaml:11: error: rule 'ghost-role'.require.roles: unknown role 'phantom'
tests/fixtures/policy_check/20-rules.yaml:13: error: rule 'bad-pattern'.paths: path pattern '/files/**/tail': '**' may only be the last segment
tests/fixtures/policy_check/20-rules.yaml:16: error: rule 'typo': unknown key 'requires' (expected authn, deny, description, methods, mode, name, paths, public, require)
tests/fixtures/policy_check/30-syntax.yaml:4: error: YAML syntax error: expected ',' or ']', but got '<stream end>'
tests/fixtures/policy_check/10-roles.yaml:3: warning: role 'auditor' is never used: no rule requires it or a role it inherits, and it grants no permission a rule requires
tests/fixtures/policy_check/20-rules.yaml:5: warning: rule 'users' can never match: rule 'everything-under-api' (tests/fixtures/policy_check/20-rules.yaml:2) comes first and matches every request it would
tests/fixtures/policy_check/20-rules.yaml:17: warning: permission 'export:csv' required by rule 'export' is granted by no role; only credentials that list it directly can satisfy it
7 errors, 3 warnings in 3 files, 3 rules, 2 roles
"""  # noqa: E501


def test_check_reports_every_error_and_warning_with_file_line() -> None:
    out = sidecar("policy", "check", "tests/fixtures/policy_check")
    assert out.returncode == 1
    assert out.stdout == EXPECTED_CHECK


def test_check_shipped_policies_clean_and_strict_mode(tmp_path: Path) -> None:
    out = sidecar("policy", "check", "policies")
    assert out.returncode == 0, out.stdout
    assert out.stdout.startswith("0 errors, 0 warnings")
    warn_only = tmp_path / "w.yaml"
    warn_only.write_text(
        "roles:\n  unused: {permissions: ['a:b']}\nrules:\n"
        "  - {name: all, paths: ['/**'], public: true}\n"
    )
    assert sidecar("policy", "check", str(warn_only)).returncode == 0
    strict = sidecar("policy", "check", "--strict", str(warn_only))
    assert strict.returncode == 1
    assert f"{warn_only}:2: warning: role 'unused' is never used" in strict.stdout


def test_policy_test_passes_on_shipped_policies() -> None:
    out = sidecar("policy", "test", "policies/")
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    assert all(line.startswith("PASS  ") for line in lines[:-1])
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"


def test_policy_test_wrong_expectation_exits_1_with_a_readable_diff() -> None:
    out = sidecar("policy", "test", "tests/fixtures/policy_test_wrong")
    assert out.returncode == 1
    assert out.stdout == (
        "PASS  users read their own things\n"
        "FAIL  wrongly expects users to be refused  "
        "(tests/fixtures/policy_test_wrong/policy_test.yaml:6)\n"
        "        request   GET /me/profile\n"
        "        expected  deny\n"
        "        actual    allow, by rule 'own' (tests/fixtures/policy_test_wrong/policy.yaml:4)\n"
        "PASS  anonymous callers must authenticate\n"
        "2 passed, 1 failed\n"
    )


def test_explain_reads_like_an_account_of_the_decision() -> None:
    out = sidecar(
        "policy",
        "explain",
        "--policy",
        "policies",
        "--method",
        "GET",
        "--path",
        "/api/users/alice",
        "--identity",
        '{"subject": "bob", "roles": ["user"]}',
    )
    assert out.returncode == 0
    text = out.stdout
    assert "rule       user-record  (policies/example.yaml:18), the first rule that matches" in text
    assert "path variables {user_id} = 'alice'" in text
    assert "FAILED      has permission read:users" in text
    assert "FAILED      subject is 'alice' ({user_id} in the path); caller is 'bob'" in text
    assert text.rstrip().endswith("decision   DENY (403 forbidden), reason no_branch_held")

    out = sidecar(
        "policy",
        "explain",
        "--policy",
        "policies",
        "--method",
        "GET",
        "--path",
        "/api/tenants/t1/../t1/orders/7",
        "--identity",
        '{"subject": "bob", "roles": ["support"], "tenant": "t1", "mfa": true}',
    )
    assert out.returncode == 0
    assert "path       /api/tenants/t1/orders/7  (normalized)" in out.stdout
    assert "effective roles support, user" in out.stdout
    assert out.stdout.rstrip().endswith("decision   ALLOW (200)")

    out = sidecar(
        "policy", "explain", "--policy", "policies", "--method", "GET", "--path", "/api/../../etc"
    )
    assert out.returncode == 0
    assert "BAD_REQUEST (400 bad_request), reason path_above_root" in out.stdout

    bad = sidecar(
        "policy",
        "explain",
        "--policy",
        "policies",
        "--method",
        "GET",
        "--path",
        "/x",
        "--identity",
        "{nope",
    )
    assert bad.returncode == 2
    assert "--identity: not JSON" in bad.stderr
