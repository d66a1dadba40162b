"""The listening side: aiohttp's HTTP/1 protocol with the guards aiohttp does not have.

- a deadline for reading request headers (slowloris): 408, then close;
- a byte budget for the request line plus headers: 431, then close;
- a cap on open connections: 503, then close;
- TRACK (unknown to the HTTP parser) answered 405 like TRACE;
- parser errors (bad method, bad characters, ambiguous framing, ...) answered with the
  JSON body of contract section 6 and never with the parser's text, which can quote the
  request (and so a credential).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from sidecar.config import ProxyConfig
from sidecar.errors import ERROR_CODES
from sidecar.proxy.fastlane import Answer, FastProtocol, Incoming
from sidecar.proxy.headers import request_id

# (status, reason, request_id) -> None: lets the owner log and count guard rejections
RejectHook = Callable[[int, str, str], None]


def error_body(status: int, reason: str, message: str, rid: str) -> bytes:
    """The JSON error body of contract section 6."""
    return json.dumps(
        {
            "error": ERROR_CODES.get(status, "error"),
            "message": message,
            "reason": reason,
            "request_id": rid,
        },
        separators=(",", ":"),
    ).encode()


def _raw_response(status: int, reason: str, message: str) -> tuple[bytes, str]:
    rid = request_id(None)
    body = error_body(status, reason, message, rid)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body, rid


def _parser_error(exc: BaseException | None) -> tuple[int, str, str]:
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return 400, "bad_method", "unknown or malformed HTTP method"
    if isinstance(exc, http_exceptions.LineTooLong):
        return 431, "header_too_large", "request line or header too long"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return 400, "bad_path_character", "invalid character in request target"
    if isinstance(exc, http_exceptions.BadStatusLine):
        return 400, "bad_request_line", "malformed request line or HTTP version"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return 400, "bad_header", "malformed header"
    text = str(getattr(exc, "message", "") or "")
    if "Content-Length" in text or "Transfer-Encoding" in text:
        return 400, "ambiguous_framing", "ambiguous message framing"
    if "Host" in text:
        if text.startswith("Duplicate"):
            return 400, "duplicate_host", "more than one Host header"
        return 400, "missing_host", "HTTP/1.1 request without Host"
    if "header" in text.lower():
        return 400, "bad_header", "malformed header"
    return 400, "malformed_request", "malformed HTTP request"


class GuardedProtocol(RequestHandler):
    """aiohttp's request protocol plus header deadline, header budget and connection cap."""

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._on_reject = manager.on_reject
        self._awaiting_headers = True
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_tail = b""
        self._first = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if (
            isinstance(manager, ProxyServer)
            and manager.open_connections() > self._limits.max_connections
        ):
            self._reject(503, "too_many_connections", "too many open connections")
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self._loop.call_later(
                self._limits.header_read_timeout, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport is None:
            return
        if self._header_bytes == 0:
            self.force_close()  # an idle connection that never sent a request
        else:
            self._reject(408, "header_read_timeout", "request headers not received in time")

    def _reject(self, status: int, reason: str, message: str) -> None:
        self._cancel_header_timer()
        self._awaiting_headers = False
        data, rid = _raw_response(status, reason, message)
        transport = self.transport
        if transport is not None:
            transport.write(data)
        self.force_close()
        self._on_reject(status, reason, rid)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if self._awaiting_headers and data and self._payload_parser is None and not self._upgraded:
            if self._header_bytes == 0:
                self._arm_header_timer()
                if data.startswith(b"TRACK "):
                    self._reject(405, "method_not_allowed", "method TRACK is not allowed")
                    return
            joined = self._header_tail + data
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                size = self._header_bytes + len(data)
            else:
                size = self._header_bytes - len(self._header_tail) + end + 4
            if size > self._limits.max_header_bytes:
                self._reject(431, "header_too_large", "request headers too large")
                return
            self._header_bytes += len(data)
            self._header_tail = joined[-3:]
            before = self._request_count
            super().data_received(data)
            if self._request_count != before:  # the parser produced a message (or an error)
                self._awaiting_headers = False
                self._cancel_header_timer()
            return
        super().data_received(data)

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            # the next bytes on this connection start a new request's headers, unless
            # the client pipelined one already, or this request's body is still arriving
            if not self._messages and request.content.is_eof():
                self._awaiting_headers = True
                self._header_bytes = 0
                self._header_tail = b""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if status == 400:
            status, reason, text = _parser_error(exc)
        elif status == 504:
            reason, text = "timeout", "request timed out"
        else:
            status, reason, text = 500, "internal_error", "internal error"
        rid = request_id(None)
        resp = web.Response(
            status=status,
            body=error_body(status, reason, text, rid),
            content_type="application/json",
            headers={"X-Request-ID": rid},
        )
        resp.force_close()
        self._on_reject(status, reason, rid)
        return resp


class ProxyServer(web.Server):
    """aiohttp's low-level server, whose connections start in the fast lane (fastlane.py)
    and move to a GuardedProtocol when a request needs aiohttp."""

    def __init__(
        self,
        handler: Callable[[Incoming], Awaitable[Answer]],
        *,
        limits: ProxyConfig,
        on_reject: RejectHook,
        **kwargs: Any,
    ) -> None:
        async def aiohttp_side(request: web.BaseRequest) -> web.StreamResponse:
            answer = await handler(request)
            # only a fast-lane request is answered by writing to its connection directly
            assert isinstance(answer, web.StreamResponse), "fast-lane answer on aiohttp's side"
            return answer

        super().__init__(aiohttp_side, **kwargs)
        self.proxy_handler = handler
        self.limits = limits
        self.on_reject = on_reject
        self.fast_connections: set[FastProtocol] = set()

    # the protocol factory of the listening socket: a fast-lane connection to begin with
    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return FastProtocol(self)

    def guarded(self) -> GuardedProtocol:
        """A connection served by aiohttp (with the guards above)."""
        return GuardedProtocol(self, loop=self._loop, **self._kwargs)

    def open_connections(self) -> int:
        """Connections open on the proxy port, in either lane."""
        return len(self._connections) + len(self.fast_connections)

    def refuse_connection(self, transport: asyncio.Transport) -> None:
        """Answer 503 on a connection over the cap, and close it."""
        data, rid = _raw_response(503, "too_many_connections", "too many open connections")
        transport.write(data)
        transport.close()
        self.on_reject(503, "too_many_connections", rid)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for conn in list(self.fast_connections):
            conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (as in aiohttp)
        fast = [conn.shutdown(timeout) for conn in list(self.fast_connections)]
        await asyncio.gather(super().shutdown(timeout), *fast)
        self.fast_connections.clear()
