"""`dotmac-sidecar demo`: an echo app, the sidecar in front of it, and curl lines to try.

Needs no Redis and no Vault: tokens are HS256, signed with a secret made for this run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import tempfile
from pathlib import Path

from sidecar.app import Sidecar
from sidecar.auth.jwt import JWTService
from sidecar.config import (
    AuthConfig,
    Config,
    HostPort,
    IssuerConfig,
    ObservabilityConfig,
    Upstream,
)
from sidecar.echo import start_echo
from sidecar.observability import logging as logs

ISSUER = "dotmac-demo"
AUDIENCE = "demo"


def demo_policy() -> Path:
    """policies/example.yaml of the current folder, else the copy shipped in the package."""
    local = Path("policies/example.yaml")
    if local.is_file():
        return local.resolve()
    return Path(__file__).parent / "data" / "example-policy.yaml"


def _port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _demo(port: int, admin_port: int) -> int:
    secret = secrets.token_urlsafe(32)
    audit_file = Path(tempfile.gettempdir()) / f"dotmac-demo-audit-{os.getpid()}.log"
    echo_runner, echo_port = await start_echo()
    config = Config(
        listen=HostPort("127.0.0.1", _port(port)),
        upstream=Upstream("http", "127.0.0.1", echo_port),
        admin_listen=HostPort("127.0.0.1", _port(admin_port)),
        policy=demo_policy(),
        auth=AuthConfig(
            jwt=(
                IssuerConfig(
                    issuer=ISSUER,
                    audiences=(AUDIENCE,),
                    algorithms=("HS256",),
                    secret_env="DOTMAC_DEMO_SECRET",
                    secret=secret.encode(),
                ),
            )
        ),
        observability=ObservabilityConfig(log_format="text", access_log=True),
        audit_sink=f"file:{audit_file}",
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    minter = JWTService(
        secret_key=secret, issuer=ISSUER, audience=AUDIENCE, access_token_expire_minutes=60
    )
    support = minter.create_access_token("alice", roles=["support"])
    user = minter.create_access_token("bob", roles=["user"])
    base = f"http://127.0.0.1:{sidecar.listen_port}"
    print(
        "\nDotMac Sidecar demo is running.\n"
        f"  sidecar  {base}  ->  echo app 127.0.0.1:{echo_port}\n"
        f"  admin    http://127.0.0.1:{sidecar.admin_port}/metrics  /readyz\n"
        f"  policy   {config.policy}\n"
        f"  audit    {audit_file}\n\n"
        "Try (tokens are valid for 60 minutes):\n"
        f"  # allowed (200): alice has role support, which grants read:users\n"
        f"  curl -i -H 'Authorization: Bearer {support}' {base}/api/users\n"
        f"  # forbidden (403): bob has role user, which does not\n"
        f"  curl -i -H 'Authorization: Bearer {user}' {base}/api/users\n"
        f"  # unauthenticated (401): no token\n"
        f"  curl -i {base}/api/users\n\n"
        "Ctrl-C stops it.\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop()
    await echo_runner.cleanup()
    return 0


def run_demo(port: int = 8000, admin_port: int = 9090) -> int:
    """Run the demo until Ctrl-C."""
    import uvloop

    logs.configure(os.environ.get("DOTMAC_LOG_LEVEL", "INFO"), "text")
    return uvloop.run(_demo(port, admin_port))
