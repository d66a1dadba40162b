"""The secrets library against a real OpenBao dev server: the seed snippet, KV versions,
field encryption (transit and local), AppRole and Kubernetes-style login, token renewal."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.secrets.providers import DecryptionError, FileProvider, SecretError
from tests.conftest import Bao

SEED_SECRETS = """
from dotmac.platform.secrets import SecretsManager, VaultProvider

# Vault-backed secrets
secrets = SecretsManager(
    provider=VaultProvider(
        url="https://vault.company.com",
        token="vault-token"
    )
)

# Store and retrieve secrets
await secrets.set_secret("database/password", "secure-password")
password = await secrets.get_secret("database/password")

# Field encryption
encrypted = await secrets.encrypt_field("sensitive-data")
decrypted = await secrets.decrypt_field(encrypted)
"""


async def test_seed_secrets_snippet_runs_as_written_against_openbao(bao: Bao) -> None:
    seed = Path(__file__).resolve().parents[2] / "shared/seed/dotmac-platform-services-README.md"
    if seed.is_file():
        assert SEED_SECRETS.strip() in seed.read_text()
    bao.client().sys.enable_secrets_engine("transit", path="transit")
    # the snippet's address and token, pointed at the test server and its token
    code = SEED_SECRETS.replace("https://vault.company.com", bao.url).replace(
        '"vault-token"', f'"{bao.token}"'
    )
    body = "async def _snippet():\n" + "".join(f"    {line}\n" for line in code.splitlines())
    body += "    return password, encrypted, decrypted\n"
    scope: dict[str, object] = {}
    exec(compile(body, "seed-secrets", "exec"), scope)
    password, encrypted, decrypted = await scope["_snippet"]()  # type: ignore[operator]
    assert password == "secure-password"
    assert str(encrypted).startswith("vault:v1:")
    assert decrypted == "sensitive-data"
    stored = bao.client().secrets.kv.v2.read_secret_version(
        path="database/password", raise_on_deleted_version=True
    )
    assert stored["data"]["data"] == {"value": "secure-password"}


async def test_transit_rotation_rewrap_and_tampering(bao: Bao) -> None:
    from dotmac.platform.secrets import SecretsManager, VaultProvider

    bao.client().sys.enable_secrets_engine("transit", path="transit")
    secrets = SecretsManager(provider=VaultProvider(url=bao.url, token=bao.token))
    old = await secrets.encrypt_field("card 4111")
    await secrets.rotate_encryption_key()
    new = await secrets.encrypt_field("card 4111")
    assert old.startswith("vault:v1:") and new.startswith("vault:v2:")
    assert await secrets.decrypt_field(old) == "card 4111"
    rewrapped = await secrets.rewrap_field(old)
    assert (
        rewrapped.startswith("vault:v2:") and await secrets.decrypt_field(rewrapped) == "card 4111"
    )
    tampered = new[:-6] + ("AAAA" if new[-6:-2] != "AAAA" else "BBBB") + new[-2:]
    with pytest.raises(DecryptionError, match="failed authentication"):
        await secrets.decrypt_field(tampered)


async def test_local_encryption_versions_and_tampering(tmp_path: Path) -> None:
    from dotmac.platform.secrets import SecretsManager

    provider = FileProvider(tmp_path / "secrets.yaml")
    secrets = SecretsManager(provider=provider)
    old = await secrets.encrypt_field("ssn 078-05-1120")
    assert old.startswith("local:v1:")
    await secrets.rotate_encryption_key()
    new = await secrets.encrypt_field("ssn 078-05-1120")
    assert new.startswith("local:v2:")
    # another manager on the same provider (another process) decrypts both
    other = SecretsManager(provider=FileProvider(tmp_path / "secrets.yaml"))
    assert await other.decrypt_field(old) == "ssn 078-05-1120"
    assert await other.decrypt_field(new) == "ssn 078-05-1120"
    assert (await secrets.rewrap_field(old)).startswith("local:v2:")
    body = new.split(":", 2)[2]
    # flip a character in the middle: all six of its bits are data (the last characters of
    # a base64 text may carry padding bits, where a flip can change nothing)
    mid = len(body) // 2
    swapped = "A" if body[mid] != "A" else "B"
    flipped = new[: -len(body)] + body[:mid] + swapped + body[mid + 1 :]
    with pytest.raises(DecryptionError, match="altered or made with another key"):
        await secrets.decrypt_field(flipped)
    with pytest.raises(DecryptionError, match="no local encryption key version 9"):
        await secrets.decrypt_field("local:v9:" + body)
    assert "ssn 078-05-1120" not in (tmp_path / "secrets.yaml").read_text()


async def test_kv_versions_stay_readable(bao: Bao) -> None:
    from dotmac.platform.secrets import SecretsManager, VaultProvider

    secrets = SecretsManager(provider=VaultProvider(url=bao.url, token=bao.token))
    v1 = await secrets.set_secret("app/db", {"user": "app", "password": "one"})
    v2 = await secrets.set_secret("app/db", {"user": "app", "password": "two"})
    assert (v1, v2) == ("1", "2")
    assert await secrets.get_secret("app/db", "password") == "two"
    assert await secrets.get_secret("app/db", "password", version="1") == "one"
    with pytest.raises(SecretError, match="no secret at secret/nope"):
        await secrets.get_secret("nope")


def _policy(bao: Bao) -> None:
    bao.client().sys.create_or_update_policy(
        name="app-read",
        policy='path "secret/data/*" { capabilities = ["read", "create", "update"] }',
    )


async def test_approle_login(bao: Bao) -> None:
    from dotmac.platform.secrets import SecretsManager, VaultProvider

    root = bao.client()
    _policy(bao)
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle("app", token_policies=["app-read"], token_ttl="1m")
    role_id = root.auth.approle.read_role_id("app")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("app")["data"]["secret_id"]
    root.secrets.kv.v2.create_or_update_secret(path="app/key", secret={"value": "k1"})
    provider = VaultProvider(url=bao.url, auth="approle", role_id=role_id, secret_id=secret_id)
    assert await SecretsManager(provider=provider).get_secret("app/key") == "k1"
    assert provider.logins == 1


async def test_kubernetes_style_login_through_jwt_auth(bao: Bao, tmp_path: Path) -> None:
    """OpenBao's JWT auth method mounted at `kubernetes` answers the same login call the
    kubernetes method does; the pod's token is a signed service-account-like JWT."""
    from dotmac.platform.secrets import SecretsManager, VaultProvider

    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        signer.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    root = bao.client()
    _policy(bao)
    root.sys.enable_auth_method("jwt", path="kubernetes")
    root.write("auth/kubernetes/config", jwt_validation_pubkeys=[public_pem])
    root.write(
        "auth/kubernetes/role/orders",
        role_type="jwt",
        bound_audiences=["vault"],
        user_claim="sub",
        token_policies=["app-read"],
        token_ttl="1m",
        bound_claims={"kubernetes.io/serviceaccount/namespace": "shop"},
    )
    root.secrets.kv.v2.create_or_update_secret(path="orders/db", secret={"password": "pw"})
    now = int(time.time())
    sa_token = jwt.encode(
        {
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:shop:orders",
            "aud": "vault",
            "iat": now,
            "exp": now + 600,
            "kubernetes.io/serviceaccount/namespace": "shop",
        },
        signer,
        algorithm="RS256",
    )
    token_file = tmp_path / "token"
    token_file.write_text(sa_token)
    provider = VaultProvider(url=bao.url, auth="kubernetes", role="orders", jwt_path=token_file)
    assert await SecretsManager(provider=provider).get_secret("orders/db", "password") == "pw"
    assert provider.logins == 1
