"""HTTP/1 edge cases on the listening port, over raw sockets (contract 5.1 and 9)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import (
    Keys,
    Running,
    SidecarFactory,
    Upstream,
    make_token,
    raw_exchange,
    status_of,
)

GOOD = "Host: a\r\nConnection: close\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"TRACE /app/x HTTP/1.1\r\n" + GOOD.encode() + b"\r\n", 405, b"method_not_allowed"),
        (b"TRACK /app/x HTTP/1.1\r\n" + GOOD.encode() + b"\r\n", 405, b"method_not_allowed"),
        (b"CONNECT a:443 HTTP/1.1\r\n" + GOOD.encode() + b"\r\n", 405, b"method_not_allowed"),
        (b"FOO /app/x HTTP/1.1\r\n" + GOOD.encode() + b"\r\n", 400, b"bad_method"),
        (b"get /app/x HTTP/1.1\r\n" + GOOD.encode() + b"\r\n", 400, b"bad_method"),
        (b"GET /app/x HTTP/2.0\r\n" + GOOD.encode() + b"\r\n", 505, b"http_version_not_supported"),
        (b"GET /app/x\r\n\r\n", 400, b"http_0_9"),
        (b"GET /app/x HTTP/1.1\r\nConnection: close\r\n\r\n", 400, b"missing_host"),
        (
            b"POST /app/x HTTP/1.1\r\n"
            + GOOD.encode()
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"ambiguous_framing",
        ),
        (
            b"POST /app/x HTTP/1.1\r\n"
            + GOOD.encode()
            + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            400,
            b"ambiguous_framing",
        ),
        (b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"Bad Header: x\r\n\r\n", 400, b"bad_header"),
        # bodiless requests in one piece start in the fast lane (fastlane.py): framing
        # that could hide a second request must be refused there exactly as on aiohttp's side
        (
            b"GET /app/x HTTP/1.1\r\n"
            + GOOD.encode()
            + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
            400,
            b"ambiguous_framing",
        ),
        (
            b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"Content-Length: 0, 0\r\n\r\n",
            400,
            b"ambiguous_framing",
        ),
        (
            b"GET /app/x HTTP/1.1\r\n"
            + GOOD.encode()
            + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"ambiguous_framing",
        ),
        (
            b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"Transfer-Encoding: identity\r\n\r\n",
            400,
            b"ambiguous_framing",
        ),
        (b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"X-A: b\r\n c\r\n\r\n", 400, b"bad_header"),
        (b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"X-A: a\x00b\r\n\r\n", 400, b"bad_header"),
        (b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"X-A: a\rb\r\n\r\n", 400, b"bad_header"),
        (b"GET /app/x HTTP/1.1\nHost: a\nConnection: close\n\n", 400, b"bad_request_line"),
        (
            b"GET /app/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            400,
            b"duplicate_host",
        ),
        (
            b"GET /app/x HTTP/1.1\r\n" + GOOD.encode() + b"User-Agent: a\r\nUser-Agent: b\r\n\r\n",
            400,
            b"bad_header",
        ),
    ],
)
async def test_malformed_requests(
    proxy: Running, upstream: Upstream, request_bytes: bytes, status: int, reason: bytes
) -> None:
    raw = await raw_exchange(proxy.sidecar.listen_port, request_bytes)
    assert status_of(raw) == status, raw[:400]
    assert reason in raw
    assert b"application/json" in raw
    assert upstream.seen == []


async def test_oversized_headers_431(proxy: Running, upstream: Upstream) -> None:
    big = "X-Filler: " + "a" * 17000 + "\r\n"
    raw = await raw_exchange(
        proxy.sidecar.listen_port, f"GET /app/x HTTP/1.1\r\n{GOOD}{big}\r\n".encode()
    )
    assert status_of(raw) == 431
    assert b"request_header_fields_too_large" in raw
    many = "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(200))
    raw = await raw_exchange(
        proxy.sidecar.listen_port, f"GET /app/x HTTP/1.1\r\n{GOOD}{many}\r\n".encode()
    )
    assert status_of(raw) == 431
    assert upstream.seen == []


async def test_long_target_414(proxy: Running, upstream: Upstream) -> None:
    raw = await raw_exchange(
        proxy.sidecar.listen_port,
        f"GET /app/{'a' * 9000} HTTP/1.1\r\n{GOOD}\r\n".encode(),
    )
    assert status_of(raw) == 414
    assert b"uri_too_long" in raw


async def test_slow_headers_get_408_and_close(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    running: Running = await make_sidecar(
        upstream.url, extra="proxy:\n  header_read_timeout: 300ms\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.listen_port)
    started = time.monotonic()
    writer.write(b"GET /app/x HTTP/1.1\r\nHost: a\r\n")
    await writer.drain()
    reading = asyncio.ensure_future(reader.read(65536))
    async with asyncio.timeout(5):
        while not reading.done():  # a slowloris: one more header byte every 50 ms
            await asyncio.sleep(0.05)
            try:
                writer.write(b"X")
            except (ConnectionError, RuntimeError):
                break
        data = await reading
    elapsed = time.monotonic() - started
    assert status_of(data) == 408, data
    assert b"request_timeout" in data
    assert elapsed < 2.0
    writer.close()
    assert upstream.seen == []


async def test_idle_connection_closed_after_header_timeout(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    running: Running = await make_sidecar(
        upstream.url, extra="proxy:\n  header_read_timeout: 200ms\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.listen_port)
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed without a word
    writer.close()


async def test_keep_alive_serves_several_requests(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    token = make_token(keys, roles=["admin"]).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sidecar.listen_port)
    for i in range(3):
        writer.write(
            b"GET /app/%d HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\n\r\n" % (i, token)
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        await reader.readexactly(length)
    writer.close()
    assert [s["path"] for s in upstream.seen] == ["/app/0", "/app/1", "/app/2"]


async def test_expect_100_continue_only_after_authorization(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    token = make_token(keys, roles=["admin"]).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sidecar.listen_port)
    writer.write(
        b"POST /app/up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.seen[0]["path"] == "/app/up"
    assert "expect" not in [k.lower() for k, _ in upstream.seen[0]["headers"]]

    # no credential: the final 401 comes at once and no 100 is ever sent
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sidecar.listen_port)
    writer.write(
        b"POST /app/up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    writer.close()
    assert len(upstream.seen) == 1


async def test_connection_cap(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    running: Running = await make_sidecar(upstream.url, extra="proxy:\n  max_connections: 2\n")
    port = running.sidecar.listen_port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    raw = await raw_exchange(port, f"GET /healthz HTTP/1.1\r\n{GOOD}\r\n".encode())
    assert status_of(raw) == 503
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)
    raw = await raw_exchange(port, f"GET /healthz HTTP/1.1\r\n{GOOD}\r\n".encode())
    assert status_of(raw) == 200
