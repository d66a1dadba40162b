"""SecretsManager: the seed's async API over a provider (file, env or Vault).

    secrets = SecretsManager(provider=VaultProvider(url=..., token=...))
    await secrets.set_secret("database/password", "secure-password")
    password = await secrets.get_secret("database/password")
    encrypted = await secrets.encrypt_field("sensitive-data")
    decrypted = await secrets.decrypt_field(encrypted)

Every provider call runs in a worker thread, so the event loop never blocks. A string is
stored as the field `value` and read back as a string; a mapping is stored as its fields.
Field encryption uses Vault transit with a Vault provider, local AES-256-GCM otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from sidecar.secrets.encryption import LocalCipher
from sidecar.secrets.providers import DecryptionError, FileProvider, Provider, Secret
from sidecar.secrets.vault import VaultProvider

DEFAULT_TRANSIT_KEY = "dotmac"


def default_provider() -> Provider:
    """Vault when DOTMAC_VAULT_URL is set, else the file provider on ./secrets.yaml."""
    if os.environ.get("DOTMAC_VAULT_URL"):
        return VaultProvider()
    return FileProvider(Path("secrets.yaml"))


class SecretsManager:
    """Read, write and encrypt with secrets from one provider (async)."""

    def __init__(
        self,
        provider: Provider | None = None,
        *,
        transit_key: str = DEFAULT_TRANSIT_KEY,
        local_encryption: bool | None = None,
    ) -> None:
        self.provider = provider if provider is not None else default_provider()
        self.transit_key = transit_key
        use_local = (
            not isinstance(self.provider, VaultProvider)
            if local_encryption is None
            else local_encryption
        )
        self._local = LocalCipher(self.provider) if use_local else None

    async def get(self, path: str, version: str | None = None) -> Secret:
        """The whole secret (every field, and its version)."""
        return await asyncio.to_thread(self.provider.read, path, version)

    async def get_secret(
        self, path: str, field: str | None = None, version: str | None = None
    ) -> str | dict[str, str]:
        """One field's value; with no field, the `value` field if that is all there is,
        else every field."""
        secret = await self.get(path, version)
        if field is not None:
            return secret.field(field)
        if set(secret.data) == {"value"}:
            return secret.data["value"]
        return dict(secret.data)

    async def set_secret(self, path: str, value: str | Mapping[str, str]) -> str:
        """Store a new version; returns its version id."""
        data = {"value": value} if isinstance(value, str) else dict(value)
        secret = await asyncio.to_thread(self.provider.write, path, data)
        return secret.version

    async def encrypt_field(self, plaintext: str) -> str:
        """A ciphertext that names the key version that made it."""
        if self._local is not None:
            return await asyncio.to_thread(self._local.encrypt, plaintext.encode())
        vault = self._vault()
        return await asyncio.to_thread(vault.encrypt, self.transit_key, plaintext.encode())

    async def decrypt_field(self, ciphertext: str) -> str:
        """The plaintext; DecryptionError when the ciphertext was tampered with."""
        if ciphertext.startswith("local:"):
            if self._local is None:
                self._local = LocalCipher(self.provider)
            data = await asyncio.to_thread(self._local.decrypt, ciphertext)
        elif ciphertext.startswith("vault:"):
            vault = self._vault()
            data = await asyncio.to_thread(vault.decrypt, self.transit_key, ciphertext)
        else:
            raise DecryptionError("not a ciphertext made here (expected local:... or vault:...)")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise DecryptionError("decrypted data is not text") from None

    async def rotate_encryption_key(self) -> None:
        """A new key version for new ciphertexts; old ones still decrypt."""
        if self._local is not None:
            await asyncio.to_thread(self._local.rotate)
        else:
            await asyncio.to_thread(self._vault().rotate_key, self.transit_key)

    async def rewrap_field(self, ciphertext: str) -> str:
        """The same plaintext under the newest key version."""
        if ciphertext.startswith("vault:"):
            return await asyncio.to_thread(self._vault().rewrap, self.transit_key, ciphertext)
        if self._local is None:
            self._local = LocalCipher(self.provider)
        return await asyncio.to_thread(self._local.rewrap, ciphertext)

    def _vault(self) -> VaultProvider:
        if not isinstance(self.provider, VaultProvider):
            raise DecryptionError("vault ciphertexts need a VaultProvider")
        return self.provider
