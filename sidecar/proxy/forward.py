"""Forwarding to the app: one shared keep-alive ClientSession, streaming both ways.

No redirects followed, no decompression, no cookie jar, no default headers added: the app
gets the client's bytes, and the client gets the app's. Failures map to 502 (refused,
reset, connect timeout) and 504 (no complete answer within upstream_timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import ProxyConfig, Upstream
from sidecar.errors import Rejected
from sidecar.proxy.headers import HeaderRules

_CHUNK = 64 * 1024


class UpstreamError(Rejected):
    """The app could not be reached or did not answer in time."""


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

    async def start(self) -> None:
        """Open the shared session (call from the running loop)."""
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
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        request: web.BaseRequest,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        timing: list[float],
        request_id: str,
    ) -> web.StreamResponse:
        """Stream `request` to the app and its answer back; timing[0] gets upstream seconds.

        The client gets X-Request-ID back unless the app set its own.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        guard: _BodyGuard | None = None
        data = None
        if request.body_exists:
            length = request.content_length
            limit = self._proxy.max_body_bytes
            if limit and length is not None and length > limit:
                raise Rejected(413, "body_too_large", "request body too large")
            guard = _BodyGuard(request.content, self._proxy.body_idle_timeout, limit)
            data = guard.chunks()
        try:
            upstream = await self.session.request(
                request.method,
                self.url(path, query),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        except Exception as exc:
            if guard is not None and guard.error is not None:
                raise guard.error from None
            raise _upstream_error(exc) from None
        try:
            out = self._headers.downstream(upstream.headers)
            if "X-Request-ID" not in out:
                out["X-Request-ID"] = request_id
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=out
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                # Mid-body failure: the status is sent, so the only honest signal is to
                # cut the connection instead of finishing a truncated body as if complete.
                response.force_close()
                if request.transport is not None:
                    request.transport.close()
                timing[0] = loop.time() - started
                return response
            await response.write_eof()
        finally:
            upstream.release()
        timing[0] = loop.time() - started
        return response

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
