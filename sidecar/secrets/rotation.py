"""The refresh loop: keeps every configured secret current, and `secrets rotate`.

Each interval (with +-10% jitter) every configured secret is read in a worker thread; a
new version replaces the snapshot whole and re-renders the files that use it. A failed
read keeps the last good value and is counted. Secrets whose path holds `{tenant}` are
read on first use per tenant and kept for one interval.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets as random_source
import time
from collections.abc import Callable, Iterable

import aiohttp

from sidecar.errors import Rejected
from sidecar.observability import logging as logs
from sidecar.secrets.providers import Provider, Secret, SecretError
from sidecar.secrets.render import FileRenderer

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


def tenant_path(template: str, tenant: str | None) -> str:
    """`tenants/{tenant}/db` for one tenant; Rejected when the tenant is not a plain id."""
    if tenant is None:
        raise Rejected(403, "tenant_required", "this request needs a tenant")
    if not _TENANT.match(tenant):
        raise Rejected(403, "invalid_tenant", "tenant is not a plain identifier")
    return template.replace("{tenant}", tenant)


class SecretStore:
    """Current values of the configured secrets, refreshed in the background."""

    def __init__(
        self,
        provider: Provider,
        paths: Iterable[str],
        *,
        interval: float,
        renderers: Iterable[FileRenderer] = (),
        on_refresh: Callable[[str], None] = lambda result: None,
        on_loaded: Callable[[Secret], None] = lambda secret: None,
    ) -> None:
        self.provider = provider
        self.paths = tuple(sorted(set(paths)))
        self.interval = interval
        self.renderers = tuple(renderers)
        self.on_refresh = on_refresh
        self.on_loaded = on_loaded
        self.snapshot: dict[str, Secret] = {}
        self.loaded_at: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._tenant_cache: dict[str, tuple[float, Secret]] = {}
        self._tenant_inflight: dict[str, asyncio.Future[Secret]] = {}
        self._session: aiohttp.ClientSession | None = None

    def get(self, path: str) -> Secret | None:
        """The current value of a configured secret (None until it was loaded once)."""
        return self.snapshot.get(path)

    def status(self, path: str) -> str:
        """'ok' once loaded; otherwise why not (for /readyz)."""
        if path in self.snapshot:
            return "ok"
        return f"not loaded yet: {self.errors.get(path, 'waiting for the first read')}"

    async def run(self, session: aiohttp.ClientSession | None = None) -> None:
        """Refresh every interval (+-10%) until cancelled; the first round runs at once."""
        self._session = session
        while True:
            await self.refresh()
            ready = all(p in self.snapshot for p in self.paths) and all(
                r.ready for r in self.renderers
            )
            wait = self.interval if ready else min(self.interval, 1.0)
            await asyncio.sleep(wait * random.uniform(0.9, 1.1))

    async def refresh(self) -> None:
        """One round: renew the Vault token if needed, read every secret, render files."""
        renew = getattr(self.provider, "renew", None)  # Vault: keep the token alive
        if renew is not None:
            try:
                await asyncio.to_thread(renew)
            except SecretError as exc:
                logs.event(logging.WARNING, "vault_token_renewal_failed", error=str(exc))
        for path in self.paths:
            try:
                secret = await asyncio.to_thread(self.provider.read, path)
            except SecretError as exc:
                self.errors[path] = str(exc)
                self.on_refresh("failure")
                logs.event(
                    logging.WARNING,
                    "secret_refresh_failed",
                    secret=path,
                    error=str(exc),
                    keeping=self.snapshot[path].version if path in self.snapshot else None,
                )
                continue
            self.errors.pop(path, None)
            self.loaded_at[path] = time.time()
            self.on_refresh("success")
            old = self.snapshot.get(path)
            # compare content too: a provider that lost its data (a restarted dev server)
            # starts numbering versions again
            if old is None or old.version != secret.version or old.data != secret.data:
                snapshot = dict(self.snapshot)
                snapshot[path] = secret
                self.snapshot = snapshot  # swapped whole
                self.on_loaded(secret)
                logs.event(logging.INFO, "secret_loaded", secret=path, version=secret.version)
            for renderer in self.renderers:
                if renderer.spec.secret == path:
                    await renderer.apply(secret, self._session)

    async def for_tenant(self, template: str, tenant: str | None) -> Secret:
        """The secret at `template` for one tenant, read on first use and kept one interval."""
        path = tenant_path(template, tenant)
        now = time.monotonic()
        hit = self._tenant_cache.get(path)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._tenant_inflight.get(path)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Secret] = asyncio.ensure_future(
            asyncio.to_thread(self.provider.read, path)
        )
        self._tenant_inflight[path] = future
        try:
            secret = await asyncio.shield(future)
        except SecretError:
            if hit is not None:
                return hit[1]  # the last good value while the provider is down
            raise Rejected(
                503, "secret_unavailable", "a secret this request needs is unavailable"
            ) from None
        finally:
            self._tenant_inflight.pop(path, None)
        self._tenant_cache[path] = (now + self.interval, secret)
        self.on_loaded(secret)
        return secret


def rotate(provider: Provider, path: str, fields: Iterable[str] = (), length: int = 32) -> Secret:
    """Write a new random version of `path` (blocking). Without `fields`, every field of the
    current version gets a new value (a new secret gets the field `value`)."""
    try:
        current = dict(provider.read(path).data)
    except SecretError:
        current = {}
    names = list(fields) or list(current) or ["value"]
    data = dict(current)
    for name in names:
        data[name] = random_source.token_urlsafe(length)
    return provider.write(path, data)
