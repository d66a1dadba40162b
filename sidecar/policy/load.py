"""Read policy YAML (a file or a folder of files), validate it and compile a Policy.

Every error names file:line and the key at fault. Files load in name order; `*_test.yaml`
files beside the policies are test cases, not policy, and are skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sidecar import yamldoc
from sidecar.auth.rbac import PERMISSION_RE, RoleError, covering, normalize_permission, role_closure
from sidecar.errors import PolicyError
from sidecar.policy.match import PathMatcher, PatternError, parse_pattern
from sidecar.policy.model import (
    CREDENTIAL_KINDS,
    PermissionNeed,
    Policy,
    Requirement,
    Role,
    Rule,
    Template,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9\-_]*$")
_TEMPLATE_VAR = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_ROLE_KEYS = {"permissions", "inherits", "description"}
_RULE_KEYS = {
    "name",
    "paths",
    "methods",
    "public",
    "deny",
    "authn",
    "require",
    "mode",
    "description",
}
_REQUIRE_KEYS = {"permissions", "roles", "tenant", "subject", "mfa", "any_of"}


def policy_files(path: Path) -> list[Path]:
    """The policy files at `path`: the file itself, or the folder's *.yaml/*.yml by name."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml")
            and not p.stem.endswith("_test")
            and not p.name.startswith(".")
            and p.is_file()
        )
        return files
    if path.is_file():
        return [path]
    raise PolicyError(str(path), "no such policy file or folder")


def read_sources(path: Path) -> list[tuple[str, str]]:
    """(file name, text) of every policy file at `path`, read once."""
    sources = []
    for file in policy_files(path):
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(str(file), f"cannot read: {exc}") from None
    return sources


def load_policy(path: Path) -> Policy:
    """Load, validate and compile the policy at `path` (a file or a folder)."""
    return compile_sources(read_sources(path))


def compile_sources(
    sources: list[tuple[str, str]], errors: list[PolicyError] | None = None
) -> Policy:
    """Compile already-read policy texts (file name, text) into a Policy.

    Without `errors`, the first error is raised. With a list, every error found is
    appended and the faulty role, rule or file is left out (for `policy check`).
    """

    def fail(exc: PolicyError) -> None:
        if errors is None:
            raise exc
        errors.append(exc)

    roles: dict[str, Role] = {}
    raw_rules: list[tuple[yamldoc.LocatedDict, str]] = []
    digest = hashlib.sha256()
    for name, text in sources:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        try:
            doc = yamldoc.parse(text, name)
        except yamldoc.YamlError as exc:
            source, _, message = str(exc).partition(": ")
            fail(PolicyError(source, message))
            continue
        if doc is None:
            continue
        if not isinstance(doc, yamldoc.LocatedDict):
            fail(PolicyError(f"{name}:1", "expected a mapping with `roles` and/or `rules`"))
            continue
        for key in doc:
            if key not in ("roles", "rules"):
                fail(PolicyError(doc.where(key), f"unknown key '{key}' (expected roles, rules)"))
        _read_roles(doc.get("roles"), doc, roles, fail)
        rules_node = doc.get("rules")
        if rules_node is None:
            continue
        if not isinstance(rules_node, yamldoc.LocatedList):
            fail(PolicyError(doc.where("rules"), "rules: expected a list of rules"))
            continue
        for i, item in enumerate(rules_node):
            if not isinstance(item, yamldoc.LocatedDict):
                fail(PolicyError(rules_node.where(i), "rules: each rule must be a mapping"))
                continue
            raw_rules.append((item, rules_node.where(i)))

    while True:
        try:
            closure = role_closure({name: role.inherits for name, role in roles.items()})
            break
        except RoleError as exc:
            fail(PolicyError(roles[exc.role].source, f"roles.{exc.role}: {exc}"))
            for name in exc.involved:  # collecting: leave the faulty roles out, look again
                del roles[name]
    granted = {
        name: frozenset().union(*(roles[r].permissions for r in members))
        for name, members in closure.items()
    }

    rules: list[Rule] = []
    matcher = PathMatcher()
    names: dict[str, str] = {}
    for node, where in raw_rules:
        index = len(rules)
        try:
            rule = _read_rule(node, where, index, roles)
        except PolicyError as exc:
            fail(exc)
            continue
        if rule.name in names:
            fail(
                PolicyError(
                    node.where("name"),
                    f"name: rule '{rule.name}' is already defined at {names[rule.name]}",
                )
            )
            continue
        names[rule.name] = node.where("name")
        for text in rule.paths:
            keys, pattern = parse_pattern(text, index)
            matcher.add(keys, pattern)
        rules.append(rule)

    return Policy(
        rules=tuple(rules),
        roles=roles,
        role_closure=closure,
        role_permissions=granted,
        matcher=matcher,
        sources=tuple(name for name, _ in sources),
        digest=digest.hexdigest(),
        rule_names=frozenset(names),
    )


