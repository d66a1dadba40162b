"""Secret providers: the embedded file provider and the environment provider.

A provider is blocking (files, HTTP): the sidecar only calls it from worker threads in
background loops, never on the request path. `read` returns a `Secret` with a version;
`write` stores a new version and keeps the older ones readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from sidecar.errors import SidecarError

HISTORY_KEEP = 10


class SecretError(SidecarError):
    """A secret could not be read or written; the message never holds a secret value."""


class DecryptionError(SecretError):
    """A ciphertext is malformed, made by an unknown key version, or was tampered with."""


@dataclass(frozen=True)
class Secret:
    """One version of a secret: its fields and the provider's version id."""

    path: str
    data: Mapping[str, str] = field(repr=False)
    version: str

    def field(self, name: str) -> str:
        """The value of one field; SecretError names the path and field when it is missing."""
        try:
            return self.data[name]
        except KeyError:
            raise SecretError(f"secret {self.path} has no field '{name}'") from None


class Provider(Protocol):
    """Where secrets live. Every method may block."""

    name: str

    def read(self, path: str, version: str | None = None) -> Secret: ...

    def write(self, path: str, data: Mapping[str, str]) -> Secret: ...


def content_version(data: Mapping[str, str]) -> str:
    """A version id derived from the content (for providers without their own)."""
    blob = json.dumps(dict(data), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fields(path: str, raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        return {"value": raw}
    if not isinstance(raw, Mapping) or not raw:
        raise SecretError(f"secret {path}: expected a mapping of field: value")
    return {str(k): str(v) for k, v in raw.items()}


class FileProvider:
    """Secrets in a YAML file of `path: {field: value}` (the embedded default).

    The file is read on every call, so edits take effect at the next refresh. `write`
    rewrites it atomically and keeps up to ten earlier versions of each path in
    `<file>.versions.yaml` (readable with `read(path, version)`).
    """

    name = "file"

    def __init__(self, path: Path | str = "secrets.yaml") -> None:
        self.path = Path(path)
        self.history = self.path.with_name(self.path.name + ".versions.yaml")

    def _load(self, file: Path) -> dict[str, Any]:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SecretError(f"{file}: cannot read: {exc.strerror}") from None
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            raise SecretError(f"{file}: not valid YAML") from None
        if not isinstance(doc, dict):
            raise SecretError(f"{file}: expected a mapping of path: {{field: value}}")
        return doc

    def read(self, path: str, version: str | None = None) -> Secret:
        """The current version of `path`, or an earlier one by version id."""
        doc = self._load(self.path)
        if path in doc:
            data = _fields(path, doc[path])
            current = Secret(path, data, content_version(data))
            if version is None or version == current.version:
                return current
        elif version is None:
            raise SecretError(f"{self.path}: no secret at '{path}'")
        for old in self._load(self.history).get(path, []):
            if old.get("version") == version:
                return Secret(path, _fields(path, old.get("data")), version)
        raise SecretError(f"{self.path}: no version {version} of '{path}'")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write(self, path: str, data: Mapping[str, str]) -> Secret:
        """Store a new version of `path`; the one it replaces moves to the history file."""
        fields = _fields(path, dict(data))
        with self._locked():
            doc = self._load(self.path)
            if path in doc:
                old = _fields(path, doc[path])
                history = self._load(self.history)
                versions = list(history.get(path, []))
                versions.insert(
                    0, {"version": content_version(old), "data": old, "replaced": time.time()}
                )
                history[path] = versions[:HISTORY_KEEP]
                atomic_write(self.history, yaml.safe_dump(history, sort_keys=True), 0o600)
            doc[path] = fields
            atomic_write(self.path, yaml.safe_dump(doc, sort_keys=True), 0o600)
        return Secret(path, fields, content_version(fields))


class EnvProvider:
    """Secrets in environment variables: `DOTMAC_SECRET_<PATH>` holds a JSON object of
    fields (or a plain string, the field `value`); `database/orders` reads
    `DOTMAC_SECRET_DATABASE_ORDERS`. Read-only."""

    name = "env"

    def __init__(
        self, environ: Mapping[str, str] | None = None, prefix: str = "DOTMAC_SECRET_"
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.prefix = prefix

    def variable(self, path: str) -> str:
        """The variable that holds `path`."""
        return self.prefix + re.sub(r"[^A-Za-z0-9]", "_", path).upper()

    def read(self, path: str, version: str | None = None) -> Secret:
        """The value of the variable for `path`."""
        name = self.variable(path)
        raw = self.environ.get(name)
        if raw is None:
            raise SecretError(f"environment variable {name} (secret {path}) is not set")
        try:
            parsed: Any = json.loads(raw) if raw.lstrip().startswith("{") else raw
        except ValueError:
            raise SecretError(f"environment variable {name}: not a JSON object") from None
        data = _fields(path, parsed)
        secret = Secret(path, data, content_version(data))
        if version is not None and version != secret.version:
            raise SecretError(f"environment variable {name}: only the current version exists")
        return secret

    def write(self, path: str, data: Mapping[str, str]) -> Secret:
        """Always an error: the environment of a running process is not a store."""
        raise SecretError("the env secrets provider is read-only")


def atomic_write(target: Path, text: str | bytes, mode: int) -> None:
    """Write a file so that readers see the old or the new content, never a part:
    a temporary file in the same folder, mode set before any byte, fsync, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(text.encode() if isinstance(text, str) else text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
