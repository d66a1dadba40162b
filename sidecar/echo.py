"""A small app that echoes what it received: the demo's upstream, and the tests'.

GET/POST anything: JSON with method, path (as received, raw), query, headers (as a list of
pairs, in order), body length and SHA-256. Special paths: `/slow?ms=N` answers after N ms,
`/big?bytes=N` streams N bytes, `/ws` echoes WebSocket messages.
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import WSMsgType, web


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse(protocols=("echo",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws
    if request.path == "/slow":
        await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
    if request.path == "/big":
        total = int(request.query.get("bytes", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = total
        await resp.prepare(request)
        block = b"x" * 65536
        sent = 0 if request.method != "HEAD" else total
        while sent < total:
            part = block[: min(len(block), total - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.partition("?")[0],
            "query": request.raw_path.partition("?")[2],
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


def echo_server() -> web.Server:
    """The echo app as a low-level aiohttp server (sees raw paths, no routing)."""
    return web.Server(handle)


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[web.ServerRunner, int]:
    """Start the echo app; returns its runner (for cleanup) and bound port."""
    runner = web.ServerRunner(echo_server(), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, int(bound)
