"""The admin app: /healthz (alive), /readyz (own state only), /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.observability.metrics import Metrics

# checks: name -> "ok" or what is wrong; `gating` names the checks readiness depends on
ReadinessCheck = Callable[[], Awaitable[tuple[dict[str, str], frozenset[str]]]]


def build_admin_app(metrics: Metrics, readiness: ReadinessCheck) -> web.Application:
    """The admin application; never proxied, never authenticated, bind it to a private port."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(request: web.Request) -> web.Response:
        checks, gating = await readiness()
        ready = all(checks.get(name) == "ok" for name in gating)
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app
