"""A lean HTTP/1.1 client for the one app behind the sidecar: a keep-alive pool of asyncio
protocols, responses parsed by llhttp (httptools), bodies streamed both ways.

Why not aiohttp's ClientSession for this: it is general (cookies, redirects, proxies,
compression, URL handling, per-request timers) and that generality was the largest share of
the sidecar's CPU per request. Here a request is written in one `write()` of bytes built
from the headers the sidecar already vetted; the response head is parsed in C; no URL is
parsed, no cookie jar is consulted, nothing is decompressed.

Errors are the same as before: refused / reset / bad response -> 502, connect timeout ->
502 (`upstream_connect_timeout`), no complete answer within `upstream_timeout` -> 504.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict

from sidecar.errors import Rejected

# response body flow control: stop reading from the app past HIGH, resume under LOW
_HIGH = 1024 * 1024
_LOW = 256 * 1024
_IDLE_TTL = 30.0  # seconds an idle keep-alive connection is kept
# header values are text decoded from bytes as aiohttp decodes a request's, with
# surrogateescape, and encoded back the same way: any byte the client or the app sent
# is what the other side receives, on either lane of the proxy port
HEADER_CODEC = "utf-8"


class UpstreamError(Rejected):
    """The app could not be reached or did not answer in time."""


def reset_error() -> UpstreamError:
    return UpstreamError(502, "upstream_reset", "upstream closed the connection")


class Connection(asyncio.Protocol):
    """One connection to the app; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._write_ok: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self._loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self._waiter: asyncio.Future[None] | None = None
        self.head_request = False
        self.close_after = False
        self.close_delimited = False
        self.keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError(502, "upstream_bad_response", "unexpected upgrade"))
        except httptools.HttpParserError:
            self.fail(UpstreamError(502, "upstream_bad_response", "malformed response"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.close_delimited and self.status and exc is None:
            self.complete = True  # a body with no length and no chunks ends with the close
            self.close_after = True
            self._wake()
        if not self.complete:
            self.fail(reset_error())
        if self._write_ok is not None and not self._write_ok.done():
            self._write_ok.set_exception(reset_error())
        self.pool.forget(self)

    def pause_writing(self) -> None:
        if self._write_ok is None or self._write_ok.done():
            self._write_ok = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ok is not None and not self._write_ok.done():
            self._write_ok.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103): wait for the real one
            self.raw_headers = []
            self.reason = ""
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it at the end
        names = {n.lower() for n, _ in self.raw_headers}
        self.close_delimited = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
        )
        if not self.head.done():
            self.head.set_result(None)
        if self.head_request:
            # no body follows a HEAD answer; llhttp does not know the request was HEAD
            self.complete = True
            self.close_after = True
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.status == 0:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH and not self._paused_reading and self.transport is not None:
            self.transport.pause_reading()
            self._paused_reading = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an interim answer
            return
        self.complete = True
        self._wake()

    # -- the exchange ----------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """End the exchange with `exc` (waiters get it) and close the connection."""
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: no "never retrieved" warning if nobody waits
        self._wake()
        if self.transport is not None:
            self.transport.close()

    async def wait_head(self, deadline: float) -> None:
        """Until the response head is in; TimeoutError at `deadline` (loop time)."""
        head = self.head
        if not head.done():
            timer = self._loop.call_at(deadline, self._head_timeout)
            try:
                await head
            finally:
                timer.cancel()
        head.result()

    def _head_timeout(self) -> None:
        if not self.head.done():
            self.head.set_exception(TimeoutError())

    async def drain(self) -> None:
        if self._write_ok is not None and not self._write_ok.done():
            await self._write_ok

    def write(self, data: bytes | Iterable[bytes]) -> None:
        assert self.transport is not None
        if isinstance(data, bytes):
            self.transport.write(data)
        else:
            self.transport.writelines(data)

    async def body(self, idle: float, deadline: float) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk; raises UpstreamError if it breaks off, stalls
        for `idle` seconds, or is not over by `deadline` (loop time)."""
        loop = self._loop
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self._paused_reading and self.buffered < _LOW and self.transport is not None:
                    self.transport.resume_reading()
                    self._paused_reading = False
                yield chunk
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + idle)):
                    await self._waiter
            except TimeoutError:
                self.fail(UpstreamError(504, "upstream_timeout", "upstream body stalled"))
                raise UpstreamError(504, "upstream_timeout", "upstream body stalled") from None
            finally:
                self._waiter = None

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.error is None
            and not self.closed
            and not self.close_after
            and self.keep_alive
        )


class UpstreamPool:
    """Keep-alive connections to one app (host:port), at most `limit` at once."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        limit: int = 1024,
        connect_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.connect_timeout = connect_timeout
        self.idle: list[Connection] = []
        self.limit = limit
        self.busy = 0  # exchanges under way; past `limit`, callers queue in `waiting`
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.open: set[Connection] = set()
        self.loop = asyncio.get_running_loop()

    async def _take_slot(self) -> None:
        if self.busy >= self.limit:
            waiter = self.loop.create_future()
            self.waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._give_slot()  # handed a slot as it was cancelled: pass it on
                raise
            return  # the releaser handed its slot over; busy is unchanged
        self.busy += 1

    def _give_slot(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1

    def take_idle(self) -> Connection | None:
        """A kept connection for one exchange, when a slot is free and one is kept (the
        common case, without a coroutine); else None, and `acquire()` is the way."""
        if self.busy >= self.limit:
            return None
        conn = self._pop_idle()
        if conn is not None:
            self.busy += 1
        return conn

    def _pop_idle(self) -> Connection | None:
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or now - conn.idle_since > _IDLE_TTL:
                if conn.transport is not None:
                    conn.transport.close()
                continue
            conn._reset_exchange()
            return conn
        return None

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection for one exchange, and whether it was reused."""
        await self._take_slot()
        loop = self.loop
        kept = self._pop_idle()
        if kept is not None:
            return kept, True
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            self._give_slot()
            raise UpstreamError(
                502, "upstream_connect_timeout", "upstream did not accept the connection in time"
            ) from None
        except OSError:
            self._give_slot()
            raise UpstreamError(
                502, "upstream_unreachable", "upstream refused the connection"
            ) from None
        except BaseException:
            self._give_slot()
            raise
        self.open.add(conn)
        return conn, False

    def release(self, conn: Connection) -> None:
        """The exchange is over: keep the connection for the next one, or close it."""
        self._give_slot()
        if conn.reusable:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
        elif conn.transport is not None and not conn.closed:
            conn.transport.close()

    def forget(self, conn: Connection) -> None:
        self.open.discard(conn)

    def close(self) -> None:
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def request_head(
    method: str, target: str, headers: CIMultiDict[str], default_host: str, chunked: bool
) -> bytes:
    """The request line and headers, as bytes (headers were vetted by HeaderRules).

    A line break in a value (say, from a claim copied into an identity header) would split
    it into a header of the caller's choosing: refused.
    """
    lines = [f"{method} {target} HTTP/1.1"]
    if "Host" not in headers:
        lines.append(f"Host: {default_host}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # one scan of the whole head: a CR and an LF per line (the last one is the blank
    # line's), no other, and no NUL
    breaks = len(lines)
    if text.count("\n") != breaks or text.count("\r") != breaks or "\x00" in text:
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\x00" in value:
                raise Rejected(400, "bad_header_value", f"header {name} holds a control character")
        raise Rejected(400, "bad_header_value", "a header name holds a control character")
    try:
        return text.encode(HEADER_CODEC, "surrogateescape")
    except UnicodeEncodeError as exc:  # a lone surrogate in a value set from a claim
        raise Rejected(400, "bad_header_value", "a header holds an unencodable character") from exc


def response_headers(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The app's header bytes as text, decoded as aiohttp decodes a request's (so what
    is valid UTF-8 goes back out byte for byte on either lane)."""
    return CIMultiDict(
        (n.decode("latin-1"), v.decode(HEADER_CODEC, "surrogateescape")) for n, v in raw
    )
