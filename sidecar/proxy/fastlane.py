"""The fast lane of the proxy port: plain requests served without aiohttp's server.

Most requests a sidecar sees are a head and nothing else: `GET`, `HEAD`, `DELETE` or
`OPTIONS` with no body, on a keep-alive HTTP/1.1 connection. For those, aiohttp's request
machinery (a StreamReader, a payload parser, a BaseRequest with its URL object, a
StreamResponse writing through a StreamWriter) was the largest share of the sidecar's CPU
per request. Here such a request is parsed by llhttp (`httptools`) into a `FastRequest`
that carries only what the handler reads, and the handler's answer leaves in one write.

Everything else is handed over, with every byte the connection sent since the last
answered request, to the aiohttp protocol of `server.py` (`GuardedProtocol`), which then
serves that connection as before: a request with a body or `Expect`, an `Upgrade`
(WebSocket), HTTP/1.0, a head that did not arrive in one piece (so the header deadline and
budget stay where they are), a head larger than the header budget, `TRACK`, or anything
llhttp does not parse cleanly (so malformed input gets exactly the answers it got before).
The handover is a protocol switch on the same transport: no byte is lost or read twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, cast

import httptools
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

from sidecar.proxy.upstream import HEADER_CODEC

if TYPE_CHECKING:
    from sidecar.proxy.server import ProxyServer

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection is kept (aiohttp's default)

# headers that send a request to the aiohttp side: a body, a 100-continue, an upgrade
_HANDOVER_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# headers aiohttp's request parser refuses to see twice (RFC 9110 singletons; Host and
# Content-Length are counted apart): a second one goes to aiohttp, which answers 400
_SINGLETONS = frozenset(
    {b"content-location", b"content-range", b"content-type", b"etag", b"max-forwards"}
    | {b"server", b"user-agent"}
)
_NO_BODY_STATUS = frozenset({204, 304})
_SKIPPED_RESPONSE_HEADERS = frozenset({"content-length", "connection", "transfer-encoding"})


class _Handover(Exception):
    """Raised inside a parser callback: this request goes to the aiohttp side."""


_date_second = -1
_date_text = ""


def http_date() -> str:
    """The current time as an HTTP Date value (computed once a second)."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_text = formatdate(now, usegmt=True)
        _date_second = now
    return _date_text


class Sent:
    """What the handler returns for an answer the forwarder already wrote to a fast-lane
    connection (so the handler reads the status off it, as off a web.StreamResponse)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class FastRequest:
    """The parts of a plain request the handler reads, named as on aiohttp's BaseRequest."""

    __slots__ = ("headers", "method", "protocol", "raw_path")

    version: HttpVersion = HttpVersion11
    secure = False
    body_exists = False
    content_length: int | None = None

    def __init__(
        self,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        protocol: FastProtocol,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.protocol = protocol

    @property
    def remote(self) -> str | None:
        return self.protocol.peer

    @property
    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]

    @property
    def query(self) -> MultiMapping[str]:
        return URL.build(query_string=self.query_string, encoded=True).query

    @property
    def cookies(self) -> Mapping[str, str]:
        """The Cookie header as name -> value (RFC 6265 syntax; a later duplicate wins)."""
        out: dict[str, str] = {}
        for value in self.headers.getall("Cookie", ()):
            for pair in value.split(";"):
                name, eq, val = pair.partition("=")
                name = name.strip()
                if not eq or not name:
                    continue
                val = val.strip()
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1]
                out[name] = val
        return out


