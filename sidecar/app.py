"""The one place that wires everything: proxy server, admin server, background loops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import http_parser, web
from prometheus_client import CollectorRegistry

from sidecar.auth.apikeys import FileKeyStore, RedisKeyStore
from sidecar.auth.authenticate import Authenticator
from sidecar.auth.jwks import KeySet
from sidecar.auth.jwt import TokenVerifier
from sidecar.config import Config, HostPort
from sidecar.errors import PolicyError, SidecarError
from sidecar.observability import logging as logs
from sidecar.observability.health import build_admin_app
from sidecar.observability.metrics import Metrics
from sidecar.observability.tracing import Tracing
from sidecar.policy.load import load_policy
from sidecar.policy.model import Policy
from sidecar.policy.testing import load_cases, run_cases, test_files
from sidecar.policy.watch import PolicyWatcher
from sidecar.proxy.forward import Forwarder
from sidecar.proxy.handler import ProxyHandler, reject_hook
from sidecar.proxy.headers import HeaderRules
from sidecar.proxy.paths import canonical
from sidecar.proxy.server import ProxyServer
from sidecar.secrets.audit import AuditLog
from sidecar.secrets.inject import SecretHeaders
from sidecar.secrets.providers import EnvProvider, FileProvider, Provider, Secret
from sidecar.secrets.render import FileRenderer
from sidecar.secrets.rotation import SecretStore
from sidecar.workers import Supervisor, report_admin_port, worker_slot


def require_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser: several request-smuggling
    fixes exist only in the C parser."""
    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise SidecarError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or the "
            "extension is missing); refusing to start"
        )


