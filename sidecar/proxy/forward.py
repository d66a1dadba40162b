"""Forwarding to the app: one shared keep-alive ClientSession, streaming both ways.

No redirects followed, no decompression, no cookie jar, no default headers added: the app
gets the client's bytes, and the client gets the app's. Failures map to 502 (refused,
reset, connect timeout) and 504 (no complete answer within upstream_timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import ProxyConfig, Upstream
from sidecar.errors import Rejected
from sidecar.proxy.fastlane import Answer, FastRequest, Incoming, Sent, stream_head
from sidecar.proxy.headers import HeaderRules
from sidecar.proxy.upstream import (
    Connection,
    UpstreamError,
    UpstreamPool,
    request_head,
    reset_error,
    response_headers,
)

_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


async def _send_body(conn: Connection, guard: _BodyGuard, chunked: bool) -> None:
    """Stream the client's body to the app (chunked when the client gave no length)."""
    async for chunk in guard.chunks():
        if chunked:
            conn.write((f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"))
        else:
            conn.write(chunk)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")
        await conn.drain()


class _BodyGuard:
    """Streams the client's body to the app, enforcing max size and idle time.

    Errors are kept here as well as raised, because the client library wraps what a body
    iterator raises into its own exceptions.
    """

    __slots__ = ("error", "idle", "limit", "reader", "sent")

    def __init__(self, reader: aiohttp.StreamReader, idle: float, limit: int) -> None:
        self.reader = reader
        self.idle = idle
        self.limit = limit
        self.sent = 0
        self.error: Rejected | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self.idle):
                    chunk = await self.reader.readany()
            except TimeoutError:
                self.error = Rejected(408, "body_idle_timeout", "request body stalled")
                raise self.error from None
            if not chunk:
                return
            self.sent += len(chunk)
            if self.limit and self.sent > self.limit:
                self.error = Rejected(413, "body_too_large", "request body too large")
                raise self.error
            yield chunk


class Forwarder:
    """Sends requests to the app and streams the answers back."""

    def __init__(self, upstream: Upstream, proxy: ProxyConfig, headers: HeaderRules) -> None:
        self._base = URL.build(scheme=upstream.scheme, host=upstream.host, port=upstream.port)
        self._upstream = upstream
        self._proxy = proxy
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        # the app's address as a URL prefix, for span attributes (paths are already encoded)
        self.base_url = str(self._base)
        default_port = 443 if upstream.scheme == "https" else 80
        self._host_header = (
            upstream.host if upstream.port == default_port else f"{upstream.host}:{upstream.port}"
        )

    async def start(self) -> None:
        """Open the connection pool and the WebSocket session (call from the running loop)."""
        self._pool = UpstreamPool(
            self._upstream.host,
            self._upstream.port,
            tls=self._upstream.scheme == "https",
            limit=self._proxy.max_connections,
            connect_timeout=self._proxy.connect_timeout,
        )
        connector = aiohttp.TCPConnector(
            limit=self._proxy.max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self._proxy.upstream_timeout,
                sock_connect=self._proxy.connect_timeout,
                sock_read=self._proxy.body_idle_timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False,
        )

    async def close(self) -> None:
        """Close pooled connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def pool(self) -> UpstreamPool:
        """The connection pool to the app (after start())."""
        assert self._pool is not None, "Forwarder.start() was not called"
        return self._pool

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session (after start())."""
        assert self._session is not None, "Forwarder.start() was not called"
        return self._session

    def url(self, path: str, query: str, scheme: str | None = None) -> URL:
        """The app's URL for an already-canonical path; never re-normalized by yarl."""
        return URL.build(
            scheme=scheme or self._upstream.scheme,
            host=self._upstream.host,
            port=self._upstream.port,
            path=path,
            query_string=query,
            encoded=True,
        )

    async def forward(
        self,
        request: Incoming,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        timing: list[float],
        request_id: str,
    ) -> Answer:
        """Stream `request` to the app and its answer back; timing[0] gets upstream seconds.

        The client gets X-Request-ID back unless the app set its own.
        """
        started = self.pool.loop.time()
        deadline = started + self._proxy.upstream_timeout
        guard: _BodyGuard | None = None
        if isinstance(request, web.BaseRequest) and request.body_exists:
            length = request.content_length
            limit = self._proxy.max_body_bytes
            if limit and length is not None and length > limit:
                raise Rejected(413, "body_too_large", "request body too large")
            guard = _BodyGuard(request.content, self._proxy.body_idle_timeout, limit)
        method = request.method
        target = f"{path}?{query}" if query else path
        chunked = guard is not None and "Content-Length" not in headers
        head = request_head(method, target, headers, self._host_header, chunked)
        conn, sending = await self._exchange(head, method, guard, chunked, deadline)
        try:
            return await self._respond(request, conn, deadline, request_id)
        finally:
            timing[0] = self.pool.loop.time() - started
            if sending is not None:
                if not sending.done():
                    sending.cancel()
                    conn.close_after = True
                await asyncio.gather(sending, return_exceptions=True)
            self.pool.release(conn)

    async def _exchange(
        self,
        head: bytes,
        method: str,
        guard: _BodyGuard | None,
        chunked: bool,
        deadline: float,
    ) -> tuple[Connection, asyncio.Task[None] | None]:
        """Send the request on a pooled connection until the app's answer head is in.

        A request without a body whose reused keep-alive connection the app closed before
        answering anything never reached the app: it is sent once more, on a new connection.
        """
        pool = self.pool
        for attempt in (1, 2):
            kept = pool.take_idle()
            if kept is not None:
                conn, reused = kept, True
            else:
                conn, reused = await pool.acquire()
            conn.head_request = method == "HEAD"
            conn.write(head)
            sending = (
                None if guard is None else asyncio.create_task(_send_body(conn, guard, chunked))
            )
            try:
                if sending is None:
                    await conn.wait_head(deadline)
                else:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.wait(
                            (sending, conn.head), return_when=asyncio.FIRST_COMPLETED
                        )
                        if sending.done() and sending.exception() is not None:
                            raise sending.exception()  # type: ignore[misc]
                        await conn.head
                return conn, sending
            except BaseException as exc:
                if sending is not None:
                    sending.cancel()
                    await asyncio.gather(sending, return_exceptions=True)
                conn.fail(reset_error())
                pool.release(conn)
                if guard is not None and guard.error is not None:
                    raise guard.error from None
                retry = (
                    attempt == 1
                    and sending is None
                    and reused
                    and not conn.got_bytes
                    and method in _RETRYABLE
                    and isinstance(exc, UpstreamError)
                )
                if retry:
                    continue
                if isinstance(exc, TimeoutError):
                    raise UpstreamError(
                        504, "upstream_timeout", "upstream did not answer in time"
                    ) from None
                if isinstance(exc, OSError):
                    raise reset_error() from None
                raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _respond(
        self,
        request: Incoming,
        conn: Connection,
        deadline: float,
        request_id: str,
    ) -> Answer:
        """The client's response: the app's status, cleaned headers and body."""
        if (
            isinstance(request, FastRequest)
            and conn.complete
            and len(conn.chunks) <= 1
            and not conn.head_request
        ):
            # the whole answer is here: straight from the app's header bytes to one write
            body = conn.chunks.popleft() if conn.chunks else b""
            conn.buffered = 0
            client = request.protocol
            client.write(
                self._headers.downstream_raw(
                    conn.status,
                    conn.reason,
                    conn.raw_headers,
                    request_id,
                    body,
                    close=client.must_close(),
                )
            )
            return Sent(conn.status)
        out = self._headers.downstream(response_headers(conn.raw_headers))
        if "X-Request-ID" not in out:
            out["X-Request-ID"] = request_id
        if conn.complete and len(conn.chunks) <= 1 and not conn.head_request:
            # the whole answer is here already: head and body leave in one write
            body = conn.chunks.popleft() if conn.chunks else b""
            conn.buffered = 0
            return web.Response(
                body=body, status=conn.status, reason=conn.reason or None, headers=out
            )
        if isinstance(request, FastRequest):
            return await self._stream_fast(request, conn, deadline, out)
        response = web.StreamResponse(status=conn.status, reason=conn.reason or None, headers=out)
        await response.prepare(request)
        try:
            idle = self._proxy.body_idle_timeout
            async for chunk in conn.body(idle, deadline):
                await response.write(chunk)
        except (Rejected, TimeoutError, ConnectionError):
            # Mid-body failure: the status is sent, so the only honest signal is to
            # cut the connection instead of finishing a truncated body as if complete.
            conn.close_after = True
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _stream_fast(
        self, request: FastRequest, conn: Connection, deadline: float, out: CIMultiDict[str]
    ) -> Sent:
        """Stream the app's answer straight to a fast-lane connection."""
        client = request.protocol
        sent = Sent(conn.status)
        reason = conn.reason or HTTPStatus(conn.status).phrase
        bodiless = conn.head_request or conn.status < 200 or conn.status in (204, 304)
        chunked = not bodiless and "Content-Length" not in out
        client.write(
            stream_head(
                conn.status, reason, out.items(), chunked=chunked, close=client.must_close()
            )
        )
        try:
            idle = self._proxy.body_idle_timeout
            async for chunk in conn.body(idle, deadline):
                if bodiless or not chunk:
                    continue
                if chunked:
                    client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    client.write(chunk)
                await client.drain()
        except (Rejected, TimeoutError, ConnectionError):
            # mid-body failure: cut the connection rather than end a truncated body
            conn.close_after = True
            client.abort()
            return sent
        if chunked:
            client.write(b"0\r\n\r\n")
        return sent

    async def forward_websocket(
        self, request: web.BaseRequest, path: str, query: str, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        """Open the WebSocket to the app first, then accept the client's and relay frames."""
        protocols = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",")
            if p.strip()
        ]
        headers.popall("Sec-WebSocket-Protocol", None)
        scheme = "wss" if self._upstream.scheme == "https" else "ws"
        try:
            app_ws = await self.session.ws_connect(
                self.url(path, query, scheme),
                headers=headers,
                protocols=protocols,
                autoping=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                max_msg_size=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                502, "upstream_refused_websocket", f"upstream refused the WebSocket ({exc.status})"
            ) from None
        except Exception as exc:
            raise _upstream_error(exc) from None
        client_ws = web.WebSocketResponse(
            protocols=[app_ws.protocol] if app_ws.protocol else (),
            autoping=False,
            max_msg_size=0,
        )
        await client_ws.prepare(request)

        async def pump(
            source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        ) -> None:
            async for msg in source:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await sink.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await sink.pong(msg.data)
                else:
                    break
            await sink.close()

        tasks = [
            asyncio.ensure_future(pump(client_ws, app_ws)),
            asyncio.ensure_future(pump(app_ws, client_ws)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await app_ws.close()
            await client_ws.close()
        return client_ws


def _upstream_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(
            502, "upstream_connect_timeout", "upstream did not accept the connection in time"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(502, "upstream_unreachable", "upstream refused the connection")
    if isinstance(exc, TimeoutError):
        return UpstreamError(504, "upstream_timeout", "upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientError | ConnectionError | OSError):
        return UpstreamError(502, "upstream_reset", "upstream closed the connection")
    return UpstreamError(502, "upstream_error", "upstream request failed")