def serialize(response: web.StreamResponse, *, head_only: bool, close: bool) -> bytes:
    """A complete (not streamed) response as the bytes of one write."""
    status = response.status
    body: bytes = b""
    if isinstance(response, web.Response):
        raw = response.body
        if isinstance(raw, bytes | bytearray):
            body = bytes(raw)
    lines = [f"HTTP/1.1 {status} {response.reason}"]
    headers = response.headers
    for name, value in headers.items():
        if name.lower() not in _SKIPPED_RESPONSE_HEADERS:
            lines.append(f"{name}: {value}")
    if "Date" not in headers:
        lines.append(f"Date: {http_date()}")
    if status >= 200 and status not in _NO_BODY_STATUS:
        lines.append(f"Content-Length: {len(body)}")
    else:
        body = b""
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    data = "\r\n".join(lines).encode(HEADER_CODEC, "surrogateescape")
    return data if head_only or not body else data + body


def stream_head(
    status: int, reason: str, headers: Iterable[tuple[str, str]], *, chunked: bool, close: bool
) -> bytes:
    """The head of a streamed response (headers already cleaned by HeaderRules)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    date = False
    for name, value in headers:
        key = name.lower()
        if key in _SKIPPED_RESPONSE_HEADERS and not (key == "content-length" and not chunked):
            continue
        date = date or key == "date"
        lines.append(f"{name}: {value}")
    if not date:
        lines.append(f"Date: {http_date()}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode(HEADER_CODEC, "surrogateescape")


# a request on the proxy port, in either lane, and the handler's answer to it
Incoming = web.BaseRequest | FastRequest
Answer = web.StreamResponse | Sent


class FastProtocol(asyncio.Protocol):
    """One client connection while its requests are plain; see the module text."""

    def __init__(self, manager: ProxyServer) -> None:
        self.manager = manager
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.buffer = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False  # a request of this connection is being answered
        self.closing = False  # answer the current request, then close
        self.keep_alive = True
        self.task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[FastRequest | None] | None = None
        self._idle_deadline = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._write_ok: asyncio.Future[None] | None = None
        self._read_paused = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._hosts = 0
        self._singletons: set[bytes] = set()
        self._complete = False
        self._keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.peer = str(peer[0])
        manager = self.manager
        if manager.open_connections() >= manager.limits.max_connections:
            self.closing = True
            manager.refuse_connection(self.transport)
            return
        manager.fast_connections.add(self)
        # a connection that sends nothing is closed after the header deadline, as before
        self._arm_idle(manager.limits.header_read_timeout)

    def _release(self) -> None:
        """End the connection's task if it waits for a next request."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.manager.fast_connections.discard(self)
        self.closing = True
        self._release()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.transport = None
        if self._write_ok is not None and not self._write_ok.done():
            self._write_ok.set_result(None)  # a waiting drain() sees the connection gone

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        if self.busy:
            # pipelined: kept until the current answer is out; a client that keeps sending
            # is not read from until then
            if len(self.buffer) > self.manager.limits.max_header_bytes and not self._read_paused:
                self._read_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
            return
        request = self._next()
        if request is not None:
            self._dispatch(request)

    def pause_writing(self) -> None:
        if self._write_ok is None or self._write_ok.done():
            self._write_ok = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ok is not None and not self._write_ok.done():
            self._write_ok.set_result(None)

    async def drain(self) -> None:
        """Wait while the client reads slower than the app answers."""
        waiter = self._write_ok
        if waiter is not None and not waiter.done():
            await waiter
        if self.transport is None:
            raise ConnectionResetError("client closed the connection")

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- httptools callbacks ---------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in _HANDOVER_HEADERS:
            raise _Handover
        if key == b"content-length":
            if value.strip() != b"0":
                raise _Handover
        elif key == b"host":
            self._hosts += 1
        elif key in _SINGLETONS:
            if key in self._singletons:
                raise _Handover
            self._singletons.add(key)
        # as aiohttp's parser: trailing blanks dropped (llhttp keeps them), the value's
        # bytes kept exactly (utf-8 with surrogateescape: any byte survives the way back)
        text = value.rstrip(b" \t").decode(HEADER_CODEC, "surrogateescape")
        self._headers.append((name.decode("latin-1"), text))

    def on_headers_complete(self) -> None:
        if self._hosts != 1 or self.parser.get_http_version() != "1.1":
            raise _Handover
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it at the end

    def on_message_complete(self) -> None:
        self._complete = True

    # -- requests --------------------------------------------------------------------------
    def _next(self) -> FastRequest | None:
        """The next buffered request, if it is a plain one; else the connection is handed
        over (or nothing complete is buffered: None as well)."""
        buffer = self.buffer
        if not buffer:
            return None
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.manager.limits.max_header_bytes:
            self._handover()
            return None
        size = end + 4
        head = bytes(buffer) if size == len(buffer) else bytes(buffer[:size])
        if head.startswith(b"TRACK "):
            self._handover()
            return None
        self._reset_message()
        try:
            self.parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, _Handover):
            self._handover()
            return None
        if not self._complete:
            self._handover()
            return None
        del buffer[:size]
        self.keep_alive = self._keep_alive
        self.busy = True
        return FastRequest(
            self.parser.get_method().decode("ascii"),
            self._url.decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(CIMultiDict(self._headers)),
            self,
        )

    def _dispatch(self, request: FastRequest) -> None:
        """Hand a request to this connection's task (started with its first request)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(request)
        elif self.task is None:
            self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: FastRequest | None) -> None:
        """Answer this connection's requests one after another (pipelined ones in order).

        One task per connection, not per request: a task costs its creation and its
        registration in asyncio's set of tasks, on every request.
        """
        while request is not None:
            await self._serve(request)
            transport = self.transport
            if transport is None:
                return
            if self.closing or not self.keep_alive:
                transport.close()
                return
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            request = self._next()
            if request is None and self.transport is not None:
                self._arm_idle(KEEPALIVE_TIMEOUT)
                self._waiter = self.loop.create_future()
                request = await self._waiter

    async def _serve(self, request: FastRequest) -> None:
        try:
            response = await self.manager.proxy_handler(request)
        except Exception:  # the handler answers its own errors; this is a last resort
            response = web.Response(status=500)
            self.keep_alive = False
        if not isinstance(response, Sent):
            self.write(
                serialize(
                    response,
                    head_only=request.method == "HEAD",
                    close=self.closing or not self.keep_alive,
                )
            )
        self.busy = False

    def must_close(self) -> bool:
        """The connection closes after the current answer (the forwarder asks this)."""
        return self.closing or not self.keep_alive

    def abort(self) -> None:
        """Cut the connection: an answer broke off after its head was sent."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    # -- timers, draining, handover --------------------------------------------------------
    def _arm_idle(self, seconds: float) -> None:
        self._idle_deadline = self.loop.time() + seconds
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport is None:
            return
        if self.busy or self.loop.time() < self._idle_deadline:
            # still in use: look again when the newest deadline is due
            later = max(self._idle_deadline, self.loop.time() + 1.0)
            self._idle_timer = self.loop.call_at(later, self._idle_check)
            return
        self.transport.close()

    def close(self) -> None:
        """Stop taking requests: close now if idle, else after the current answer."""
        self.closing = True
        if not self.busy:
            self._release()
            if self.transport is not None:
                self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's call)
        """Wait up to `timeout` for the current answer, then close."""
        self.closing = True
        if not self.busy:
            self._release()
        task = self.task
        if task is not None:
            _, pending = await asyncio.wait((task,), timeout=timeout)
            for t in pending:
                t.cancel()
        if self.transport is not None:
            self.transport.close()

    def _handover(self) -> None:
        """Give this connection, and the bytes it sent since its last answer, to aiohttp."""
        transport = self.transport
        if transport is None:
            return
        manager = self.manager
        manager.fast_connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.closing = True
        self.transport = None
        self._release()
        data = bytes(self.buffer)
        self.buffer.clear()
        protocol = manager.guarded()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        if data and not transport.is_closing():
            protocol.data_received(data)