class Sidecar:
    """One sidecar: built from a Config, started and stopped on the running loop."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None) -> None:
        require_c_parser()
        self.config = config
        self.metrics = Metrics(registry)
        self.policy_path = Path(config.policy)
        policy = load_policy(self.policy_path)  # an invalid policy at start is fatal
        failures = self._policy_test_failures(policy) if config.policy_tests != "off" else []
        if failures and config.policy_tests == "enforce":
            raise SidecarError("policy tests failed: " + "; ".join(failures))
        if failures:
            logs.event(logging.WARNING, "policy_tests_failed", failures=failures)
        self.metrics.policy_rules.set(len(policy.rules))
        auth = config.auth
        api_key_header = auth.api_keys.header if auth.api_keys else "X-API-Key"
        cookies = tuple(sorted({i.cookie for i in auth.jwt if i.cookie}))
        self.audit = AuditLog(config.audit_sink)
        sc = config.secrets
        self.secret_store: SecretStore | None = None
        self.renderers = [FileRenderer(f) for f in sc.files]
        secret_headers: SecretHeaders | None = None
        self._hmac_secrets = {i.secret_path: i for i in config.auth.jwt if i.secret_path}
        if sc.headers or sc.files or self._hmac_secrets:
            self.secret_store = SecretStore(
                make_provider(config),
                [h.secret for h in sc.headers if "{tenant}" not in h.secret]
                + [f.secret for f in sc.files]
                + list(self._hmac_secrets),
                interval=sc.refresh_interval,
                renderers=self.renderers,
                on_refresh=lambda result: self.metrics.secret_refresh.labels(result).inc(),
                on_loaded=self._secret_loaded,
            )
            for path in self.secret_store.paths:
                self.metrics.secret_age.labels(path).set_function(self._age_of(path))
            if sc.headers:
                secret_headers = SecretHeaders(sc.headers, self.secret_store, self.audit)
        headers = HeaderRules(
            config.proxy.identity_header_prefix,
            secret_headers=secret_headers.names if secret_headers else (),
            strip_authorization=config.proxy.strip_authorization,
            credential_headers=(api_key_header,) if auth.api_keys else (),
            credential_cookies=cookies,
        )
        self.forwarder = Forwarder(config.upstream, config.proxy, headers)
        self.keysets = {
            i.issuer: KeySet(
                i.issuer,
                i.jwks_url,
                refresh=i.jwks_refresh,
                on_fetch=self._jwks_counter(i.issuer),
                on_keys_removed=lambda: self.verifier.forget(),
            )
            for i in auth.jwt
            if i.jwks_url and i.issuer
        }
        self.verifier = TokenVerifier(auth.jwt, self.keysets)
        self.key_store: FileKeyStore | RedisKeyStore | None = None
        if auth.api_keys is not None:
            if auth.api_keys.store == "redis":
                self.key_store = RedisKeyStore(auth.redis_url)
            else:
                assert auth.api_keys.file is not None
                self.key_store = FileKeyStore(auth.api_keys.file)
        authenticator = Authenticator(
            self.verifier,
            self.key_store,
            api_key_header=api_key_header,
            cookies=cookies,
            query_params=tuple(sorted({i.query_param for i in auth.jwt if i.query_param})),
            on_unknown_kid=lambda issuer: self.metrics.unknown_kid.labels(issuer).inc(),
        )
        self._jwks_session: aiohttp.ClientSession | None = None
        self._notify_session: aiohttp.ClientSession | None = None
        obs = config.observability
        self.tracing = Tracing(
            service_name=obs.service_name,
            otlp_endpoint=obs.otlp_endpoint,
            sample_ratio=obs.trace_sample_ratio,
            on_spans=self.metrics.count_spans,
        )
        for reason in ("queue_full", "export_failed"):
            self.metrics.spans_dropped.labels(reason)  # present at 0 from the start
        self.handler = ProxyHandler(
            policy=policy,
            authenticator=authenticator,
            forwarder=self.forwarder,
            headers=headers,
            metrics=self.metrics,
            proxy=config.proxy,
            secret_headers=secret_headers,
            audit=self.audit,
            tracing=self.tracing,
        )
        self.watcher = PolicyWatcher(
            self.policy_path,
            policy,
            interval=config.policy_reload_interval,
            on_change=self._swap_policy,
            on_result=lambda result: self.metrics.policy_reloads.labels(result).inc(),
            gate=self._policy_test_failures if config.policy_tests != "off" else None,
            enforce_tests=config.policy_tests == "enforce",
            test_sources=self._test_sources,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.draining = False
        self.listen_port = 0
        self.admin_port = 0
        self.metrics.ready.set_function(lambda: 1.0 if self.ready() else 0.0)

    def _secret_loaded(self, secret: Secret) -> None:
        self.audit.secret_loaded(path=secret.path, version=secret.version, purpose="refresh")
        issuer = self._hmac_secrets.get(secret.path)
        if issuer is not None and issuer.issuer is not None:
            value = secret.data.get(issuer.secret_field)
            if value:
                self.verifier.set_secret(issuer.issuer, value.encode())
            else:
                logs.event(
                    logging.ERROR,
                    "jwt_secret_missing_field",
                    secret=secret.path,
                    field=issuer.secret_field,
                )

    def _age_of(self, path: str) -> Callable[[], float]:
        def age() -> float:
            assert self.secret_store is not None
            loaded = self.secret_store.loaded_at.get(path)
            return time.time() - loaded if loaded is not None else -1.0

        return age

    def _jwks_counter(self, issuer: str) -> Callable[[str], None]:
        def count(result: str) -> None:
            self.metrics.jwks_refresh.labels(issuer, result).inc()

        return count

    def _swap_policy(self, policy: Policy) -> None:
        self.handler.policy = policy  # one assignment: requests see the old or the new whole
        self.metrics.policy_rules.set(len(policy.rules))

    def _test_sources(self) -> list[tuple[str, str]]:
        out = []
        for file in test_files(self.policy_path):
            try:
                out.append((str(file), file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                out.append((str(file), ""))
        return out

    def _policy_test_failures(self, policy: Policy) -> list[str]:
        """The failing cases of the *_test.yaml files beside the policy (blocking I/O)."""
        files = test_files(self.policy_path)
        if not files:
            return []
        try:
            cases = load_cases(files)
        except PolicyError as exc:
            return [str(exc)]
        lines, _, failed = run_cases(policy, canonical, cases)
        return [line.strip() for line in lines if line.startswith("FAIL")] if failed else []

    async def readiness(self) -> tuple[dict[str, str], frozenset[str]]:
        """/readyz checks: the sidecar's own state gates; the upstream is only reported."""
        checks, gating = self.own_state()
        checks["upstream"] = await self._probe_upstream()
        if isinstance(self.key_store, RedisKeyStore):
            checks["api_keys"] = await self.key_store.ping()
        elif self.key_store is not None:
            checks["api_keys"] = self.key_store.status()
        return checks, gating

    def ready(self) -> bool:
        """Whether every gating check of /readyz holds (read by the ready gauge)."""
        checks, gating = self.own_state()
        return all(checks.get(name) == "ok" for name in gating)

    def own_state(self) -> tuple[dict[str, str], frozenset[str]]:
        """The checks on the sidecar's own state, and which of them gate readiness."""
        policy = self.handler.policy
        checks = {
            "policy": "ok" if policy is not None else "not loaded",
            "policy_reload": self.watcher.last_error or "ok",
            "draining": "no" if not self.draining else "yes",
        }
        gating = {"policy"}
        for issuer, keyset in self.keysets.items():
            checks[f"jwks:{issuer}"] = keyset.status()
            gating.add(f"jwks:{issuer}")
        if self.secret_store is not None:
            for path in self.secret_store.paths:
                checks[f"secret:{path}"] = self.secret_store.status(path)
                gating.add(f"secret:{path}")
            for renderer in self.renderers:
                name = f"file:{renderer.spec.path}"
                checks[name] = (
                    "ok"
                    if renderer.ready
                    else (f"not written yet: {renderer.last_error or 'waiting for its secret'}")
                )
                gating.add(name)
        if self.draining:
            checks["policy"] = "draining"
        return checks, frozenset(gating)

    async def _probe_upstream(self) -> str:
        up = self.config.upstream
        try:
            async with asyncio.timeout(0.5):
                _, writer = await asyncio.open_connection(up.host, up.port)
        except (OSError, TimeoutError):
            return "unreachable"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "ok"

    async def start(self) -> None:
        """Bind the proxy and admin ports and start serving."""
        cfg = self.config
        await self.forwarder.start()
        server = ProxyServer(
            self.handler,
            limits=cfg.proxy,
            on_reject=reject_hook(self.metrics),
            max_line_size=cfg.proxy.max_header_bytes,
            max_field_size=cfg.proxy.max_header_bytes,
            keepalive_timeout=75.0,
            access_log=None,
            auto_decompress=False,
        )
        self._proxy_runner = web.ServerRunner(
            server, shutdown_timeout=cfg.proxy.drain_timeout, handle_signals=False
        )
        await self._proxy_runner.setup()
        site = web.TCPSite(
            self._proxy_runner,
            cfg.listen.host,
            cfg.listen.port,
            backlog=1024,
            reuse_address=True,
            reuse_port=cfg.workers > 1,
        )
        await site.start()
        self.listen_port = _bound_port(self._proxy_runner)

        if self.keysets:
            self._jwks_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=5.0), cookie_jar=aiohttp.DummyCookieJar()
            )
            for keyset in self.keysets.values():
                self._tasks.append(asyncio.create_task(keyset.run(self._jwks_session), name="jwks"))
        if isinstance(self.key_store, FileKeyStore):
            self._tasks.append(asyncio.create_task(self.key_store.run(), name="api-keys"))
        if self.secret_store is not None:
            self._notify_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=5.0), cookie_jar=aiohttp.DummyCookieJar()
            )
            self._tasks.append(
                asyncio.create_task(self.secret_store.run(self._notify_session), name="secrets")
            )
        if cfg.policy_reload_interval > 0:
            await self.watcher.prime()
            self._tasks.append(asyncio.create_task(self.watcher.run(), name="policy-watch"))

        admin = build_admin_app(self.metrics, self.readiness)
        self._admin_runner = web.AppRunner(admin, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, cfg.admin_listen.host, cfg.admin_listen.port)
        await admin_site.start()
        self.admin_port = _bound_port(self._admin_runner)
        logs.event(
            20,
            "started",
            listen=f"{cfg.listen.host}:{self.listen_port}",
            admin=f"{cfg.admin_listen.host}:{self.admin_port}",
            upstream=str(cfg.upstream),
            policy=str(cfg.policy),
            rules=len(self.handler.policy.rules),
        )

    async def stop(self) -> None:
        """Stop accepting at once, let in-flight requests finish (drain_timeout), close."""
        self.draining = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        await self.forwarder.close()
        for session in (self._jwks_session, self._notify_session):
            if session is not None:
                await session.close()
        self._jwks_session = self._notify_session = None
        self.audit.close()
        if self.tracing.enabled:
            await asyncio.to_thread(self.tracing.shutdown)  # bounded; spans still queued go
        if isinstance(self.key_store, RedisKeyStore):
            await self.key_store.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None


