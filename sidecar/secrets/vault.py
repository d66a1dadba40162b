"""HashiCorp Vault / OpenBao: KV v2 secrets, transit encryption, token lifecycle (hvac).

hvac is blocking: the sidecar calls this provider only from worker threads in background
loops. One lock serializes use of the underlying HTTP session. Authentication by token,
AppRole or Kubernetes (service-account token file + role); before a token runs out it is
renewed, and when it cannot be renewed (or Vault answers 403) the provider logs in again.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from sidecar.secrets.providers import DecryptionError, Secret, SecretError

T = TypeVar("T")
K8S_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class VaultProvider:
    """Secrets in Vault's KV v2 engine (the seed's `VaultProvider(url=..., token=...)`).

    `auth`: "token" (default when a token is given), "approle" (role_id + secret_id) or
    "kubernetes" (role + the pod's service-account token file). Defaults come from
    DOTMAC_VAULT_URL, DOTMAC_VAULT_TOKEN and DOTMAC_VAULT_MOUNT_POINT.
    """

    name = "vault"

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        auth: str | None = None,
        role: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        jwt_path: str | Path = K8S_TOKEN_FILE,
        auth_mount: str | None = None,
        mount_point: str | None = None,
        transit_mount: str = "transit",
        timeout: int = 5,
    ) -> None:
        self.url = url or os.environ.get("DOTMAC_VAULT_URL", "http://127.0.0.1:8200")
        token = token if token is not None else os.environ.get("DOTMAC_VAULT_TOKEN")
        self.auth = auth or ("token" if token else "kubernetes")
        if self.auth not in ("token", "approle", "kubernetes"):
            raise SecretError(
                f"vault auth method {self.auth!r}: expected token, approle or kubernetes"
            )
        if self.auth == "token" and not token:
            raise SecretError("vault token auth needs a token (or DOTMAC_VAULT_TOKEN)")
        if self.auth == "approle" and not (role_id and secret_id):
            raise SecretError("vault approle auth needs role_id and secret_id")
        if self.auth == "kubernetes" and not role:
            raise SecretError("vault kubernetes auth needs a role")
        self.role = role
        self.role_id = role_id
        self.secret_id = secret_id
        self.jwt_path = Path(jwt_path)
        self.auth_mount = auth_mount or self.auth
        self.mount_point = mount_point or os.environ.get("DOTMAC_VAULT_MOUNT_POINT", "secret")
        self.transit_mount = transit_mount
        self.client = hvac.Client(url=self.url, token=token, timeout=timeout)
        self._lock = threading.Lock()
        self._expires_at = float("inf")  # monotonic time the token runs out
        self._ttl = 0.0
        self._logged_in = self.auth == "token"
        self.logins = 0
        self.renewals = 0

    # -- token lifecycle ------------------------------------------------------------------

    def _login(self) -> None:
        if self.auth == "token":
            return
        try:
            if self.auth == "approle":
                result = self.client.auth.approle.login(
                    role_id=self.role_id, secret_id=self.secret_id, mount_point=self.auth_mount
                )
            else:
                jwt = self.jwt_path.read_text().strip()
                result = self.client.auth.kubernetes.login(
                    role=self.role, jwt=jwt, mount_point=self.auth_mount
                )
        except OSError as exc:
            raise SecretError(
                f"cannot read the service-account token {self.jwt_path}: {exc.strerror}"
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise SecretError(f"vault {self.auth} login failed: {_why(exc)}") from None
        auth = result["auth"]
        self.client.token = auth["client_token"]
        self._set_ttl(float(auth.get("lease_duration") or 0))
        self._logged_in = True
        self.logins += 1

    def _set_ttl(self, ttl: float) -> None:
        self._ttl = ttl
        self._expires_at = time.monotonic() + ttl if ttl > 0 else float("inf")

    def _refresh_token(self) -> None:
        """Renew or log in again once two thirds of the token's TTL have passed."""
        if not self._logged_in:
            self._login()
            return
        if self._expires_at == float("inf") and self.auth == "token" and self._ttl == 0:
            self._learn_ttl()
        remaining = self._expires_at - time.monotonic()
        if remaining > self._ttl / 3:
            return
        try:
            result = self.client.auth.token.renew_self()
            self._set_ttl(float(result["auth"].get("lease_duration") or 0))
            self.renewals += 1
            if self._expires_at - time.monotonic() > 1.0:
                return
        except (hvac.exceptions.VaultError, requests.RequestException):
            pass
        self._login()

    def _learn_ttl(self) -> None:
        try:
            data = self.client.auth.token.lookup_self()["data"]
        except (hvac.exceptions.VaultError, requests.RequestException):
            return
        ttl = float(data.get("ttl") or 0)
        self._set_ttl(ttl)
        if ttl == 0:
            self._ttl = -1.0  # a token that never expires: no need to look again

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._refresh_token()
            try:
                return fn(*args, **kwargs)
            except hvac.exceptions.Forbidden:
                if self.auth == "token":
                    raise
                self._login()  # the token may have been revoked or expired early
                return fn(*args, **kwargs)

    def renew(self) -> None:
        """Keep the token alive (the sidecar calls this from its refresh loop)."""
        try:
            with self._lock:
                self._refresh_token()
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise SecretError(f"vault token renewal failed: {_why(exc)}") from None

    # -- KV v2 ----------------------------------------------------------------------------

    def read(self, path: str, version: str | None = None) -> Secret:
        """The current (or a given) version of a KV v2 secret."""
        try:
            result = self._call(
                self.client.secrets.kv.v2.read_secret_version,
                path=path,
                version=int(version) if version is not None else None,
                mount_point=self.mount_point,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            raise SecretError(f"vault: no secret at {self.mount_point}/{path}") from None
        except (hvac.exceptions.VaultError, requests.RequestException, ValueError) as exc:
            raise SecretError(
                f"vault: cannot read {self.mount_point}/{path}: {_why(exc)}"
            ) from None
        data = result["data"]
        return Secret(
            path,
            {k: str(v) for k, v in (data["data"] or {}).items()},
            str(data["metadata"]["version"]),
        )

    def write(self, path: str, data: Mapping[str, str]) -> Secret:
        """A new version of a KV v2 secret; older versions stay readable."""
        try:
            result = self._call(
                self.client.secrets.kv.v2.create_or_update_secret,
                path=path,
                secret=dict(data),
                mount_point=self.mount_point,
            )
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise SecretError(
                f"vault: cannot write {self.mount_point}/{path}: {_why(exc)}"
            ) from None
        return Secret(path, dict(data), str(result["data"]["version"]))

    # -- transit --------------------------------------------------------------------------

    @property
    def _transit_api(self) -> Any:
        # hvac's transit methods are typed in some releases of its stubs and not in others
        return self.client.secrets.transit

    def _ensure_transit_key(self, key: str) -> None:
        try:
            self._transit_api.read_key(name=key, mount_point=self.transit_mount)
        except hvac.exceptions.InvalidPath:
            self._transit_api.create_key(name=key, mount_point=self.transit_mount)

    def encrypt(self, key: str, plaintext: bytes) -> str:
        """Transit ciphertext (`vault:v<N>:...`) of `plaintext` under key `key`."""

        def run() -> str:
            self._ensure_transit_key(key)
            result = self.client.secrets.transit.encrypt_data(
                name=key,
                plaintext=base64.b64encode(plaintext).decode(),
                mount_point=self.transit_mount,
            )
            return str(result["data"]["ciphertext"])

        return self._transit(run, "encrypt")

    def decrypt(self, key: str, ciphertext: str) -> bytes:
        """The plaintext of a transit ciphertext; SecretError when it was tampered with."""

        def run() -> bytes:
            result = self.client.secrets.transit.decrypt_data(
                name=key, ciphertext=ciphertext, mount_point=self.transit_mount
            )
            return base64.b64decode(result["data"]["plaintext"])

        try:
            return self._transit(run, "decrypt")
        except SecretError as exc:
            if "refused" in str(exc):
                raise DecryptionError(
                    "ciphertext failed authentication: it was altered or made with another key"
                    f" ({exc})"
                ) from None
            raise

    def rotate_key(self, key: str) -> None:
        """A new version of a transit key; old ciphertexts still decrypt."""

        def run() -> None:
            self._ensure_transit_key(key)
            self._transit_api.rotate_key(name=key, mount_point=self.transit_mount)

        self._transit(run, "rotate")

    def rewrap(self, key: str, ciphertext: str) -> str:
        """The same plaintext under the key's newest version, without revealing it."""

        def run() -> str:
            result = self._transit_api.rewrap_data(
                name=key, ciphertext=ciphertext, mount_point=self.transit_mount
            )
            return str(result["data"]["ciphertext"])

        return self._transit(run, "rewrap")

    def _transit(self, run: Callable[[], T], what: str) -> T:
        try:
            result: T = self._call(run)
            return result
        except hvac.exceptions.InvalidRequest as exc:
            raise SecretError(f"vault transit {what} refused: {_why(exc)}") from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise SecretError(f"vault transit {what} failed: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """A short reason without request bodies (which may hold secrets)."""
    if isinstance(exc, requests.RequestException):
        return type(exc).__name__
    errors = getattr(exc, "errors", None)
    if errors:
        text = "; ".join(str(e) for e in errors)[:200]
        return text
    return type(exc).__name__
