"""`workers: N`: N sidecar processes on one port, behind one admin port.

The process started as `dotmac-sidecar run` becomes the supervisor. It starts N workers
(the same command, marked as workers through the environment); each binds the listen port
with SO_REUSEPORT, so the kernel spreads connections over them, and its own admin port on
127.0.0.1:0, which it reports back through a pipe. The supervisor serves the configured
admin port:
- `/metrics`: every worker's metrics, merged (counters and histograms summed; gauges summed,
  except those where a sum means nothing: readiness takes the minimum, sizes and times the
  maximum), so Prometheus sees one sidecar, as with prometheus_client's multiprocess mode;
- `/readyz`: ready when every worker is (each reloads its own policy, keys and secrets);
- `/healthz`: alive while every worker runs.
SIGTERM (or SIGINT) goes to every worker, which stops accepting at once and drains; the
supervisor exits 0 once they all have. A worker that dies on its own is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.observability import logging as logs

WORKER_ENV = "_DOTMAC_SIDECAR_WORKER"  # "<index>:<fd>" in a worker's environment
# gauges whose sum over workers would be meaningless
_MIN_GAUGES = frozenset({"dotmac_sidecar_ready"})
_MAX_GAUGES = frozenset(
    {
        "dotmac_sidecar_build_info",
        "dotmac_sidecar_policy_rules",
        "dotmac_sidecar_secret_age_seconds",
        "process_max_fds",
        "process_start_time_seconds",
    }
)


def worker_slot() -> tuple[int, int] | None:
    """(index, report fd) when this process is a worker, else None."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, fd = value.partition(":")
    return int(index), int(fd)


def report_admin_port(fd: int, index: int, port: int) -> None:
    """A worker tells the supervisor where its admin app listens."""
    os.write(fd, f"{index} {port}\n".encode())
    os.close(fd)


def merge_metrics(texts: Iterable[str]) -> bytes:
    """One Prometheus text page from several workers' pages."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            combine: Callable[[float, float], float] = _add
            if family.name in _MIN_GAUGES:
                combine = _min
            elif family.name in _MAX_GAUGES:
                combine = _max
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif sample.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                else:
                    merged[key] = combine(merged[key], sample.value)

    class Merged:
        def collect(self) -> Iterable[Metric]:
            for name, family in families.items():
                out = Metric(name, family.documentation, family.type, family.unit)
                for (sample_name, labels), value in values[name].items():
                    out.add_sample(sample_name, dict(labels), value)
                yield out

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class Supervisor:
    """Starts, watches and stops the workers; serves the merged admin port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = config.workers
        self.admin_ports: dict[int, int] = {}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.session: aiohttp.ClientSession | None = None

    async def _start_worker(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **{WORKER_ENV: f"{index}:{write_fd}"})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            *sys.argv[1:],
            env=env,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        self.procs[index] = proc
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb")
        )
        try:
            async with asyncio.timeout(120):
                line = await reader.readline()
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if not line:
            raise SidecarError(f"worker {index} did not start (exit code {proc.returncode})")
        _, port = line.split()
        self.admin_ports[index] = int(port)

    async def _watch(self, index: int) -> None:
        backoff = 1.0
        while True:
            proc = self.procs[index]
            code = await proc.wait()
            if self.stopping:
                return
            logs.event(logging.ERROR, "worker_exited", worker=index, code=code)
            self.admin_ports.pop(index, None)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            with contextlib.suppress(SidecarError):
                await self._start_worker(index)

    async def _fetch(self, path: str) -> list[tuple[int, str]]:
        assert self.session is not None

        async def one(port: int | None) -> tuple[int, str]:
            if port is None:  # not started (yet, or again)
                return 503, ""
            assert self.session is not None
            try:
                async with self.session.get(f"http://127.0.0.1:{port}{path}") as r:
                    return r.status, await r.text()
            except (aiohttp.ClientError, TimeoutError):
                return 503, ""

        ports = [self.admin_ports.get(i) for i in range(self.count)]
        return list(await asyncio.gather(*(one(p) for p in ports)))

    def admin_app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            alive = sum(1 for p in self.procs.values() if p.returncode is None)
            ok = alive == self.count
            return web.json_response(
                {"alive": ok, "workers": f"{alive}/{self.count}"}, status=200 if ok else 503
            )

        async def readyz(request: web.Request) -> web.Response:
            answers = await self._fetch("/readyz")
            ready = all(status == 200 for status, _ in answers)
            checks: dict[str, Any] = {}

            for i, (status, text) in enumerate(answers):
                try:
                    checks.update(json.loads(text).get("checks", {}))
                except ValueError:
                    checks[f"worker:{i}"] = "not answering"
                    continue
                if status != 200:
                    checks[f"worker:{i}"] = "not ready"
            good = sum(1 for status, _ in answers if status == 200)
            checks["workers"] = f"{good}/{self.count} ready"
            return web.json_response(
                {"ready": ready, "checks": checks}, status=200 if ready else 503
            )

        async def metrics(request: web.Request) -> web.Response:
            answers = await self._fetch("/metrics")
            body = merge_metrics(text for status, text in answers if status == 200)
            return web.Response(
                body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app

    async def serve(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5.0), cookie_jar=aiohttp.DummyCookieJar()
        )
        runner = web.AppRunner(self.admin_app(), access_log=None, handle_signals=False)
        watchers: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(self._start_worker(i) for i in range(self.count)))
            watchers = [asyncio.create_task(self._watch(i)) for i in range(self.count)]
            await runner.setup()
            admin = self.config.admin_listen
            await web.TCPSite(runner, admin.host, admin.port).start()
            logs.event(
                logging.INFO,
                "workers_started",
                workers=self.count,
                listen=str(self.config.listen),
                admin=str(admin),
            )
            await stop.wait()
        finally:
            self.stopping = True
            logs.event(logging.INFO, "draining", workers=self.count)
            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.proxy.drain_timeout + 5
            for proc in self.procs.values():
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await runner.cleanup()
            await self.session.close()
        logs.event(logging.INFO, "stopped")
        return 0


def _add(a: float, b: float) -> float:
    return a + b


def _min(a: float, b: float) -> float:
    return min(a, b)


def _max(a: float, b: float) -> float:
    return max(a, b)