def make_provider(config: Config) -> Provider:
    """The secrets provider the config names."""
    sc = config.secrets
    if sc.provider == "env":
        return EnvProvider()
    if sc.provider == "vault":
        from sidecar.secrets.vault import VaultProvider  # hvac loads only when it is used

        v = sc.vault
        assert v is not None
        return VaultProvider(
            url=v.url,
            token=v.token,
            auth=v.auth_method,
            role=v.role,
            role_id=v.role_id,
            secret_id=v.secret_id,
            jwt_path=v.jwt_path,
            auth_mount=v.auth_mount,
            mount_point=v.kv_mount,
            transit_mount=v.transit_mount,
        )
    return FileProvider(sc.file)


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise SidecarError("the server did not bind a TCP port")


async def serve(config: Config) -> int:
    """Run a sidecar until SIGTERM or SIGINT; then drain and return 0."""
    slot = worker_slot()
    if slot is not None:  # one of `workers: N`: own admin port, reported to the supervisor
        config = dataclasses.replace(config, admin_listen=HostPort("127.0.0.1", 0))
    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
    except OSError as exc:
        await sidecar.stop()
        raise SidecarError(f"cannot listen: {exc.strerror or exc}") from None
    tune_gc()
    orphan_watch: asyncio.Task[None] | None = None
    if slot is not None:
        report_admin_port(slot[1], slot[0], sidecar.admin_port)
        orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
    await stop.wait()
    if orphan_watch is not None:
        orphan_watch.cancel()
    logs.event(20, "draining", timeout_s=config.proxy.drain_timeout)
    await sidecar.stop()
    logs.event(20, "stopped")
    return 0


def tune_gc() -> None:
    """After start-up: what was loaded stays (freeze it out of every collection), and the
    young generation is collected less often; a request allocates a few hundred objects,
    most freed by reference counting, so the default threshold of 700 ran a collection
    every couple of requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) drains and exits on its own."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells of a parent death)
        await asyncio.sleep(1.0)
    logs.event(30, "supervisor_gone", parent=parent)
    stop.set()


def run(config: Config) -> int:
    """Configure logging and run the sidecar (or, with `workers: N`, its workers) on uvloop."""
    import uvloop

    worker = worker_slot() is not None
    if worker:
        # several processes share stdout: one write per line keeps lines whole
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    logs.configure(
        config.observability.log_level,
        config.observability.log_format,
        access_log=config.observability.access_log,
        access_log_sample_ratio=config.observability.access_log_sample_ratio,
    )
    if config.workers > 1 and not worker:
        require_c_parser()
        load_policy(Path(config.policy))  # an invalid policy is fatal before any worker runs
        return uvloop.run(Supervisor(config).serve())
    return uvloop.run(serve(config))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
