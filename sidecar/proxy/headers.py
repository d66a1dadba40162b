"""Headers in both directions: strip what a client could spoof, set what the app trusts.

Compiled once from the config (`HeaderRules`); per request it is one pass over the
client's headers. A header named in `Connection` is dropped from what the client sent,
before the sidecar adds its own, so it can never remove a header the sidecar sets.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from http import HTTPStatus

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.proxy.fastlane import http_date

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded from a client: routing/identity hints an app might trust, the method
# override family, and what the sidecar itself answers or sets (Expect, trace context).
_CLIENT_STRIP = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-uri",
        "x-envoy-original-path",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "expect",
        "traceparent",
        "tracestate",
        "x-request-id",
    }
)
_WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
_random_bits = random.getrandbits  # request ids are unique, not secret
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


def request_id(client_value: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    if client_value and _REQUEST_ID.match(client_value):
        return client_value
    return f"{_random_bits(128):032x}"


_status_lines: dict[tuple[int, str], bytes] = {}


def _status_line(status: int, reason: str) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, built once per status and reason."""
    line = _status_lines.get((status, reason))
    if line is None:
        text = reason or (HTTPStatus(status).phrase if status in _KNOWN_STATUS else "")
        line = f"HTTP/1.1 {status} {text}\r\n".encode("latin-1")
        if len(_status_lines) < 256:
            _status_lines[(status, reason)] = line
    return line


_KNOWN_STATUS = frozenset(s.value for s in HTTPStatus)


def _without_cookies(header: str, names: frozenset[str]) -> str:
    """A Cookie header value without the named cookies."""
    kept = [p for p in header.split(";") if p.strip().partition("=")[0].strip() not in names]
    return ";".join(kept).strip()


def _tokens(values: Iterable[str]) -> set[str]:
    return {t.strip().lower().replace("_", "-") for v in values for t in v.split(",") if t.strip()}


class HeaderRules:
    """What to strip and what to call the identity headers, compiled from the config."""

    def __init__(
        self,
        identity_prefix: str,
        secret_headers: Iterable[str] = (),
        strip_authorization: bool = False,
        credential_headers: Iterable[str] = (),
        credential_cookies: Iterable[str] = (),
    ) -> None:
        self.prefix = identity_prefix.lower()
        p = identity_prefix
        self.subject = p + "Subject"
        self.tenant = p + "Tenant"
        self.roles = p + "Roles"
        self.method = p + "Method"
        self.rule = p + "Rule"
        self.secret_names = frozenset(h.lower().replace("_", "-") for h in secret_headers)
        self.strip_from_client = _CLIENT_STRIP | HOP_BY_HOP | self.secret_names
        self.credential_headers: frozenset[str] = (
            frozenset({"authorization", *(h.lower() for h in credential_headers)})
            if strip_authorization
            else frozenset()
        )
        # downstream_raw(): what never reaches the client, as lower-case header bytes
        self._drop_raw = frozenset(
            n.encode("latin-1") for n in HOP_BY_HOP | self.secret_names | {"content-length"}
        )
        self._secret_raw = frozenset(n.encode("latin-1") for n in self.secret_names)
        self.credential_cookies = (
            frozenset(credential_cookies) if strip_authorization else frozenset()
        )

    def upstream(
        self,
        client: CIMultiDictProxy[str],
        set_headers: list[tuple[str, str]],
        *,
        strip_credentials: bool = False,
        websocket: bool = False,
    ) -> CIMultiDict[str]:
        """The headers the app receives: the client's, cleaned, then the sidecar's own."""
        pairs: list[tuple[str, str]] = []
        strip = self.strip_from_client
        prefix = self.prefix
        named: set[str] | None = None
        for name, value in client.items():
            key = name.lower()
            if "_" in key:
                key = key.replace("_", "-")
            if key in strip or key.startswith(prefix) or key.startswith("x-forwarded-"):
                if key == "connection":
                    named = _tokens([value]) if named is None else named | _tokens([value])
                continue
            if websocket and key in _WEBSOCKET_HANDSHAKE:
                continue
            if strip_credentials and key in self.credential_headers:
                continue
            if strip_credentials and key == "cookie" and self.credential_cookies:
                value = _without_cookies(value, self.credential_cookies)
                if not value:
                    continue
            pairs.append((name, value))
        if named:
            pairs = [p for p in pairs if p[0].lower().replace("_", "-") not in named]
        pairs.extend(set_headers)
        return CIMultiDict(pairs)

    def downstream_raw(
        self,
        status: int,
        reason: str,
        raw: list[tuple[bytes, bytes]],
        request_id: str,
        body: bytes,
        *,
        close: bool,
    ) -> bytes:
        """A complete answer of the app as the bytes the client receives: `downstream()`'s
        header rules applied to the app's header bytes, the body's length, X-Request-ID
        unless the app set one, a Date unless the app sent one."""
        named: set[bytes] = set()
        for name, value in raw:
            if name.lower() == b"connection":
                named |= {
                    t.strip().lower().replace(b"_", b"-") for t in value.split(b",") if t.strip()
                }
        drop = self._drop_raw | named if named else self._drop_raw
        secret = self._secret_raw
        out = [_status_line(status, reason)]
        seen_id = seen_date = False
        for name, value in raw:
            key = name.lower()
            if key in drop or (secret and key.replace(b"_", b"-") in secret):
                continue
            if key == b"x-request-id":
                seen_id = True
            elif key == b"date":
                seen_date = True
            out.append(b"%b: %b\r\n" % (name, value))
        if not seen_id:
            out.append(b"X-Request-ID: %b\r\n" % request_id.encode("latin-1"))
        if not seen_date:
            out.append(b"Date: %b\r\n" % http_date().encode("latin-1"))
        if status >= 200 and status not in (204, 304):
            out.append(b"Content-Length: %d\r\n" % len(body))
        else:
            body = b""
        if close:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        out.append(body)
        return b"".join(out)

    def downstream(self, upstream: CIMultiDict[str] | CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """The headers the client receives from the app's response."""
        out: CIMultiDict[str] = CIMultiDict()
        named: set[str] = set()
        for value in upstream.getall("Connection", ()):
            named |= _tokens([value])
        drop = HOP_BY_HOP | self.secret_names | named
        for name, value in upstream.items():
            key = name.lower()
            if key in drop or key.replace("_", "-") in self.secret_names:
                continue
            out.add(name, value)
        return out
