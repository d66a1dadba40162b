"""Canonical paths (contract 5.1, 5.2, 9 "Paths"): unit table, then over real sockets."""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest
from sidecar.proxy.paths import canonical
from tests.conftest import Keys, Running, Upstream, make_token, raw_exchange, status_of

NORMALIZED = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/public/../admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/.%2E/admin", "/admin"),
    ("/a/./b", "/a/b"),
    ("/admin/.", "/admin/"),
    ("/a/..", "/"),
    ("//admin//x", "/admin/x"),
    ("/%41%62c", "/Abc"),
    ("/a%20b", "/a%20b"),  # reserved/other escapes stay encoded, byte for byte
    ("/a%23b", "/a%23b"),
    ("/caf%C3%A9", "/caf%C3%A9"),
    ("/x/", "/x/"),
    ("/%7e/%2D", "/~/-"),
    ("/a%25zz", "/a%25zz"),  # %25 not followed by two hex digits stays
]

REJECTED = [
    ("/a/../../x", "path_above_root"),
    ("/..", "path_above_root"),
    ("/admin%2Fx", "encoded_slash"),
    ("/admin%2fx", "encoded_slash"),
    ("/admin%5Cx", "encoded_slash"),
    ("/a\\b", "backslash_in_path"),
    ("/a;b", "path_parameter"),
    ("/a%3Bb", "path_parameter"),
    ("/%2561dmin", "double_encoding"),
    ("/%25%34%31", "double_encoding"),
    ("/a%00b", "encoded_control_character"),
    ("/a%0Ab", "encoded_control_character"),
    ("/a%7Fb", "encoded_control_character"),
    ("/a%", "bad_escape"),
    ("/a%4", "bad_escape"),
    ("/a%zz", "bad_escape"),
    ("/%C3", "bad_utf8_escape"),
    ("/%FF%FE", "bad_utf8_escape"),
    ("/a#frag", "fragment_in_target"),
    ("http://evil/admin", "absolute_form_target"),
    ("*", "bad_target"),
]


@pytest.mark.parametrize(("target", "expected"), NORMALIZED)
def test_normalized(target: str, expected: str) -> None:
    assert canonical(target)[0] == expected


@pytest.mark.parametrize(("target", "reason"), REJECTED)
def test_rejected(target: str, reason: str) -> None:
    with pytest.raises(BadRequest) as info:
        canonical(target)
    assert info.value.reason == reason


def test_query_kept_raw_and_encoded_slash_opt_in() -> None:
    assert canonical("/a/../b?x=%2F&y=..") == ("/b", "x=%2F&y=..")
    assert canonical("/a%2Fb", allow_encoded_slashes=True) == ("/a%2Fb", "")


@pytest.mark.parametrize(
    "target",
    [
        b"/a/../../x",
        b"/admin%2Fx",
        b"/a\\b",
        b"/a;b",
        b"/%2561dmin",
        b"/a\x00b",
        b"/a%00b",
        b"http://evil/admin",
        b"/public/%2e%2e/%2e%2e/admin",
        b"/app/\xc3\xa9",
    ],
)
async def test_malformed_targets_never_reach_the_app(
    proxy: Running, upstream: Upstream, keys: Keys, target: bytes
) -> None:
    token = make_token(keys, roles=["admin"])
    raw = await raw_exchange(
        proxy.sidecar.listen_port,
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status_of(raw) == 400, raw[:300]
    assert b'"error":"bad_request"' in raw
    assert b"application/json" in raw
    assert token.encode() not in raw
    assert upstream.seen == []


async def test_dot_segments_are_matched_and_forwarded_resolved(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    token = make_token(keys, roles=["admin"])
    for target in (b"/public/../admin", b"/public/%2e%2e/admin", b"/public//..//admin"):
        raw = await raw_exchange(
            proxy.sidecar.listen_port,
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert status_of(raw) == 200, raw[:300]
    assert [s["path"] for s in upstream.seen] == ["/admin"] * 3
    # without a token the same path is the admin rule's 401, not the public rule's 200
    raw = await raw_exchange(
        proxy.sidecar.listen_port,
        b"GET /public/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert status_of(raw) == 401
    assert len(upstream.seen) == 3


async def test_trailing_slash_ignored_for_matching_but_forwarded(
    proxy: Running, upstream: Upstream, keys: Keys
) -> None:
    token = make_token(keys, roles=["support"])
    raw = await raw_exchange(
        proxy.sidecar.listen_port,
        b"GET /api/users/?q=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status_of(raw) == 200
    assert upstream.seen[0]["path"] == "/api/users/?q=1"
