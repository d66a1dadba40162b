"""API keys: `dmk_<id>_<secret>`, stored as SHA-256 hashes only, in a file or in Redis.

A key's public id finds its record; the secret is hashed and compared in constant time
with the record's hashes (more than one during a rotation's grace period). Records carry
roles, permissions, tenant, expiry and revocation. Lookups on the request path never block:
the file store serves an in-memory snapshot re-read in a thread when the file changes; the
Redis store asks Redis through the asyncio client and keeps answers for 0.5 s, so a
revocation takes effect within 1 s (within 2 s with the file store).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from sidecar.auth.identity import Identity
from sidecar.errors import ConfigError, Rejected, SidecarError

PREFIX = "dmk"
_ID_CHARS = frozenset("0123456789abcdef")
REDIS_KEY = "dotmac:apikey:"
REDIS_INDEX = "dotmac:apikeys"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(id, secret, full key) for a new API key."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{PREFIX}_{key_id}_{secret}"


def parse_key(value: str) -> tuple[str, str] | None:
    """(id, secret) of `dmk_<id>_<secret>`, or None when it is not shaped like a key."""
    prefix, sep, rest = value.partition("_")
    key_id, sep2, secret = rest.partition("_")
    if prefix != PREFIX or not sep or not sep2 or not secret:
        return None
    if len(key_id) != 16 or not _ID_CHARS.issuperset(key_id):
        return None
    return key_id, secret


def key_id_of(value: str) -> str:
    """The public id from an id or a full key (the CLI accepts both)."""
    parsed = parse_key(value)
    if parsed is not None:
        return parsed[0]
    if len(value) == 16 and _ID_CHARS.issuperset(value):
        return value
    raise SidecarError(f"{value[:20]}...: not an API key id (16 hex digits) or key")


@dataclass(frozen=True)
class ApiKeyRecord:
    """What the store knows about one key. Never holds the secret, only its hashes."""

    id: str
    name: str
    subject: str | None = None
    roles: tuple[str, ...] = ()
    permissions: tuple[str, ...] = ()
    tenant: str | None = None
    created: float = field(default_factory=time.time)
    expires: float | None = None
    revoked: float | None = None
    hashes: tuple[tuple[str, float | None], ...] = ()  # (sha256 hex, valid until)

    def state(self, now: float | None = None) -> str:
        """active | expired | revoked."""
        now = time.time() if now is None else now
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def accepts(self, secret: str, now: float) -> bool:
        """True when `secret` is one of this key's current secrets and the key is usable."""
        if self.state(now) != "active":
            return False
        digest = _digest(secret)
        ok = False
        for stored, until in self.hashes:
            # compare every hash, in constant time, whatever matched before
            if hmac.compare_digest(digest, stored) and (until is None or now < until):
                ok = True
        return ok

    def identity(self) -> Identity:
        """The caller this key stands for."""
        return Identity(
            subject=self.subject or f"apikey:{self.id}",
            method="api_key",
            tenant=self.tenant,
            roles=self.roles,
            permissions=frozenset(self.permissions),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML or JSON."""
        return {
            "name": self.name,
            "subject": self.subject,
            "roles": list(self.roles),
            "permissions": list(self.permissions),
            "tenant": self.tenant,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "hashes": [{"sha256": h, "until": u} for h, u in self.hashes],
        }

    @classmethod
    def from_dict(cls, key_id: str, data: dict[str, Any]) -> ApiKeyRecord:
        """The record stored as `data`; raises ValueError on a malformed one."""
        if not isinstance(data, dict):
            raise ValueError("expected a mapping")
        hashes = tuple((str(h["sha256"]), h.get("until")) for h in data.get("hashes", []))
        if not hashes:
            raise ValueError("no hashes")
        return cls(
            id=key_id,
            name=str(data.get("name", "")),
            subject=data.get("subject"),
            roles=tuple(data.get("roles") or ()),
            permissions=tuple(data.get("permissions") or ()),
            tenant=data.get("tenant"),
            created=float(data.get("created", 0)),
            expires=data.get("expires"),
            revoked=data.get("revoked"),
            hashes=hashes,
        )


def rotated(record: ApiKeyRecord, grace: float) -> tuple[ApiKeyRecord, str]:
    """The record with a new secret; the old secrets stay valid for `grace` seconds."""
    _, secret, _ = new_key()
    until = time.time() + grace
    old = tuple((h, until if u is None else min(u, until)) for h, u in record.hashes)
    return replace(record, hashes=((_digest(secret), None), *old)), f"{PREFIX}_{record.id}_{secret}"


def created(
    name: str,
    *,
    subject: str | None,
    roles: tuple[str, ...],
    permissions: tuple[str, ...],
    tenant: str | None,
    expires_in: float | None,
) -> tuple[ApiKeyRecord, str]:
    """A new record and the full key (shown once, never stored)."""
    key_id, secret, full = new_key()
    now = time.time()
    record = ApiKeyRecord(
        id=key_id,
        name=name,
        subject=subject,
        roles=roles,
        permissions=permissions,
        tenant=tenant,
        created=now,
        expires=now + expires_in if expires_in else None,
        hashes=((_digest(secret), None),),
    )
    return record, full


class KeyStore(Protocol):
    """What the proxy needs: find a record by its public id without blocking."""

    async def lookup(self, key_id: str) -> ApiKeyRecord | None: ...

    def status(self) -> str: ...


# ------------------------------------------------------------------------------------------
# File store


def _read_file(path: Path) -> dict[str, ApiKeyRecord]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    doc = yaml.safe_load(text) or {}
    keys = doc.get("keys") or {} if isinstance(doc, dict) else None
    if not isinstance(keys, dict):
        raise ConfigError(f"{path}: expected a mapping with `keys`")
    out = {}
    for key_id, data in keys.items():
        try:
            out[str(key_id)] = ApiKeyRecord.from_dict(str(key_id), data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: key {key_id}: {exc}") from None
    return out


class FileKeyStore:
    """Keys in a YAML file of hashes; re-read when its content changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, ApiKeyRecord] = _read_file(path)
        self._text = self._content()
        self.last_error = ""

    def _content(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    async def lookup(self, key_id: str) -> ApiKeyRecord | None:
        """The record of `key_id` from the in-memory snapshot."""
        return self._records.get(key_id)

    def status(self) -> str:
        """'ok', or why the last re-read failed (the previous keys stay in use)."""
        return self.last_error or "ok"

    async def run(self, interval: float = 1.0) -> None:
        """Re-read the file when its content changes, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            content = await asyncio.to_thread(self._content)
            if content == self._text:
                continue
            try:
                records = await asyncio.to_thread(_read_file, self.path)
            except (ConfigError, yaml.YAMLError) as exc:
                self.last_error = str(exc)
                continue
            self._records = records  # swapped whole
            self._text = content
            self.last_error = ""

    # -- administration (the CLI), blocking ------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, ApiKeyRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = _read_file(self.path)
            yield records
            self._write(records)

    def _write(self, records: dict[str, ApiKeyRecord]) -> None:
        doc = {"keys": {k: r.to_dict() for k, r in sorted(records.items())}}
        text = (
            "# DotMac Sidecar API keys: SHA-256 hashes only. Managed by `dotmac-sidecar apikey`.\n"
            + yaml.safe_dump(doc, sort_keys=False)
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".apikeys-")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def all(self) -> list[ApiKeyRecord]:
        """Every record."""
        return list(_read_file(self.path).values())

    def put(self, record: ApiKeyRecord) -> None:
        """Add or replace a record."""
        with self._locked() as records:
            records[record.id] = record

    def get(self, key_id: str) -> ApiKeyRecord | None:
        """One record, read now."""
        return _read_file(self.path).get(key_id)


# ------------------------------------------------------------------------------------------
# Redis store


def redis_client(url: str) -> tuple[Any, list[Any]]:
    """An asyncio Redis client for redis://, rediss://, unix://, redis+sentinel:// (hosts,
    then /master-name[/db]) and redis+cluster:// URLs, and the other clients to close
    with it (a sentinel's own connections)."""
    from redis import asyncio as aioredis

    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        hosts_part, _, rest = url[len("redis+sentinel://") :].partition("/")
        master, _, db = rest.partition("/")
        if not hosts_part or not master:
            raise ConfigError(
                f"auth.redis_url: expected redis+sentinel://HOST:PORT[,...]/MASTER, got {url!r}"
            )
        hosts = []
        for item in hosts_part.split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port) if port.isdigit() else 26379))
        make_sentinel: Any = Sentinel  # typed in some redis releases, untyped in others
        sentinel = make_sentinel(hosts, socket_timeout=1.0)
        master_client = sentinel.master_for(master, db=int(db or 0), socket_timeout=1.0)
        return master_client, list(sentinel.sentinels)
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url[len("redis+cluster://") :]), []
    return aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0), []


