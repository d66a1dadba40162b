"""The `dotmac-sidecar` command (contract section 1): parse, call, print, exit code."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.errors import SidecarError


def _run(args: argparse.Namespace) -> int:
    from sidecar import config
    from sidecar.app import run

    flags: dict[str, Any] = {}
    for key in ("listen", "upstream", "policy", "admin_listen"):
        value = getattr(args, key)
        if value is not None:
            flags[key] = value
    cfg = config.load(Path(args.config) if args.config else None, flags=flags)
    return run(cfg)


def _inject_webhook(args: argparse.Namespace) -> int:
    from aiohttp import web

    from sidecar.config import parse_host_port
    from sidecar.k8s.webhook import build_app, load_defaults, tls_context

    defaults, by_default = load_defaults(Path(args.config) if args.config else None)
    context = tls_context(Path(args.tls_cert), Path(args.tls_key))
    try:
        listen = parse_host_port(args.listen)
    except ValueError as exc:
        raise SidecarError(f"--listen: {exc}") from None
    web.run_app(
        build_app(defaults, inject_by_default=by_default),
        host=listen.host,
        port=listen.port,
        ssl_context=context,
        print=None,
        access_log=None,
        shutdown_timeout=10,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(args.port, args.admin_port)


def _token(args: argparse.Namespace) -> int:
    from sidecar.auth.jwt import JWTService
    from sidecar.config import parse_duration

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise SidecarError(f"--ttl: {exc}") from None
    listed = {
        "roles": [r for r in (args.roles or "").split(",") if r],
        "permissions": [p for p in (args.permissions or "").split(",") if p],
    }
    if args.secret_env:
        secret = os.environ.get(args.secret_env)
        if not secret:
            raise SidecarError(f"--secret-env: environment variable {args.secret_env} is not set")
        service = JWTService(
            secret_key=secret,
            algorithm=args.algorithm or "HS256",
            issuer=args.issuer,
            audience=args.audience,
        )
    else:
        try:
            pem = Path(args.key).read_bytes()
        except OSError as exc:
            raise SidecarError(f"--key: cannot read {args.key}: {exc.strerror}") from None
        try:
            service = JWTService(
                algorithm=args.algorithm or "RS256",
                private_key=pem,
                issuer=args.issuer,
                audience=args.audience,
            )
        except (ValueError, TypeError) as exc:
            raise SidecarError(f"--key: {args.key} is not a usable private key ({exc})") from None
    token = service.create_access_token(
        args.sub,
        permissions=listed["permissions"] or None,
        roles=listed["roles"] or None,
        tenant_id=args.tenant,
        expires_delta=ttl,
        extra_claims={"amr": ["pwd", "mfa"]} if args.mfa else None,
    )
    print(token)
    return 0


def _file_line(source: str) -> tuple[str, int]:
    file, _, line = source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (source, 0)


def _policy_check(args: argparse.Namespace) -> int:
    from sidecar.errors import PolicyError
    from sidecar.policy.lint import warnings
    from sidecar.policy.load import compile_sources, read_sources

    errors: list[PolicyError] = []
    policy = compile_sources(read_sources(Path(args.path)), errors)
    for err in sorted(errors, key=lambda e: _file_line(e.source)):
        print(f"{err.source}: error: {err.detail}")
    notes = warnings(policy)
    for line in notes:
        print(line)
    print(
        f"{len(errors)} errors, {len(notes)} warnings in {len(policy.sources)} files, "
        f"{len(policy.rules)} rules, {len(policy.roles)} roles"
    )
    if errors:
        return 1
    return 1 if (args.strict and notes) else 0


def _policy_test(args: argparse.Namespace) -> int:
    from sidecar.policy.load import load_policy
    from sidecar.policy.testing import load_cases, run_cases, test_files
    from sidecar.proxy.paths import canonical

    path = Path(args.path)
    policy = load_policy(path)
    files = test_files(path)
    if not files:
        raise SidecarError(f"{path}: no *_test.yaml files found beside the policy")
    lines, passed, failed = run_cases(policy, canonical, load_cases(files))
    for line in lines:
        print(line)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _policy_explain(args: argparse.Namespace) -> int:
    from sidecar.policy.load import load_policy
    from sidecar.policy.testing import explain, parse_identity_json
    from sidecar.proxy.paths import canonical

    try:
        identity = parse_identity_json(args.identity) if args.identity else None
    except ValueError as exc:
        print(f"dotmac-sidecar: {exc}", file=sys.stderr)
        return 2
    policy = load_policy(Path(args.policy))
    print(explain(policy, canonical, args.method, args.path, identity))
    return 0


def _key_admin(args: argparse.Namespace) -> Any:
    from sidecar import config
    from sidecar.auth.apikeys import FileKeyStore, KeyAdmin, RedisKeyStore

    cfg = config.load(Path(args.config) if args.config else None)
    keys = cfg.auth.api_keys
    if keys is None:
        raise SidecarError(
            f"{cfg.source or 'the configuration'}: no API key store (set auth.api_keys; "
            "pass --config FILE or DOTMAC_CONFIG)"
        )
    if keys.store == "redis":
        return KeyAdmin(RedisKeyStore(cfg.auth.redis_url))
    assert keys.file is not None
    return KeyAdmin(FileKeyStore(keys.file))


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def _when(ts: float | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _apikey(args: argparse.Namespace) -> int:
    import asyncio

    from sidecar.auth import apikeys
    from sidecar.config import parse_duration

    def duration(flag: str, value: str | None) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise SidecarError(f"{flag}: {exc}") from None

    async def act() -> int:
        admin = _key_admin(args)
        try:
            if args.apikey_command == "create":
                record, key = apikeys.created(
                    args.name,
                    subject=args.subject,
                    roles=_names(args.roles),
                    permissions=_names(args.permissions),
                    tenant=args.tenant,
                    expires_in=duration("--expires", args.expires),
                )
                await admin.put(record)
                print(key)
                print(
                    f"created API key {record.id} ({record.name}); expires "
                    f"{_when(record.expires)}. The key is shown only once.",
                    file=sys.stderr,
                )
            elif args.apikey_command == "list":
                print(
                    f"{'ID':<16}  {'NAME':<20}  {'ROLES':<20}  {'TENANT':<10}  "
                    f"{'EXPIRES':<20}  STATE"
                )
                for r in await admin.all():
                    print(
                        f"{r.id:<16}  {r.name[:20]:<20}  {','.join(r.roles)[:20] or '-':<20}  "
                        f"{(r.tenant or '-')[:10]:<10}  {_when(r.expires):<20}  {r.state()}"
                    )
            elif args.apikey_command == "revoke":
                record = await admin.get(apikeys.key_id_of(args.id))
                await admin.put(replace(record, revoked=time.time()))
                print(f"revoked API key {record.id} ({record.name})", file=sys.stderr)
            else:
                record = await admin.get(apikeys.key_id_of(args.id))
                if record.state() != "active":
                    raise SidecarError(f"API key {record.id} is {record.state()}; not rotated")
                grace = duration("--grace", args.grace) or 0.0
                new_record, key = apikeys.rotated(record, grace)
                await admin.put(new_record)
                print(key)
                print(
                    f"rotated API key {record.id}; the old secret works until "
                    f"{_when(time.time() + grace)}",
                    file=sys.stderr,
                )
        finally:
            await admin.close()
        return 0

    return asyncio.run(act())


def _secrets_rotate(args: argparse.Namespace) -> int:
    from sidecar import config
    from sidecar.app import make_provider
    from sidecar.secrets.rotation import rotate

    cfg = config.load(Path(args.config) if args.config else None)
    provider = make_provider(cfg)
    secret = rotate(provider, args.path, _names(args.field), args.length)
    fields = ", ".join(sorted(secret.data))
    print(
        f"rotated {args.path} in the {provider.name} provider: new version {secret.version} "
        f"(fields {fields}); earlier versions stay readable",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="dotmac-sidecar",
        description="Authenticate, authorize and instrument requests in front of an app.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", help="sidecar.yaml (default: $DOTMAC_CONFIG)")
    run.add_argument("--listen", help="HOST:PORT for clients (default 0.0.0.0:8000)")
    run.add_argument("--upstream", help="URL of the app (default http://127.0.0.1:8080)")
    run.add_argument("--policy", help="policy file or folder (default policies/)")
    run.add_argument(
        "--admin-listen",
        dest="admin_listen",
        help="HOST:PORT for /healthz /readyz /metrics (default 127.0.0.1:9090)",
    )
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="run an echo app behind the sidecar, print curl lines")
    demo.add_argument(
        "--port", type=int, default=8000, help="sidecar port (default 8000, or a free one)"
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=9090,
        dest="admin_port",
        help="admin port (default 9090, or a free one)",
    )
    demo.set_defaults(func=_demo)

    hook = sub.add_parser(
        "inject-webhook", help="run the Kubernetes admission webhook that injects the sidecar"
    )
    hook.add_argument("--tls-cert", dest="tls_cert", required=True, help="PEM certificate")
    hook.add_argument("--tls-key", dest="tls_key", required=True, help="PEM private key")
    hook.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default 0.0.0.0:8443)")
    hook.add_argument(
        "--config", help="injector config: the sidecar defaults the Helm chart renders"
    )
    hook.set_defaults(func=_inject_webhook)

    policy = sub.add_parser("policy", help="check, test and explain policy files")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = psub.add_parser("check", help="validate policies; warn about dead rules and roles")
    check.add_argument("path", help="policy file or folder")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.set_defaults(func=_policy_check)
    ptest = psub.add_parser("test", help="run the *_test.yaml cases beside the policies")
    ptest.add_argument("path", help="policy file or folder")
    ptest.set_defaults(func=_policy_test)
    expl = psub.add_parser("explain", help="show how the policy decides one request")
    expl.add_argument("--policy", required=True, help="policy file or folder")
    expl.add_argument("--method", required=True, help="HTTP method, e.g. GET")
    expl.add_argument("--path", required=True, help="request path as the client sends it")
    expl.add_argument("--identity", help='JSON, e.g. {"subject": "u1", "roles": ["user"]}')
    expl.set_defaults(func=_policy_explain)

    apikey = sub.add_parser("apikey", help="manage API keys in the configured key store")
    asub = apikey.add_subparsers(dest="apikey_command", required=True, metavar="ACTION")
    for name, text in (
        ("create", "create a key; prints it once on stdout"),
        ("list", "list ids, names, roles, tenant, expiry and state"),
        ("revoke", "revoke a key (by id or full key)"),
        ("rotate", "new secret for a key; the old one works for --grace"),
    ):
        action = asub.add_parser(name, help=text)
        action.add_argument(
            "--config", help="sidecar.yaml with auth.api_keys (default: $DOTMAC_CONFIG)"
        )
        action.set_defaults(func=_apikey)
        if name == "create":
            action.add_argument("--name", required=True, help="what the key is for")
            action.add_argument("--subject", help="X-Auth-Subject (default apikey:<id>)")
            action.add_argument("--roles", help="comma-separated roles")
            action.add_argument("--permissions", help="comma-separated permissions")
            action.add_argument("--tenant", help="tenant id")
            action.add_argument("--expires", help="lifetime, e.g. 30d (default: never)")
        if name in ("revoke", "rotate"):
            action.add_argument("id", help="the key's public id, or the full key")
        if name == "rotate":
            action.add_argument(
                "--grace", default="24h", help="old secret stays valid (default 24h)"
            )

    secrets_cmd = sub.add_parser("secrets", help="manage secrets in the configured provider")
    ssub = secrets_cmd.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    srot = ssub.add_parser("rotate", help="write a new random version of a secret")
    srot.add_argument("path", help="secret path, e.g. database/orders")
    srot.add_argument("--field", help="comma-separated fields to renew (default: all)")
    srot.add_argument("--length", type=int, default=32, help="random bytes per value")
    srot.add_argument("--config", help="sidecar.yaml (default: $DOTMAC_CONFIG)")
    srot.set_defaults(func=_secrets_rotate)

    token = sub.add_parser("token", help="mint a token for local testing")
    key = token.add_mutually_exclusive_group(required=True)
    key.add_argument("--secret-env", help="variable holding the HMAC secret")
    key.add_argument("--key", help="PEM private key file (RS*/ES*/EdDSA)")
    token.add_argument("--sub", required=True, help="subject")
    token.add_argument("--roles", help="comma-separated roles")
    token.add_argument("--permissions", help="comma-separated permissions")
    token.add_argument("--tenant", help="tenant id")
    token.add_argument("--ttl", default="15m", help="lifetime, e.g. 15m (default)")
    token.add_argument("--issuer", help="iss claim")
    token.add_argument("--audience", help="aud claim")
    token.add_argument("--algorithm", help="HS256 (default with --secret-env), RS256 (--key)")
    token.add_argument("--mfa", action="store_true", help="mark the token as MFA-completed")
    token.set_defaults(func=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dotmac-sidecar`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SidecarError as exc:
        if args.debug:
            raise
        print(f"dotmac-sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
