"""Configuration: defaults < DOTMAC_* environment < sidecar.yaml < command-line flags.

`load()` returns a frozen `Config`; every error is a ConfigError naming where the value
came from (file:line, the variable or the flag) and the key path at fault. Unknown keys
are errors, because a typo must never silently turn protection off.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from sidecar import yamldoc
from sidecar.errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Keys of the contract that later versions implement; named precisely instead of "unknown".
_NOT_YET: dict[str, str] = {}


def parse_duration(value: Any) -> float:
    """'250ms', '30s', '5m', '1h', '7d' -> seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"expected a duration like '250ms', '30s' or '5m', got {value!r}")
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"expected a duration like '250ms', '30s' or '5m', got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_duration_or_zero(value: Any) -> float:
    """A duration, or 0 / "0" / "off" for "never"."""
    if value in (0, "0", "off"):
        return 0.0
    return parse_duration(value)


@dataclass(frozen=True, slots=True)
class HostPort:
    """An address to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(value: Any) -> HostPort:
    """'0.0.0.0:8000', '[::1]:8000' or ':8000' -> HostPort."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return HostPort(host, port)


@dataclass(frozen=True, slots=True)
class Upstream:
    """The protected app."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_upstream(value: Any) -> Upstream:
    """'http://127.0.0.1:8080' -> Upstream (http only: the app is local)."""
    try:
        url = URL(str(value))
    except ValueError as exc:
        raise ValueError(f"not a URL: {value!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected http://HOST:PORT, got {value!r}")
    if url.path not in ("", "/") or url.query_string:
        raise ValueError(f"the upstream URL must not have a path or query, got {value!r}")
    port = url.port or (443 if url.scheme == "https" else 80)
    return Upstream(url.scheme, url.host, port)


@dataclass(frozen=True, slots=True)
class ClaimMap:
    """Which JWT claim holds each part of the identity."""

    subject: str = "sub"
    roles: str = "roles"
    permissions: str = "permissions"
    tenant: str = "tenant_id"
    mfa: str = "amr"


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted token issuer."""

    issuer: str | None  # None: any `iss` (the DOTMAC_JWT_SECRET_KEY shortcut)
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    public_key_file: Path | None = None
    secret_env: str | None = None
    secret: bytes | None = field(default=None, repr=False)
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    secret_path: str | None = None  # HMAC secret from the secrets provider ...
    secret_field: str = "value"  # ... this field of it
    secret_grace: float = 86400.0  # a rotated-out secret still verifies this long
    leeway: float = 30.0
    claims: ClaimMap = ClaimMap()
    query_param: str = ""
    cookie: str = ""
    mfa_values: tuple[str, ...] = ("mfa",)
    required_claims: tuple[str, ...] = ("exp", "sub")


@dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    """Where API keys are kept and which header carries them."""

    store: str = "file"  # file | redis
    file: Path | None = None
    header: str = "X-API-Key"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How callers authenticate."""

    jwt: tuple[IssuerConfig, ...] = ()
    api_keys: ApiKeysConfig | None = None
    redis_url: str = ""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Request-path limits and behaviour."""

    connect_timeout: float = 2.0
    upstream_timeout: float = 30.0
    max_header_bytes: int = 16384
    identity_header_prefix: str = "X-Auth-"
    strip_authorization: bool = False
    allow_encoded_slashes: bool = False
    header_read_timeout: float = 10.0
    body_idle_timeout: float = 60.0
    max_body_bytes: int = 0
    max_connections: int = 1024
    drain_timeout: float = 25.0
    max_target_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    """Logs, metrics and traces."""

    service_name: str = "dotmac-sidecar"
    log_level: str = "INFO"
    log_format: str = "json"
    access_log: bool = True
    otlp_endpoint: str = ""  # OTLP/HTTP base URL; "" exports nothing
    trace_sample_ratio: float = 1.0
    access_log_sample_ratio: float = 1.0  # allowed, non-5xx requests only