def _read_roles(
    node: Any,
    doc: yamldoc.LocatedDict,
    roles: dict[str, Role],
    fail: Callable[[PolicyError], None],
) -> None:
    if node is None:
        return
    if not isinstance(node, yamldoc.LocatedDict):
        fail(PolicyError(doc.where("roles"), "roles: expected a mapping of role names"))
        return
    for name, spec in node.items():
        try:
            _read_role(node, name, spec, roles)
        except PolicyError as exc:
            fail(exc)


def _read_role(node: yamldoc.LocatedDict, name: str, spec: Any, roles: dict[str, Role]) -> None:
    where = node.where(name)
    if not _NAME.match(name):
        raise PolicyError(where, f"roles: bad role name {name!r}")
    if name in roles:
        raise PolicyError(where, f"roles.{name}: already defined at {roles[name].source}")
    if spec is None:
        spec = yamldoc.LocatedDict(node.source, node.lines[name])
    if not isinstance(spec, yamldoc.LocatedDict):
        raise PolicyError(where, f"roles.{name}: expected a mapping")
    for key in spec:
        if key not in _ROLE_KEYS:
            raise PolicyError(spec.where(key), f"roles.{name}: unknown key '{key}'")
    perms = _permissions(spec, "permissions", f"roles.{name}.permissions")
    inherits = _string_list(spec, "inherits", f"roles.{name}.inherits")
    roles[name] = Role(
        name=name,
        permissions=frozenset(normalize_permission(p) for p in perms),
        inherits=tuple(inherits),
        source=where,
    )


def _string_list(node: yamldoc.LocatedDict, key: str, label: str) -> list[str]:
    value = node.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(node.where(key), f"{label}: expected a list of names")
    return list(value)


def _permissions(node: yamldoc.LocatedDict, key: str, label: str) -> list[str]:
    perms = _string_list(node, key, label)
    for p in perms:
        if not PERMISSION_RE.match(p):
            raise PolicyError(
                node.where(key), f"{label}: bad permission {p!r} (expected action:resource or *)"
            )
    return perms


def _bool(node: yamldoc.LocatedDict, key: str, label: str) -> bool:
    value = node.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(node.where(key), f"{label}: expected true or false, got {value!r}")
    return value


def _template(
    node: yamldoc.LocatedDict, key: str, label: str, variables: frozenset[str]
) -> Template:
    value = node.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise PolicyError(node.where(key), f"{label}: expected a value or {{path_variable}}")
    var = _TEMPLATE_VAR.match(value)
    if var:
        if var.group(1) not in variables:
            raise PolicyError(
                node.where(key),
                f"{label}: {{{var.group(1)}}} is not a variable of every path of this rule",
            )
        return Template(var=var.group(1))
    if "{" in value or "}" in value:
        raise PolicyError(node.where(key), f"{label}: bad template {value!r}")
    return Template(literal=value)


