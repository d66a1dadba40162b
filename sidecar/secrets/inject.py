"""Secret headers: which rules get which secret fields, resolved for one request."""

from __future__ import annotations

from sidecar.auth.identity import Identity
from sidecar.config import SecretHeader
from sidecar.errors import Rejected
from sidecar.secrets.audit import AuditLog
from sidecar.secrets.rotation import SecretStore


class SecretHeaders:
    """The configured secret headers; values come from the store's snapshot (or, for
    `{tenant}` paths, the caller's tenant), and every read leaves an audit event."""

    def __init__(
        self, specs: tuple[SecretHeader, ...], store: SecretStore, audit: AuditLog
    ) -> None:
        self.store = store
        self.audit = audit
        self._every_rule = tuple(s for s in specs if "*" in s.rules)
        by_rule: dict[str, list[SecretHeader]] = {}
        for spec in specs:
            if "*" not in spec.rules:
                for rule in spec.rules:
                    by_rule.setdefault(rule, []).append(spec)
        self._by_rule = {k: tuple(v) for k, v in by_rule.items()}
        self.names = tuple(sorted({s.name for s in specs}))

    async def for_request(
        self, rule: str, identity: Identity | None, request_id: str
    ) -> list[tuple[str, str]]:
        """(header, value) pairs for an allowed request on `rule`."""
        specs = self._every_rule + self._by_rule.get(rule, ())
        out: list[tuple[str, str]] = []
        for spec in specs:
            tenant = identity.tenant if identity is not None else None
            if "{tenant}" in spec.secret:
                secret = await self.store.for_tenant(spec.secret, tenant)
            else:
                found = self.store.get(spec.secret)
                if found is None:
                    raise Rejected(
                        503, "secret_unavailable", "a secret this request needs is not loaded yet"
                    )
                secret = found
                tenant = None
            value = secret.data.get(spec.field)
            if value is None:
                raise Rejected(
                    503, "secret_unavailable", "a secret this request needs has no such field"
                )
            out.append((spec.name, value))
            self.audit.secret_read(
                path=secret.path,
                version=secret.version,
                tenant=tenant,
                rule=rule,
                request_id=request_id,
            )
        return out
