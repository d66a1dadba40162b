"""Field encryption: Vault transit, or local AES-256-GCM with versioned keys.

Ciphertexts say which key version made them: transit's own `vault:v<N>:...`, and
`local:v<N>:<base64(nonce || ciphertext || tag)>` for local keys. Local keys are a keyring
secret (`v1`, `v2`, ... -> 32 random bytes, base64) kept in the secrets provider, so every
sidecar and library user sharing the provider shares the keys. Rotation adds a version;
old ciphertexts still decrypt; a tampered ciphertext fails with a clear error.
"""

from __future__ import annotations

import base64
import os
import re
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.secrets.providers import DecryptionError, Provider, SecretError

KEYRING_PATH = "dotmac/field-encryption"
_LOCAL = re.compile(r"^local:v(\d+):([A-Za-z0-9_\-=]+)$")


class LocalCipher:
    """AES-256-GCM with a versioned keyring stored in a provider (blocking)."""

    def __init__(self, provider: Provider, keyring_path: str = KEYRING_PATH) -> None:
        self.provider = provider
        self.keyring_path = keyring_path
        self._keys: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _load(self, create: bool) -> dict[int, bytes]:
        with self._lock:
            if self._keys:
                return self._keys
            try:
                data = self.provider.read(self.keyring_path).data
            except SecretError:
                if not create:
                    raise
                data = {"v1": base64.b64encode(os.urandom(32)).decode()}
                self.provider.write(self.keyring_path, data)
            self._keys = {
                int(k[1:]): base64.b64decode(v) for k, v in data.items() if re.fullmatch(r"v\d+", k)
            }
            return self._keys

    def encrypt(self, plaintext: bytes, associated: bytes = b"") -> str:
        """`local:v<N>:...` under the newest key version."""
        keys = self._load(create=True)
        version = max(keys)
        nonce = os.urandom(12)
        sealed = AESGCM(keys[version]).encrypt(nonce, plaintext, associated or None)
        return f"local:v{version}:" + base64.urlsafe_b64encode(nonce + sealed).decode()

    def decrypt(self, ciphertext: str, associated: bytes = b"") -> bytes:
        """The plaintext; DecryptionError when the ciphertext is not authentic."""
        m = _LOCAL.match(ciphertext.strip())
        if m is None:
            raise DecryptionError("not a local ciphertext (expected local:v<N>:...)")
        version = int(m.group(1))
        keys = self._load(create=False)
        if version not in keys:
            self._keys = {}  # another process may have rotated: look again once
            keys = self._load(create=False)
        if version not in keys:
            raise DecryptionError(f"no local encryption key version {version}")
        try:
            blob = base64.urlsafe_b64decode(m.group(2))
        except ValueError:
            raise DecryptionError("ciphertext is not valid base64") from None
        if len(blob) < 12 + 16:
            raise DecryptionError("ciphertext is too short")
        try:
            return AESGCM(keys[version]).decrypt(blob[:12], blob[12:], associated or None)
        except InvalidTag:
            raise DecryptionError(
                "ciphertext failed authentication: it was altered or made with another key"
            ) from None

    def rotate(self) -> int:
        """Add a new key version (used for new ciphertexts); returns it."""
        keys = dict(self._load(create=True))
        version = max(keys) + 1
        keys[version] = os.urandom(32)
        self.provider.write(
            self.keyring_path, {f"v{v}": base64.b64encode(k).decode() for v, k in keys.items()}
        )
        with self._lock:
            self._keys = keys
        return version

    def rewrap(self, ciphertext: str) -> str:
        """The same plaintext under the newest key version."""
        return self.encrypt(self.decrypt(ciphertext))