class RedisKeyStore:
    """Keys in Redis (`dotmac:apikey:<id>` -> JSON of the record), cached for 0.5 s."""

    TTL = 0.5

    def __init__(self, url: str, *, cache_size: int = 10_000) -> None:
        self.url = url
        self.client, self._others = redis_client(url)
        self._cache: OrderedDict[str, tuple[float, ApiKeyRecord | None]] = OrderedDict()
        self._cache_size = cache_size
        self.last_error = ""

    async def lookup(self, key_id: str) -> ApiKeyRecord | None:
        """The record of `key_id`; Redis unreachable and nothing fresh cached: 503."""
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            raw = await self.client.get(REDIS_KEY + key_id)
        except Exception as exc:  # redis raises many kinds; any means "unavailable"
            self.last_error = f"redis unavailable: {type(exc).__name__}"
            raise Rejected(503, "api_key_store_unavailable", "API key store unavailable") from None
        self.last_error = ""
        record = ApiKeyRecord.from_dict(key_id, json.loads(raw)) if raw else None
        self._cache[key_id] = (now + self.TTL, record)
        self._cache.move_to_end(key_id)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return record

    def status(self) -> str:
        """'ok' or the last error talking to Redis."""
        return self.last_error or "ok"

    async def ping(self) -> str:
        """'ok' when Redis answers (for /readyz)."""
        try:
            await self.client.ping()
        except Exception as exc:
            return f"redis unavailable: {type(exc).__name__}"
        return "ok"

    async def close(self) -> None:
        """Close the connection pools."""
        await self.client.aclose()
        for other in self._others:
            await other.aclose()

    # -- administration (the CLI) ----------------------------------------------------------

    async def all(self) -> list[ApiKeyRecord]:
        """Every record."""
        ids = sorted(
            i.decode() if isinstance(i, bytes) else i
            for i in await self.client.smembers(REDIS_INDEX)
        )
        out = []
        for key_id in ids:
            raw = await self.client.get(REDIS_KEY + key_id)
            if raw:
                out.append(ApiKeyRecord.from_dict(key_id, json.loads(raw)))
        return out

    async def put(self, record: ApiKeyRecord) -> None:
        """Add or replace a record."""
        await self.client.set(REDIS_KEY + record.id, json.dumps(record.to_dict()))
        await self.client.sadd(REDIS_INDEX, record.id)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """One record, read now."""
        raw = await self.client.get(REDIS_KEY + key_id)
        return ApiKeyRecord.from_dict(key_id, json.loads(raw)) if raw else None


class KeyAdmin:
    """Create, list, revoke and rotate keys in either store (for `dotmac-sidecar apikey`)."""

    def __init__(self, store: FileKeyStore | RedisKeyStore) -> None:
        self.store = store

    async def all(self) -> list[ApiKeyRecord]:
        """Every record, oldest first."""
        if isinstance(self.store, FileKeyStore):
            records = self.store.all()
        else:
            records = await self.store.all()
        return sorted(records, key=lambda r: r.created)

    async def get(self, key_id: str) -> ApiKeyRecord:
        """One record; SidecarError when there is none."""
        if isinstance(self.store, FileKeyStore):
            record = self.store.get(key_id)
        else:
            record = await self.store.get(key_id)
        if record is None:
            raise SidecarError(f"no API key with id {key_id}")
        return record

    async def put(self, record: ApiKeyRecord) -> None:
        """Add or replace a record."""
        if isinstance(self.store, FileKeyStore):
            self.store.put(record)
        else:
            await self.store.put(record)

    async def close(self) -> None:
        """Release connections."""
        if isinstance(self.store, RedisKeyStore):
            await self.store.close()