def _requirement(
    node: Any,
    where: str,
    label: str,
    roles: Mapping[str, Role],
    variables: frozenset[str],
) -> Requirement:
    if not isinstance(node, yamldoc.LocatedDict):
        raise PolicyError(where, f"{label}: expected a mapping")
    for key in node:
        if key not in _REQUIRE_KEYS:
            raise PolicyError(
                node.where(key),
                f"{label}: unknown key '{key}' (expected {', '.join(sorted(_REQUIRE_KEYS))})",
            )
    perms = _permissions(node, "permissions", f"{label}.permissions")
    role_names: frozenset[str] | None = None
    if "roles" in node:
        listed = _string_list(node, "roles", f"{label}.roles")
        if not listed:
            raise PolicyError(node.where("roles"), f"{label}.roles: list at least one role")
        for r in listed:
            if r not in roles:
                raise PolicyError(node.where("roles"), f"{label}.roles: unknown role '{r}'")
        role_names = frozenset(listed)
    tenant = _template(node, "tenant", f"{label}.tenant", variables) if "tenant" in node else None
    subject = (
        _template(node, "subject", f"{label}.subject", variables) if "subject" in node else None
    )
    mfa = _bool(node, "mfa", f"{label}.mfa")
    branches: list[Requirement] = []
    if "any_of" in node:
        raw = node["any_of"]
        if not isinstance(raw, yamldoc.LocatedList) or not raw:
            raise PolicyError(node.where("any_of"), f"{label}.any_of: expected a list of branches")
        for i, branch in enumerate(raw):
            branches.append(
                _requirement(branch, raw.where(i), f"{label}.any_of[{i}]", roles, variables)
            )
    if not node:
        raise PolicyError(where, f"{label}: empty requirement (remove it, or list conditions)")
    return Requirement(
        permissions=tuple(PermissionNeed(p, covering(p)) for p in perms),
        roles=role_names,
        tenant=tenant,
        subject=subject,
        mfa=mfa,
        any_of=tuple(branches),
    )


def _read_rule(
    node: yamldoc.LocatedDict, where: str, index: int, roles: Mapping[str, Role]
) -> Rule:
    name = node.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PolicyError(
            node.where("name"), f"rules[{index}].name: every rule needs a simple name"
        )
    for key in node:
        if key not in _RULE_KEYS:
            raise PolicyError(
                node.where(key),
                f"rule '{name}': unknown key '{key}' (expected {', '.join(sorted(_RULE_KEYS))})",
            )
    label = f"rule '{name}'"
    paths = _string_list(node, "paths", f"{label}.paths")
    if not paths:
        raise PolicyError(
            node.where("paths") if "paths" in node else where,
            f"{label}.paths: list at least one path pattern",
        )
    variables: frozenset[str] | None = None
    for text in paths:
        try:
            _, pattern = parse_pattern(text, index)
        except PatternError as exc:
            raise PolicyError(node.where("paths"), f"{label}.paths: {exc}") from None
        variables = pattern.variables if variables is None else variables & pattern.variables
    methods: frozenset[str] | None = None
    if "methods" in node:
        listed = _string_list(node, "methods", f"{label}.methods")
        for m in listed:
            if not _METHOD.match(m):
                raise PolicyError(
                    node.where("methods"),
                    f"{label}.methods: bad method {m!r} (methods are upper case, e.g. GET)",
                )
        if not listed:
            raise PolicyError(node.where("methods"), f"{label}.methods: list at least one method")
        methods = frozenset(listed) | ({"HEAD"} if "GET" in listed else frozenset())
    public = _bool(node, "public", f"{label}.public")
    deny = _bool(node, "deny", f"{label}.deny")
    authn: frozenset[str] | None = None
    if "authn" in node:
        kinds = _string_list(node, "authn", f"{label}.authn")
        for k in kinds:
            if k not in CREDENTIAL_KINDS:
                raise PolicyError(
                    node.where("authn"),
                    f"{label}.authn: unknown credential kind "
                    f"'{k}' (expected {', '.join(sorted(CREDENTIAL_KINDS))})",
                )
        if not kinds:
            raise PolicyError(node.where("authn"), f"{label}.authn: list at least one kind")
        authn = frozenset(kinds)
    require = None
    if "require" in node:
        require = _requirement(
            node["require"],
            node.where("require"),
            f"{label}.require",
            roles,
            variables or frozenset(),
        )
    mode = node.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        raise PolicyError(
            node.where("mode"), f"{label}.mode: expected enforce or shadow, got {mode!r}"
        )
    if public and deny:
        raise PolicyError(node.where("deny"), f"{label}: a rule cannot be both public and deny")
    if (public or deny) and (require is not None or authn is not None):
        key = "require" if require is not None else "authn"
        raise PolicyError(
            node.where(key),
            f"{label}.{key}: has no effect on a {'public' if public else 'deny'} rule",
        )
    return Rule(
        name=name,
        index=index,
        paths=tuple(paths),
        methods=methods,
        source=where,
        public=public,
        deny=deny,
        authn=authn,
        require=require,
        mode=mode,
    )
