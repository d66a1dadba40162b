"""Benchmark: the sidecar's CPU time per request with tracing off and at ratio 1.0.

    python bench/tracing_cost.py [--requests 4000] [--runs 3]

Starts, on loopback, a tiny upstream (a separate process answering a fixed 1 KB body), an
OTLP/HTTP sink (a separate process that accepts and discards span batches), and for each
setting a `dotmac-sidecar run` process with an HS256 JWT rule, metrics and access log on
(to /dev/null). A client in this process sends the same token-bearing GETs over 16
keep-alive connections. The sidecar's CPU time (user + system, from /proc) is read before
and after, so the client's and the upstream's work is not counted. Medians of `--runs`.
A benchmark, not a test: it asserts nothing; loopback only; everything it starts it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import Subject, free_port, launch_sidecar, start

SECRET = "bench-hmac-secret-0123456789abcdef0123"

UPSTREAM = """
import sys
from aiohttp import web
BODY = b"x" * 1024
async def handle(request):
    return web.Response(body=BODY, content_type="text/plain")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

SINK = """
import sys
from aiohttp import web
async def traces(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
app = web.Application()
app.router.add_post("/v1/traces", traces)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

POLICY = """
roles:
  reader: {permissions: ["read:items"]}
rules:
  - {name: health, paths: ["/healthz"], methods: [GET], public: true}
  - name: items
    paths: ["/api/items/{id}"]
    methods: [GET]
    require: {permissions: ["read:items"]}
"""


async def load(url: str, token: str, requests: int, connections: int = 16) -> float:
    """Send `requests` GETs over `connections` keep-alive connections; seconds taken."""
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as client:
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with client.get(url, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"unexpected {r.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return time.perf_counter() - started


def measure(folder: Path, upstream: int, otlp: str, requests: int) -> float:
    """CPU microseconds the sidecar spent per request at one setting."""
    sidecar = launch_sidecar(
        folder,
        "sidecar",
        upstream,
        f"""auth:
  jwt:
    - {{issuer: bench, algorithms: [HS256], secret_env: BENCH_SECRET}}
observability:
  access_log: true
  otlp_endpoint: "{otlp}"
  trace_sample_ratio: 1.0
""",
        env={"BENCH_SECRET": SECRET},
    )
    try:
        now = int(time.time())
        token = jwt.encode(
            {"iss": "bench", "sub": "u1", "permissions": ["read:items"], "exp": now + 3600},
            SECRET,
            algorithm="HS256",
        )
        url = f"http://127.0.0.1:{sidecar.port}/api/items/42"
        asyncio.run(load(url, token, 500))  # warm-up: caches, pools, the span exporter
        before = sidecar.cpu_seconds()
        asyncio.run(load(url, token, requests))
        return (sidecar.cpu_seconds() - before) / requests * 1e6
    finally:
        sidecar.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "policy.yaml").write_text(POLICY)
        upstream_port, sink_port = free_port(), free_port()
        helpers: list[Subject] = []
        try:
            for name, code, port in (
                ("upstream", UPSTREAM, upstream_port),
                ("sink", SINK, sink_port),
            ):
                helpers.append(
                    start(
                        name, [sys.executable, "-c", code, str(port)], port, folder / f"{name}.log"
                    )
                )
            results: dict[str, list[float]] = {"off": [], "1.0": []}
            for _ in range(args.runs):
                results["off"].append(measure(folder, upstream_port, "", args.requests))
                results["1.0"].append(
                    measure(folder, upstream_port, f"http://127.0.0.1:{sink_port}", args.requests)
                )
        finally:
            for helper in helpers:
                helper.stop()
    off = statistics.median(results["off"])
    on = statistics.median(results["1.0"])
    print(f"sidecar CPU per request, median of {args.runs} runs of {args.requests} requests")
    print("| tracing | CPU us/request | runs |")
    print("| --- | ---: | --- |")
    runs = {k: ", ".join(f"{v:.0f}" for v in vs) for k, vs in results.items()}
    print(f"| off | {off:.0f} | {runs['off']} |")
    print(f"| ratio 1.0, OTLP export | {on:.0f} | {runs['1.0']} |")
    print(f"tracing adds {on - off:.0f} us of CPU per request ({(on / off - 1) * 100:.0f}%)")


if __name__ == "__main__":
    main()