@dataclass(frozen=True, slots=True)
class VaultConfig:
    """How to reach and log in to Vault / OpenBao."""

    url: str
    auth_method: str = "kubernetes"  # kubernetes | approle | token
    role: str | None = None
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    auth_mount: str | None = None
    kv_mount: str = "secret"
    transit_mount: str = "transit"


@dataclass(frozen=True, slots=True)
class SecretHeader:
    """A header the app receives on allowed requests, filled from a secret field."""

    name: str
    secret: str  # path; may contain {tenant}
    field: str
    rules: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class SecretFile:
    """A file rendered from a secret, rewritten atomically when the secret changes."""

    path: Path
    secret: str
    template: str
    mode: int = 0o400
    on_change_post: str = ""  # POST here after a change (the app's reload URL)
    on_change_signal: str = ""  # or send this signal (HUP, USR1, ...) ...
    pid_file: Path | None = None  # ... to the pid in this file


@dataclass(frozen=True, slots=True)
class SecretsConfig:
    """Where secrets come from and where they go."""

    provider: str = "file"  # file | env | vault
    file: Path = Path("secrets.yaml")
    vault: VaultConfig | None = None
    refresh_interval: float = 60.0
    headers: tuple[SecretHeader, ...] = ()
    files: tuple[SecretFile, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of one sidecar."""

    listen: HostPort = HostPort("0.0.0.0", 8000)
    upstream: Upstream = Upstream("http", "127.0.0.1", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 9090)
    policy: Path = Path("policies")
    policy_reload_interval: float = 1.0  # 0: no hot reload
    policy_tests: str = "warn"  # enforce | warn | off: the *_test.yaml cases beside the policy
    proxy: ProxyConfig = ProxyConfig()
    auth: AuthConfig = AuthConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    secrets: SecretsConfig = SecretsConfig()
    audit_sink: str = "stdout"  # stdout | file:PATH
    workers: int = 1  # processes sharing the listen port (SO_REUSEPORT)
    source: Path | None = None


# ---------------------------------------------------------------------------------------
# Reading


Origin = str  # "file:line", "DOTMAC_X" or "--flag"


class _Reader:
    """Reads one mapping of the config, tracking which keys were used."""

    def __init__(
        self,
        data: Mapping[str, Any] | None,
        path: str,
        overrides: Mapping[str, tuple[Any, Origin]],
        fallbacks: Mapping[str, tuple[Any, Origin]],
        origin: Origin,
    ) -> None:
        self.data: Mapping[str, Any] = data or {}
        self.path = path
        self.overrides = overrides
        self.fallbacks = fallbacks
        self.origin = origin
        self.seen: set[str] = set()

    def _full(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _where(self, key: str) -> Origin:
        if isinstance(self.data, yamldoc.LocatedDict):
            return self.data.where(key)
        return self.origin

    def fail(self, key: str, message: str) -> ConfigError:
        """An error about `key` of this mapping."""
        return ConfigError(f"{self._where(key)}: {self._full(key)}: {message}")

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        """The value of `key` from flags, file or environment, converted; else default."""
        self.seen.add(key)
        full = self._full(key)
        if full in self.overrides:
            raw, origin = self.overrides[full]
        elif key in self.data:
            raw, origin = self.data[key], self._where(key)
        elif full in self.fallbacks:
            raw, origin = self.fallbacks[full]
        else:
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: {full}: {exc}") from None

    def section(self, key: str) -> _Reader:
        """The nested mapping at `key` (empty when absent)."""
        self.seen.add(key)
        raw = self.data.get(key)
        if raw is not None and not isinstance(raw, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(raw).__name__}")
        return _Reader(raw, self._full(key), self.overrides, self.fallbacks, self._where(key))

    def finish(self) -> None:
        """Reject keys nobody read: typos must not pass silently."""
        for key in self.data:
            if key in self.seen:
                continue
            full = self._full(key)
            if full in _NOT_YET:
                raise self.fail(key, f"{_NOT_YET[full]} is not available in this version yet")
            raise self.fail(key, "unknown key")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"expected true or false, got {value!r}")


def _int(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}, got {number}")
        return number

    return convert


def _ratio(value: Any) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return number


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _choice(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return convert


def _path(base: Path) -> Callable[[Any], Path]:
    def convert(value: Any) -> Path:
        path = Path(_str(value)).expanduser()
        return path if path.is_absolute() else base / path

    return convert


def _url(value: Any) -> str:
    text = _str(value)
    try:
        url = URL(text)
    except ValueError:
        raise ValueError(f"not a URL: {value!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return text


def _header_name(value: Any) -> str:
    text = _str(value)
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError(f"expected a header name, got {value!r}")
    return text


def _prefix(value: Any) -> str:
    text = _str(value)
    if not re.fullmatch(r"[A-Za-z0-9-]+-", text):
        raise ValueError(f"expected a header-name prefix ending in '-', got {value!r}")
    return text


_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
_SECRET_PATH = re.compile(r"^[A-Za-z0-9_.\-/{}]+$")


def _sink(value: Any) -> str:
    text = _str(value)
    if text == "stdout" or (text.startswith("file:") and len(text) > 5):
        return text
    raise ValueError(f"expected stdout or file:PATH, got {value!r}")


def _secret_path(value: Any) -> str:
    text = _str(value)
    if not _SECRET_PATH.match(text) or ".." in text or text.startswith("/"):
        raise ValueError(f"expected a secret path like database/orders, got {value!r}")
    if text.replace("{tenant}", "").count("{") or text.replace("{tenant}", "").count("}"):
        raise ValueError(f"only {{tenant}} may be templated in a secret path, got {value!r}")
    return text


def _mode(value: Any) -> int:
    text = str(value)
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f'expected a file mode like "0400", got {value!r}')
    return int(text, 8)


def _secrets(r: _Reader, base: Path, env: Mapping[str, str]) -> SecretsConfig:
    d = SecretsConfig()
    provider = r.get("provider", _choice("file", "env", "vault"), d.provider)
    file = r.get("file", _path(base), base / d.file)
    interval = r.get("refresh_interval", parse_duration, d.refresh_interval)
    vault: VaultConfig | None = None
    if provider == "vault" or "vault" in r.data:
        v = r.section("vault")
        url = v.get("url", _url, env.get("DOTMAC_VAULT_URL", ""))
        if not url:
            raise v.fail("url", "set secrets.vault.url (or DOTMAC_VAULT_URL)")
        a = v.section("auth")
        method = a.get(
            "method",
            _choice("kubernetes", "approle", "token"),
            "token" if env.get("DOTMAC_VAULT_TOKEN") else "kubernetes",
        )
        # DOTMAC_VAULT_ROLE: set by the injector from the pod's vault-role annotation
        role = a.get("role", _str, env.get("DOTMAC_VAULT_ROLE") or None)
        role_id = a.get("role_id", _str, None)
        secret_id_env = a.get("secret_id_env", _str, "DOTMAC_VAULT_SECRET_ID")
        token_env = a.get("token_env", _str, "DOTMAC_VAULT_TOKEN")
        jwt_path = a.get("jwt_path", _str, VaultConfig("x").jwt_path)
        auth_mount = a.get("mount", _str, None)
        a.finish()
        token = env.get(token_env) or None
        secret_id = env.get(secret_id_env) or None
        if method == "token" and not token:
            raise a.fail("method", f"token auth needs the token in {token_env}")
        if method == "approle" and not (role_id and secret_id):
            raise a.fail(
                "method", f"approle auth needs role_id and the secret id in {secret_id_env}"
            )
        if method == "kubernetes" and not role:
            raise a.fail("method", "kubernetes auth needs a role")
        vault = VaultConfig(
            url=url,
            auth_method=method,
            role=role,
            role_id=role_id,
            secret_id=secret_id,
            token=token,
            jwt_path=jwt_path,
            auth_mount=auth_mount,
            kv_mount=v.get("kv_mount", _str, env.get("DOTMAC_VAULT_MOUNT_POINT", "secret")),
            transit_mount=v.get("transit_mount", _str, "transit"),
        )
        v.finish()
    headers: list[SecretHeader] = []
    r.seen.add("headers")
    for i, item in enumerate(r.data.get("headers") or []):
        h = _Reader(
            item if isinstance(item, Mapping) else None,
            f"secrets.headers[{i}]",
            {},
            {},
            _where_in(r.data.get("headers"), i, r.origin),
        )
        if not isinstance(item, Mapping):
            raise h.fail("name", "expected {name, secret, field}")
        name = h.get("name", _header_name, "")
        secret = h.get("secret", _secret_path, "")
        fld = h.get("field", _str, "")
        every_rule: tuple[str, ...] = ("*",)
        rules = h.get("rules", _str_list, every_rule)
        h.finish()
        if not (name and secret and fld):
            raise h.fail("name", "every secret header needs name, secret and field")
        headers.append(SecretHeader(name, secret, fld, rules))
    files: list[SecretFile] = []
    r.seen.add("files")
    for i, item in enumerate(r.data.get("files") or []):
        f = _Reader(
            item if isinstance(item, Mapping) else None,
            f"secrets.files[{i}]",
            {},
            {},
            _where_in(r.data.get("files"), i, r.origin),
        )
        if not isinstance(item, Mapping):
            raise f.fail("path", "expected {path, secret, template}")
        path = f.get("path", _path(base), None)
        secret = f.get("secret", _secret_path, "")
        template = f.get("template", _str, "")
        mode = f.get("mode", _mode, 0o400)
        oc = f.section("on_change")
        post = oc.get("post", _url, "")
        sig = oc.get("signal", _choice("HUP", "USR1", "USR2", "TERM", "INT"), "")
        pid_file = oc.get("pid_file", _path(base), None)
        oc.finish()
        f.finish()
        if path is None or not secret or not template:
            raise f.fail("path", "every secret file needs path, secret and template")
        if "{tenant}" in secret:
            raise f.fail("secret", "a rendered file cannot depend on a request's tenant")
        if sig and pid_file is None:
            raise f.fail("on_change", "signal needs pid_file")
        files.append(SecretFile(path, secret, template, mode, post, sig, pid_file))
    r.finish()
    return SecretsConfig(
        provider=provider,
        file=file,
        vault=vault,
        refresh_interval=interval,
        headers=tuple(headers),
        files=tuple(files),
    )


def _where_in(node: Any, index: int, fallback: str) -> str:
    if isinstance(node, yamldoc.LocatedList):
        return node.where(index)
    return fallback


def _issuer(
    item: Any, index: int, where: Origin, base: Path, env: Mapping[str, str]
) -> IssuerConfig:
    key = f"auth.jwt[{index}]"
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: {key}: expected a mapping")
    r = _Reader(item, key, {}, {}, where)
    issuer = r.get("issuer", _str, "")
    if not issuer:
        raise r.fail("issuer", "an issuer is required (the exact `iss` of its tokens)")
    none: tuple[str, ...] = ()
    audiences = r.get("audiences", _str_list, none)
    algorithms = r.get("algorithms", _str_list, none)
    jwks_url = r.get("jwks_url", _url, None)
    public_key_file = r.get("public_key_file", _path(base), None)
    secret_env = r.get("secret_env", _str, None)
    secret_path: str | None = None
    secret_field = "value"
    if "secret" in item:
        sr = r.section("secret")
        secret_path = sr.get("path", _secret_path, None)
        secret_field = sr.get("field", _str, "value")
        sr.finish()
        if secret_path is None or "{tenant}" in secret_path:
            raise r.fail("secret", "expected {path: SECRET_PATH, field: FIELD}")
    secret_grace = r.get("secret_grace", parse_duration, 86400.0)
    leeway = r.get("leeway", parse_duration, 30.0)
    c = r.section("claims")
    claims = ClaimMap(
        subject=c.get("subject", _str, "sub"),
        roles=c.get("roles", _str, "roles"),
        permissions=c.get("permissions", _str, "permissions"),
        tenant=c.get("tenant", _str, "tenant_id"),
        mfa=c.get("mfa", _str, "amr"),
    )
    c.finish()
    query_param = r.get("query_param", _str, "")
    cookie = r.get("cookie", _str, "")
    mfa_default: tuple[str, ...] = ("mfa",)
    required_default: tuple[str, ...] = ("exp", "sub")
    mfa_values = r.get("mfa_values", _str_list, mfa_default)
    required = r.get("required_claims", _str_list, required_default)
    jwks_refresh = r.get("jwks_refresh", parse_duration, 300.0)
    r.finish()
    return _make_issuer(
        issuer=issuer,
        audiences=audiences,
        algorithms=algorithms,
        public_key_file=public_key_file,
        secret_env=secret_env,
        jwks_url=jwks_url,
        jwks_refresh=jwks_refresh,
        secret_path=secret_path,
        secret_field=secret_field,
        secret_grace=secret_grace,
        leeway=leeway,
        claims=claims,
        query_param=query_param,
        cookie=cookie,
        mfa_values=mfa_values,
        required=required,
        origin=f"{where}: {key}",
        env=env,
    )


def _make_issuer(
    *,
    issuer: str | None,
    audiences: tuple[str, ...],
    algorithms: tuple[str, ...],
    public_key_file: Path | None,
    secret_env: str | None,
    leeway: float,
    jwks_url: str | None = None,
    jwks_refresh: float = 300.0,
    secret_path: str | None = None,
    secret_field: str = "value",
    secret_grace: float = 86400.0,
    claims: ClaimMap,
    query_param: str,
    cookie: str,
    mfa_values: tuple[str, ...],
    required: tuple[str, ...],
    origin: str,
    env: Mapping[str, str],
) -> IssuerConfig:
    sources = [x for x in (public_key_file, secret_env, jwks_url, secret_path) if x is not None]
    if len(sources) != 1:
        raise ConfigError(
            f"{origin}: set exactly one of jwks_url, public_key_file, secret_env or secret"
        )
    hmac_source = secret_env or secret_path
    if not algorithms:
        algorithms = ("HS256",) if hmac_source else ("RS256",)
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigError(f"{origin}.algorithms: 'none' is never accepted")
        if alg not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise ConfigError(f"{origin}.algorithms: unknown algorithm {alg!r}")
        if hmac_source and alg not in HMAC_ALGORITHMS:
            raise ConfigError(f"{origin}.algorithms: {alg} needs a public key, not a shared secret")
        if (public_key_file or jwks_url) and alg in HMAC_ALGORITHMS:
            raise ConfigError(
                f"{origin}.algorithms: {alg} is an HMAC algorithm and cannot be checked "
                "against a public key"
            )
    secret: bytes | None = None
    if secret_env is not None:
        value = env.get(secret_env, "")
        if not value:
            raise ConfigError(f"{origin}.secret_env: environment variable {secret_env} is not set")
        secret = value.encode()
    if public_key_file is not None and not public_key_file.is_file():
        raise ConfigError(f"{origin}.public_key_file: no such file: {public_key_file}")
    return IssuerConfig(
        issuer=issuer,
        audiences=audiences,
        algorithms=algorithms,
        public_key_file=public_key_file,
        secret_env=secret_env,
        secret=secret,
        jwks_url=jwks_url,
        jwks_refresh=jwks_refresh,
        secret_path=secret_path,
        secret_field=secret_field,
        secret_grace=secret_grace,
        leeway=leeway,
        claims=claims,
        query_param=query_param,
        cookie=cookie,
        mfa_values=mfa_values,
        required_claims=required,
    )


def _env_layer(env: Mapping[str, str]) -> dict[str, tuple[Any, Origin]]:
    layer: dict[str, tuple[Any, Origin]] = {}
    simple = {
        "DOTMAC_LISTEN": "listen",
        "DOTMAC_UPSTREAM": "upstream",
        "DOTMAC_POLICY": "policy",
        "DOTMAC_LOG_LEVEL": "observability.log_level",
        "DOTMAC_OTLP_ENDPOINT": "observability.otlp_endpoint",
        "DOTMAC_REDIS_URL": "auth.redis_url",
    }
    for var, key in simple.items():
        if env.get(var):
            layer[key] = (env[var], var)
    if env.get("DOTMAC_PROMETHEUS_PORT"):
        layer["admin_listen"] = (
            f"127.0.0.1:{env['DOTMAC_PROMETHEUS_PORT']}",
            "DOTMAC_PROMETHEUS_PORT",
        )
    return layer


def load(
    file: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from a YAML file (optional), the environment and flags.

    `flags` maps key paths (`listen`, `upstream`, `policy`, `admin_listen`) to values.
    Without `file`, DOTMAC_CONFIG names the file if set.
    """
    env = os.environ if env is None else env
    if file is None and env.get("DOTMAC_CONFIG"):
        file = Path(env["DOTMAC_CONFIG"])
    data: Mapping[str, Any] = {}
    base = Path.cwd()
    if file is not None:
        try:
            parsed = yamldoc.load_file(file)
        except yamldoc.YamlError as exc:
            raise ConfigError(str(exc)) from None
        if parsed is None:
            parsed = {}
        if not isinstance(parsed, Mapping):
            raise ConfigError(f"{file}: expected a mapping of settings at the top level")
        data = parsed
        base = file.parent.resolve()
    overrides = {k: (v, f"--{k.replace('_', '-')}") for k, v in (flags or {}).items()}
    r = _Reader(data, "", overrides, _env_layer(env), str(file or "<defaults>"))
    d = Config()
    listen = r.get("listen", parse_host_port, d.listen)
    upstream = r.get("upstream", parse_upstream, d.upstream)
    admin_listen = r.get("admin_listen", parse_host_port, d.admin_listen)
    # a policy path from the file is relative to the file; from env or flag, to the cwd
    policy_base = base if ("policy" in data and "policy" not in overrides) else Path.cwd()
    policy = r.get("policy", _path(policy_base), Path.cwd() / d.policy)
    policy_reload_interval = r.get(
        "policy_reload_interval", parse_duration_or_zero, d.policy_reload_interval
    )
    policy_tests = r.get("policy_tests", _choice("enforce", "warn", "off"), d.policy_tests)
    workers = r.get("workers", _int(1), d.workers)
    if workers > 64:
        raise r.fail("workers", f"at most 64 workers, got {workers}")
    if workers > 1 and listen.port == 0:
        raise r.fail("workers", "workers > 1 need a fixed listen port (not :0)")

    p = r.section("proxy")
    dp = ProxyConfig()
    proxy = ProxyConfig(
        connect_timeout=p.get("connect_timeout", parse_duration, dp.connect_timeout),
        upstream_timeout=p.get("upstream_timeout", parse_duration, dp.upstream_timeout),
        max_header_bytes=p.get("max_header_bytes", _int(1024), dp.max_header_bytes),
        identity_header_prefix=p.get("identity_header_prefix", _prefix, dp.identity_header_prefix),
        strip_authorization=p.get("strip_authorization", _bool, dp.strip_authorization),
        allow_encoded_slashes=p.get("allow_encoded_slashes", _bool, dp.allow_encoded_slashes),
        header_read_timeout=p.get("header_read_timeout", parse_duration, dp.header_read_timeout),
        body_idle_timeout=p.get("body_idle_timeout", parse_duration, dp.body_idle_timeout),
        max_body_bytes=p.get("max_body_bytes", _int(0), dp.max_body_bytes),
        max_connections=p.get("max_connections", _int(1), dp.max_connections),
        drain_timeout=p.get("drain_timeout", parse_duration, dp.drain_timeout),
        max_target_bytes=p.get("max_target_bytes", _int(256), dp.max_target_bytes),
    )
    p.finish()
    if proxy.max_target_bytes > proxy.max_header_bytes:
        raise ConfigError("proxy.max_target_bytes: must not exceed proxy.max_header_bytes")

    a = r.section("auth")
    issuers: list[IssuerConfig] = []
    a.seen.add("jwt")
    raw_jwt = a.data.get("jwt")
    if raw_jwt is not None:
        if not isinstance(raw_jwt, list):
            raise a.fail("jwt", "expected a list of issuers")
        for i, item in enumerate(raw_jwt):
            where = raw_jwt.where(i) if isinstance(raw_jwt, yamldoc.LocatedList) else str(file)
            issuers.append(_issuer(item, i, where, base, env))
        names = [i.issuer for i in issuers]
        if len(set(names)) != len(names):
            raise a.fail("jwt", "two issuers share the same `issuer`")
    elif env.get("DOTMAC_JWT_SECRET_KEY"):
        algorithm = env.get("DOTMAC_JWT_ALGORITHM", "HS256") or "HS256"
        issuers.append(
            _make_issuer(
                issuer=None,
                audiences=(),
                algorithms=(algorithm,),
                public_key_file=None,
                secret_env="DOTMAC_JWT_SECRET_KEY",
                leeway=30.0,
                claims=ClaimMap(),
                query_param="",
                cookie="",
                mfa_values=("mfa",),
                required=("exp", "sub"),
                origin="DOTMAC_JWT_SECRET_KEY",
                env=env,
            )
        )
    redis_url = a.get("redis_url", _str, "")
    api_keys: ApiKeysConfig | None = None
    if "api_keys" in a.data:
        k = a.section("api_keys")
        store = k.get("store", _choice("file", "redis"), "file")
        keys_file = k.get("file", _path(base), None)
        header = k.get("header", _header_name, "X-API-Key")
        k.finish()
        if store == "file" and keys_file is None:
            raise k.fail("file", "the file store needs `file` (a YAML file of key hashes)")
        if store == "redis" and not redis_url:
            raise a.fail("redis_url", "API keys in Redis need auth.redis_url")
        api_keys = ApiKeysConfig(store=store, file=keys_file, header=header)
    a.finish()

    secrets_cfg = _secrets(r.section("secrets"), base, env)
    au = r.section("audit")
    audit_sink = au.get("sink", _sink, "stdout")
    au.finish()

    o = r.section("observability")
    do = ObservabilityConfig()
    obs = ObservabilityConfig(
        service_name=o.get("service_name", _str, do.service_name),
        log_level=o.get(
            "log_level",
            lambda v: _choice("DEBUG", "INFO", "WARNING", "ERROR")(str(v).upper()),
            do.log_level,
        ),
        log_format=o.get("log_format", _choice("json", "text"), do.log_format),
        access_log=o.get("access_log", _bool, do.access_log),
        otlp_endpoint=o.get("otlp_endpoint", lambda v: _url(v) if str(v) else "", do.otlp_endpoint),
        trace_sample_ratio=o.get("trace_sample_ratio", _ratio, do.trace_sample_ratio),
        access_log_sample_ratio=o.get(
            "access_log_sample_ratio", _ratio, do.access_log_sample_ratio
        ),
    )
    o.finish()
    r.finish()
    return Config(
        listen=listen,
        upstream=upstream,
        admin_listen=admin_listen,
        policy=policy,
        policy_reload_interval=policy_reload_interval,
        policy_tests=policy_tests,
        proxy=proxy,
        auth=AuthConfig(jwt=tuple(issuers), api_keys=api_keys, redis_url=redis_url),
        observability=obs,
        secrets=secrets_cfg,
        audit_sink=audit_sink,
        workers=workers,
        source=file,
    )
