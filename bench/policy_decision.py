"""Benchmark: the cost of one policy decision (match + verdict) for 10, 100 and 500 rules.

    python bench/policy_decision.py

Each policy has N rules over distinct API prefixes with path variables, permission and
role requirements; the request hits the LAST rule (the worst case for a linear scan) with
an identity whose roles inherit what it needs. Prints the median microseconds per decision
over repeated timeit runs. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.auth.identity import Identity
from sidecar.policy.decide import match, verdict
from sidecar.policy.load import compile_sources


def policy_text(n: int) -> str:
    lines = [
        "roles:",
        "  reader: {permissions: ['read:*']}",
        "  clerk: {inherits: [reader], permissions: ['write:orders', 'export:csv']}",
        "  manager: {inherits: [clerk], permissions: ['delete:orders']}",
        "rules:",
    ]
    for i in range(n):
        kind = i % 4
        lines.append(f"  - name: r{i}")
        if kind == 0:
            lines.append(f"    paths: ['/svc{i}/items/{{id}}', '/svc{i}/items']")
            lines.append("    methods: [GET]")
            lines.append("    require: {permissions: ['read:items']}")
        elif kind == 1:
            lines.append(f"    paths: ['/svc{i}/orders/{{order}}/**']")
            lines.append("    methods: [POST, PUT]")
            lines.append("    require: {roles: [clerk], permissions: ['write:orders']}")
        elif kind == 2:
            lines.append(f"    paths: ['/svc{i}/tenants/{{tenant}}/*']")
            lines.append(
                "    require: {tenant: '{tenant}', any_of: [{roles: [manager]}, "
                "{permissions: ['export:csv']}]}"
            )
        else:
            lines.append(f"    paths: ['/svc{i}/public/**']")
            lines.append("    public: true")
    return "\n".join(lines) + "\n"


def request_for(n: int) -> tuple[str, str]:
    i = n - 1
    while i % 4 != 2:  # the last tenant rule: the deepest requirement
        i -= 1
    return "GET", f"/svc{i}/tenants/t1/report"


def bench(n: int) -> float:
    policy = compile_sources([(f"bench-{n}.yaml", policy_text(n))])
    method, path = request_for(n)
    identity = Identity("u1", "jwt", tenant="t1", roles=("clerk",))

    def decide() -> None:
        found = match(policy, method, path)
        assert found is not None
        rule, params = found
        status, _ = verdict(policy, rule, params, identity)
        assert status == 200

    decide()
    number = 20000
    runs = timeit.repeat(decide, number=number, repeat=7)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    results = {n: bench(n) for n in (10, 100, 500)}
    print("| rules | median µs per decision |")
    print("|------:|-----------------------:|")
    for n, us in results.items():
        print(f"| {n} | {us:.2f} |")
    print(f"\n500 rules / 10 rules = {results[500] / results[10]:.2f}x")


if __name__ == "__main__":
    main()
