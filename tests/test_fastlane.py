"""The fast lane of the proxy port (sidecar/proxy/fastlane.py), over raw sockets.

Plain requests are answered by the httptools protocol; anything else moves the connection
to aiohttp's protocol mid-stream. Both lanes must give the same answers, in order, with no
byte lost between them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools
import pytest
from aiohttp import web

from tests.conftest import Running, SidecarFactory, Upstream, serve_loopback


@dataclass
class Answer:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Collector:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.current = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.answers.append(self.current)
        self.current = Answer()


async def exchange(
    port: int, parts: list[bytes], count: int, *, pause: float = 0.0, head: bool = False
) -> tuple[list[Answer], bool]:
    """Send `parts` (with `pause` between them), read `count` answers; also whether the
    server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = _Collector()
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(10):
            while len(got.answers) < count:
                data = await reader.read(65536)
                assert data, f"connection closed after {len(got.answers)} answers"
                if head:  # a HEAD answer has a length but no body: end the message by hand
                    got.parser.feed_data(data)
                    if got.current.status and not got.current.body:
                        got.answers.append(got.current)
                        got.current = Answer()
                        got.parser = httptools.HttpResponseParser(got)
                    continue
                got.parser.feed_data(data)
        try:
            async with asyncio.timeout(0.5):
                closed = await reader.read(1) == b""
        except TimeoutError:
            closed = False
        return got.answers, closed
    finally:
        writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()


def echoed(answer: Answer) -> dict[str, object]:
    assert answer.status == 200, answer
    data: dict[str, object] = json.loads(answer.body)
    return data


async def test_pipelined_requests_answered_in_order_across_both_lanes(
    proxy: Running, upstream: Upstream
) -> None:
    port = proxy.sidecar.listen_port
    answers, closed = await exchange(
        port, [get("/public/a") + get("/public/b") + get("/public/c")], 3
    )
    assert [echoed(a)["path"] for a in answers] == ["/public/a", "/public/b", "/public/c"]
    assert not closed  # keep-alive

    # a plain GET, then a POST with a body: the connection moves to aiohttp between them
    post = b"POST /public/e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    answers, _ = await exchange(port, [get("/public/d") + post + get("/public/f")], 3)
    bodies = [echoed(a) for a in answers]
    assert [b["path"] for b in bodies] == ["/public/d", "/public/e", "/public/f"]
    assert [b["method"] for b in bodies] == ["GET", "POST", "GET"]
    assert bodies[1]["body_bytes"] == 5
    assert [s["path"] for s in upstream.seen] == [f"/public/{c}" for c in "abcdef"]


async def test_a_head_in_pieces_and_one_in_one_piece_get_the_same_answer(proxy: Running) -> None:
    port = proxy.sidecar.listen_port
    whole = get("/public/same", "X-Request-ID: same-id\r\n")
    (fast,), _ = await exchange(port, [whole], 1)
    (slow,), _ = await exchange(port, [whole[:20], whole[20:]], 1, pause=0.2)
    assert fast.status == slow.status == 200
    seen_fast, seen_slow = echoed(fast), echoed(slow)
    for seen in (seen_fast, seen_slow):  # a new trace per request: its header differs
        seen["headers"] = [h for h in seen["headers"] if h[0] != "traceparent"]  # type: ignore[attr-defined]
    assert seen_fast == seen_slow

    def names(a: Answer) -> list[str]:
        return sorted(n.lower() for n, _ in a.headers if n.lower() not in ("date", "server"))

    assert names(fast) == names(slow)
    assert fast.header("X-Request-ID") == slow.header("X-Request-ID") == ["same-id"]
    assert len(fast.header("Date")) == 1


async def test_connection_close_is_honoured(proxy: Running) -> None:
    answers, closed = await exchange(
        proxy.sidecar.listen_port, [get("/public/x", "Connection: close\r\n")], 1
    )
    assert answers[0].status == 200
    assert answers[0].header("Connection") == ["close"]
    assert closed


async def test_head_has_a_length_and_no_body_and_the_connection_goes_on(proxy: Running) -> None:
    port = proxy.sidecar.listen_port
    head = b"HEAD /public/h HTTP/1.1\r\nHost: a\r\n\r\n"
    (answer,), _ = await exchange(port, [head], 1, head=True)
    assert answer.status == 200
    assert int(answer.header("Content-Length")[0]) > 0  # the app's, for the GET it would get
    assert answer.body == b""
    # an error answer to a HEAD: no body either, and the next request is read correctly
    answers, _ = await exchange(
        port, [b"HEAD /admin/x HTTP/1.1\r\nHost: a\r\n\r\n", get("/public/after")], 2, head=True
    )
    assert answers[0].status == 401 and answers[0].body == b""
    assert echoed(answers[1])["path"] == "/public/after"


@pytest.fixture
async def odd_app() -> AsyncIterator[int]:
    """An app answering with hop-by-hop headers, and with a slow chunked body."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path.endswith("/chunked"):
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"part{i};".encode())
                await asyncio.sleep(0.02)
            await resp.write_eof()
            return resp
        return web.Response(
            text="ok",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "Keep-Alive": "timeout=5",
                "X-Kept": "yes",
            },
        )

    runner, port = await serve_loopback(web.Server(handler))
    yield port
    await runner.cleanup()


async def test_app_headers_cleaned_and_chunked_bodies_streamed(
    make_sidecar: SidecarFactory, odd_app: int
) -> None:
    running: Running = await make_sidecar(f"http://127.0.0.1:{odd_app}")
    port = running.sidecar.listen_port
    answers, _ = await exchange(port, [get("/public/plain") + get("/public/chunked")], 2)
    plain, chunked = answers
    assert plain.status == 200 and plain.body == b"ok"
    assert plain.header("X-Kept") == ["yes"]
    for hop in ("X-Hop", "Keep-Alive", "Connection", "Transfer-Encoding"):
        assert plain.header(hop) == [], hop
    assert plain.header("Content-Length") == ["2"]
    assert len(plain.header("X-Request-ID")) == 1
    assert chunked.status == 200
    assert chunked.body == b"".join(f"part{i};".encode() for i in range(5))
    assert chunked.header("Transfer-Encoding") == ["chunked"]
