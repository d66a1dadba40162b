"""Forwarding: streaming without buffering, upstream failures, WebSocket, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import psutil
import pytest

from sidecar.app import free_port
from tests.conftest import (
    Keys,
    Process,
    Running,
    SidecarFactory,
    Upstream,
    make_token,
    raw_exchange,
    serve_loopback,
    status_of,
)

MB = 1024 * 1024


async def _watch_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.02)


async def test_100mb_each_way_streams_without_buffering(
    sidecar_process: Callable[..., Process], upstream: Upstream, keys: Keys
) -> None:
    proc = sidecar_process(upstream.url)
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    size = 100 * MB
    block = bytes(range(256)) * 256  # 64 KiB
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{proc.url}/app/warmup", headers=auth) as r:
            assert r.status == 200
        baseline = psutil.Process(proc.proc.pid).memory_info().rss
        peak = [baseline]
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_rss(proc.proc.pid, peak, stop))

        expected = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // len(block)):
                expected.update(block)
                yield block

        async with client.post(
            f"{proc.url}/app/upload", data=body(), headers={**auth, "Content-Length": str(size)}
        ) as r:
            assert r.status == 200
            echoed = await r.json()
        assert echoed["body_bytes"] == size
        assert echoed["body_sha256"] == expected.hexdigest()

        received = 0
        async with client.get(f"{proc.url}/big?bytes={size}", headers=auth) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(MB):
                received += len(chunk)
        assert received == size
        stop.set()
        await watcher
    growth = (peak[0] - baseline) / MB
    print(
        f"\nRSS baseline {baseline / MB:.1f} MB, peak {peak[0] / MB:.1f} MB, growth {growth:.1f} MB"
    )
    assert growth < 30, f"sidecar RSS grew by {growth:.1f} MB while streaming 2 x 100 MB"


async def test_upstream_down_is_502_within_connect_timeout(
    make_sidecar: SidecarFactory, keys: Keys
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    running: Running = await make_sidecar(dead, extra="proxy:\n  connect_timeout: 1s\n")
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        async with client.get(f"{running.url}/app/x", headers=auth) as r:
            body = await r.json()
        assert r.status == 502
        assert time.monotonic() - started < 1.0
    assert body["error"] == "bad_gateway"
    assert body["reason"] == "upstream_unreachable"


async def test_slow_upstream_is_504(
    make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    running: Running = await make_sidecar(upstream.url, extra="proxy:\n  upstream_timeout: 400ms\n")
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        async with client.get(f"{running.url}/slow?ms=3000", headers=auth) as r:
            body = await r.json()
        elapsed = time.monotonic() - started
        assert r.status == 504
        assert 0.3 < elapsed < 2.0
        assert body["error"] == "gateway_timeout"
        # a fast answer on the same sidecar still works
        async with client.get(f"{running.url}/slow?ms=10", headers=auth) as r:
            assert r.status == 200


async def test_request_body_limit_413(
    make_sidecar: SidecarFactory, upstream: Upstream, keys: Keys
) -> None:
    running: Running = await make_sidecar(upstream.url, extra="proxy:\n  max_body_bytes: 1000\n")
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{running.url}/app/x", data=b"x" * 2000, headers=auth) as r:
            assert r.status == 413
            assert (await r.json())["error"] == "payload_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"y" * 600

        async with client.post(f"{running.url}/app/x", data=chunked(), headers=auth) as r:
            assert r.status == 413
        async with client.post(f"{running.url}/app/x", data=b"x" * 900, headers=auth) as r:
            assert r.status == 200
    # the declared-too-large body never reached the app; the small one did, whole
    assert all(s["path"] == "/app/x" for s in upstream.seen)
    assert ("Content-Length", "900") in upstream.seen[-1]["headers"]


async def test_response_headers_and_bytes_pass_untouched(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    auth = {
        "Authorization": f"Bearer {make_token(keys, roles=['admin'])}",
        "Accept-Encoding": "gzip",
    }
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{proxy.url}/big?bytes=12345", headers=auth) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "12345"
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert len(await r.read()) == 12345
        async with client.head(f"{proxy.url}/big?bytes=500", headers=auth) as r:
            assert r.status == 200


async def test_websocket_passthrough_after_checks(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"{proxy.url}/ws", headers=auth, protocols=["echo"]) as ws:
            assert ws.protocol == "echo"
            await ws.send_str("hi")
            assert (await ws.receive_str(timeout=5)) == "echo:hi"
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive_bytes(timeout=5)) == b"\x00\x01"
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with client.ws_connect(f"{proxy.url}/ws"):
                pass
        assert info.value.status == 401
    seen = [s for s in upstream.seen if s["path"] == "/ws"]
    assert len(seen) == 1
    names = {k.lower() for k, _ in seen[0]["headers"]}
    assert "x-auth-subject" in names


async def test_sigterm_drains_in_flight_then_exits_0(
    sidecar_process: Callable[..., Process], upstream: Upstream, keys: Keys
) -> None:
    proc = sidecar_process(upstream.url)
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        in_flight = asyncio.ensure_future(client.get(f"{proc.url}/slow?ms=1500", headers=auth))
        await asyncio.sleep(0.4)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # no new connections are accepted while draining
        with pytest.raises(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", proc.port)
            w.close()
        resp = await in_flight
        assert resp.status == 200
        assert (await resp.json())["path"] == "/slow"
        resp.release()
    code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
    assert code == 0, proc.log.read_text()[-2000:]
    assert "stopped" in proc.log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM])
async def test_drain_timeout_bounds_shutdown(
    sidecar_process: Callable[..., Process], upstream: Upstream, keys: Keys, sig: int
) -> None:
    proc = sidecar_process(upstream.url, extra="proxy:\n  drain_timeout: 500ms\n")
    auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
    async with aiohttp.ClientSession() as client:
        in_flight = asyncio.ensure_future(client.get(f"{proc.url}/slow?ms=10000", headers=auth))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.proc.send_signal(sig)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
        assert code == 0
        assert time.monotonic() - started < 3.0
        with pytest.raises(aiohttp.ClientError):
            resp = await in_flight
            await resp.read()


async def test_upstream_connections_are_kept_alive_and_reused(
    make_sidecar: SidecarFactory, keys: Keys
) -> None:
    """Sequential requests reuse one pooled connection to the app; a HEAD answer, an
    interim 100 and a close-delimited body are each handled without confusing the next."""
    from aiohttp import web

    peers: list[object] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        if request.path == "/app/close-delimited":
            response = web.StreamResponse(headers={"Connection": "close"})
            response.force_close()
            await response.prepare(request)
            await response.write(b"until-close")
            return response
        return web.Response(text=f"{request.method} {request.path}")

    runner, port = await serve_loopback(web.Server(handler))
    try:
        running: Running = await make_sidecar(f"http://127.0.0.1:{port}")
        auth = {"Authorization": f"Bearer {make_token(keys, roles=['admin'])}"}
        async with aiohttp.ClientSession() as client:
            for i in range(20):
                method = "HEAD" if i == 5 else "GET"
                async with client.request(method, f"{running.url}/app/{i}", headers=auth) as r:
                    assert r.status == 200
                    body = await r.read()
                    assert body == (b"" if method == "HEAD" else f"GET /app/{i}".encode())
            async with client.get(f"{running.url}/app/close-delimited", headers=auth) as r:
                assert r.status == 200 and await r.read() == b"until-close"
            async with client.get(f"{running.url}/app/after", headers=auth) as r:
                assert r.status == 200 and await r.read() == b"GET /app/after"
    finally:
        await runner.cleanup()
    # requests 0-4 on one connection; the HEAD closed it; 6-19 on the next one
    assert len(set(peers[:5])) == 1 and len(set(peers[6:20])) == 1
    assert len(set(peers)) <= 4


async def test_header_bytes_pass_unchanged_on_both_lanes(make_sidecar: SidecarFactory) -> None:
    """Header values are opaque bytes: a bodiless GET (the fast lane) and a POST (aiohttp's
    side) carry the client's bytes to the app as sent, valid UTF-8 or not, without the
    blanks after a value (RFC 9110 5.5); the app's UTF-8 header comes back byte for byte,
    on a complete answer and on a streamed one. The app here is a raw socket server, so
    what it records is the bytes on the wire."""
    heads: list[bytes] = []
    back = b"X-Back: caf\xc3\xa9 \xe2\x82\xac\r\n"

    writers: list[asyncio.StreamWriter] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                if b" /public/stream " in head.split(b"\r\n", 1)[0]:
                    chunked = b"Transfer-Encoding: chunked\r\n\r\n"
                    writer.write(b"HTTP/1.1 200 OK\r\n" + back + chunked)
                    for part in (b"4\r\none-\r\n", b"3\r\ntwo\r\n", b"0\r\n\r\n"):
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.05)  # pieces: the answer is streamed, not whole
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\n" + back + b"Content-Length: 5\r\n\r\nwhole")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        running: Running = await make_sidecar(f"http://127.0.0.1:{port}")
        for value in (b"caf\xc3\xa9 \xe2\x82\xac", b"caf\xe9"):  # valid UTF-8, and not
            for path in (b"/public/whole", b"/public/stream"):
                for method, body in ((b"GET", b""), (b"POST", b"x")):
                    sent = b"%s %s HTTP/1.1\r\nHost: a\r\nX-Name: %s\r\nX-Padded: v \t\r\n" % (
                        method,
                        path,
                        value,
                    )
                    if body:
                        sent += b"Content-Length: 1\r\n"
                    raw = await raw_exchange(
                        running.sidecar.listen_port, sent + b"Connection: close\r\n\r\n" + body
                    )
                    where = (method, path, value)
                    assert status_of(raw) == 200, (where, raw[:300])
                    head = heads.pop()
                    assert b"\r\nX-Name: " + value + b"\r\n" in head, (where, head)
                    assert b"\r\nX-Padded: v\r\n" in head, (where, head)
                    assert b"\r\n" + back in raw, (where, raw)
    finally:
        server.close()
        for writer in writers:  # the sidecar's pooled connections to this app
            writer.close()
        await server.wait_closed()
