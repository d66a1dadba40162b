"""Config: precedence, durations, errors that name the key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, load, parse_duration


def test_defaults_env_file_flags_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("listen: '127.0.0.1:7000'\npolicy: rules/\n")
    env = {
        "DOTMAC_LISTEN": "0.0.0.0:6000",
        "DOTMAC_UPSTREAM": "http://127.0.0.1:9999",
        "DOTMAC_PROMETHEUS_PORT": "9191",
    }
    c = load(cfg, env=env)
    assert str(c.listen) == "127.0.0.1:7000"  # the file beats the environment
    assert str(c.upstream) == "http://127.0.0.1:9999"  # the environment beats defaults
    assert c.admin_listen.port == 9191
    assert c.policy == tmp_path / "rules"  # relative to the config file's folder
    c = load(cfg, env=env, flags={"listen": "127.0.0.1:5000", "policy": "p.yaml"})
    assert str(c.listen) == "127.0.0.1:5000"  # flags beat everything
    assert c.policy == Path.cwd() / "p.yaml"
    c = load(None, env={})
    assert str(c.listen) == "0.0.0.0:8000" and c.proxy.connect_timeout == 2.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("7d", 604800.0),
    ],
)
def test_durations(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["30", 30, "5 minutes", "-1s", "", True])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy:\n  conect_timeout: 2s\n", "sidecar.yaml:2: proxy.conect_timeout: unknown key"),
        (
            "proxy:\n  connect_timeout: 2\n",
            "sidecar.yaml:2: proxy.connect_timeout: expected a duration",
        ),
        ("listen: 8000\n", "sidecar.yaml:1: listen: expected HOST:PORT"),
        ("upstream: 'ftp://x'\n", "sidecar.yaml:1: upstream: expected http://HOST:PORT"),
        ("listne: ':80'\n", "sidecar.yaml:1: listne: unknown key"),
        ("proxy: [1]\n", "sidecar.yaml:1: proxy: expected a mapping"),
        ("secrets: {provider: vault}\n", "secrets.vault.url: set secrets.vault.url"),
        ("a: 1\na: 2\n", "sidecar.yaml:2: duplicate key 'a'"),
        ("listen: [\n", "sidecar.yaml:2: YAML syntax error"),
        (
            "auth:\n  jwt:\n    - issuer: x\n      algorithms: [none]\n      secret_env: S\n",
            "'none' is never accepted",
        ),
        (
            "auth:\n  jwt:\n    - issuer: x\n      algorithms: [RS256]\n      secret_env: S\n",
            "RS256 needs a public key",
        ),
        (
            "auth:\n  jwt:\n    - issuer: x\n      secret_env: MISSING_VAR\n",
            "environment variable MISSING_VAR is not set",
        ),
        (
            "auth:\n  jwt:\n    - issuer: x\n      secret_env: S\n      claims: {subj: x}\n",
            "auth.jwt[0].claims.subj: unknown key",
        ),
        ("observability:\n  log_format: xml\n", "expected one of json, text"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(cfg, env={"S": "secret"})
    assert message in str(info.value).replace(str(tmp_path) + "/", "")


def test_hmac_key_confusion_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("not used")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"auth:\n  jwt:\n    - issuer: x\n      algorithms: [HS256]\n      public_key_file: {key}\n"
    )
    with pytest.raises(ConfigError, match="HMAC algorithm and cannot be checked against a public"):
        load(cfg, env={})


def test_env_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^DOTMAC_LISTEN: listen: expected HOST:PORT"):
        load(None, env={"DOTMAC_LISTEN": "nonsense"})


def test_jwt_secret_env_shortcut() -> None:
    c = load(None, env={"DOTMAC_JWT_SECRET_KEY": "s3cret", "DOTMAC_JWT_ALGORITHM": "HS512"})
    (issuer,) = c.auth.jwt
    assert issuer.issuer is None and issuer.algorithms == ("HS512",)
    assert "s3cret" not in repr(c)
