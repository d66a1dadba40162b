"""Secret files: a template filled from a secret's fields, written atomically, re-rendered
when the secret changes, and an optional nudge to the app (POST or signal)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Mapping

import aiohttp

from sidecar.config import SecretFile
from sidecar.observability import logging as logs
from sidecar.secrets.providers import Secret, SecretError, atomic_write

_FIELD = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


def render(template: str, data: Mapping[str, str], path: str) -> str:
    """`${field}` replaced by the secret's field; a missing field is an error naming it."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in data:
            raise SecretError(f"secret {path} has no field '{name}' (used by a file template)")
        return data[name]

    return _FIELD.sub(one, template.replace("\\n", "\n"))


class FileRenderer:
    """Keeps one file in step with one secret."""

    def __init__(self, spec: SecretFile) -> None:
        self.spec = spec
        self.rendered_version: str | None = None
        self.last_error = ""
        self._written = ""

    @property
    def ready(self) -> bool:
        """True once the file was written at least once."""
        return self.rendered_version is not None

    async def apply(self, secret: Secret, session: aiohttp.ClientSession | None) -> bool:
        """Write the file when its content changes; True when the file changed."""
        try:
            text = render(self.spec.template, secret.data, secret.path)
            if text == self._written:
                return False
            await asyncio.to_thread(atomic_write, self.spec.path, text, self.spec.mode)
        except (SecretError, OSError) as exc:
            self.last_error = (
                str(exc)
                if isinstance(exc, SecretError)
                else f"cannot write {self.spec.path}: {exc.strerror}"
            )
            logs.event(
                logging.ERROR, "secret_file_failed", file=str(self.spec.path), error=self.last_error
            )
            return False
        first = self.rendered_version is None
        self.rendered_version = secret.version
        self._written = text
        self.last_error = ""
        logs.event(
            logging.INFO,
            "secret_file_rendered",
            file=str(self.spec.path),
            secret=secret.path,
            version=secret.version,
        )
        if not first:
            await self._notify(session)
        return True

    async def _notify(self, session: aiohttp.ClientSession | None) -> None:
        spec = self.spec
        if spec.on_change_post and session is not None:
            try:
                async with session.post(spec.on_change_post, json={"file": str(spec.path)}) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                logs.event(
                    logging.WARNING,
                    "secret_file_notify_failed",
                    file=str(spec.path),
                    error=type(exc).__name__,
                )
        if spec.on_change_signal and spec.pid_file is not None:
            try:
                pid = int((await asyncio.to_thread(spec.pid_file.read_text)).strip())
                os.kill(pid, getattr(signal, f"SIG{spec.on_change_signal}"))
            except (OSError, ValueError) as exc:
                logs.event(
                    logging.WARNING,
                    "secret_file_notify_failed",
                    file=str(spec.path),
                    error=type(exc).__name__,
                )
