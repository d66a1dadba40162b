"""The canonical path of a request target (contract sections 5.1, 5.2 and 9 "Paths").

The path returned here is what the policy matches AND what the app receives, so the two
can never disagree. Order: reject raw control/non-ASCII bytes and `;` `\\` `#`; reject
forbidden escapes; decode escapes of unreserved characters; merge repeated slashes;
resolve dot segments (climbing above the root is an error).
"""

from __future__ import annotations

import re

from sidecar.errors import BadRequest, Rejected

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_FORBIDDEN_RAW = re.compile(r"[\x00-\x20\x7f-\U0010ffff;\\#]")
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")
_SLOWPATH = re.compile(r"%|//|/\.(?:/|\.?(?:/|$))")


def canonical(target: str, *, allow_encoded_slashes: bool = False) -> tuple[str, str]:
    """(normalized path, raw query string) of a request target, or BadRequest."""
    if not target.startswith("/"):
        if "://" in target:
            raise BadRequest(
                "absolute_form_target", "absolute-form request targets are not accepted"
            )
        raise BadRequest("bad_target", "the request target must be a path starting with '/'")
    path, _, query = target.partition("?")
    bad = _FORBIDDEN_RAW.search(target)
    if bad is not None:
        raise _raw_char_error(bad.group())
    if _SLOWPATH.search(path) is None:
        return path, query  # the common case: nothing to decode, merge or resolve
    if "%" in path:
        path = _decode(path, allow_encoded_slashes)
        if _DOUBLE_ENCODED.search(path):
            raise BadRequest("double_encoding", "double percent-encoding in path")
    if "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    return _remove_dot_segments(path), query


def _raw_char_error(ch: str) -> Rejected:
    if ch == ";":
        return BadRequest("path_parameter", "';' path parameters are not accepted")
    if ch == "\\":
        return BadRequest("backslash_in_path", "backslash in path")
    if ch == "#":
        return BadRequest("fragment_in_target", "a fragment is not part of a request target")
    return BadRequest("bad_path_character", "control, space or non-ASCII character in target")


def _decode(path: str, allow_encoded_slashes: bool) -> str:
    out: list[str] = []
    utf8: bytearray = bytearray()  # pending escapes of non-ASCII bytes, kept encoded
    utf8_text: list[str] = []
    i = 0
    n = len(path)

    def flush_utf8() -> None:
        if utf8:
            try:
                utf8.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("bad_utf8_escape", "percent-escapes are not valid UTF-8") from None
            out.extend(utf8_text)
            utf8.clear()
            utf8_text.clear()

    while i < n:
        ch = path[i]
        if ch != "%":
            flush_utf8()
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadRequest("bad_escape", "'%' not followed by two hex digits")
        byte = int(pair, 16)
        escape = path[i : i + 3]
        i += 3
        if byte >= 0x80:
            utf8.append(byte)
            utf8_text.append(escape)
            continue
        flush_utf8()
        if byte < 0x20 or byte == 0x7F:
            raise BadRequest("encoded_control_character", "encoded control character in path")
        if byte in (0x2F, 0x5C):
            if not allow_encoded_slashes:
                raise BadRequest("encoded_slash", "encoded '/' or '\\' in path")
            out.append(escape.upper())
        elif byte == 0x3B:
            raise BadRequest("path_parameter", "encoded ';' in path")
        elif byte == 0x25:
            if _HEX.issuperset(path[i : i + 2]) and len(path[i : i + 2]) == 2:
                raise BadRequest("double_encoding", "double percent-encoding in path")
            out.append(escape)
        elif byte in _UNRESERVED:
            out.append(chr(byte))
        else:
            out.append(escape)
    flush_utf8()
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path; '..' above the root is an error, not clamped."""
    segments = path.split("/")[1:]
    stack: list[str] = []
    last = len(segments) - 1
    trailing = False
    for pos, seg in enumerate(segments):
        if seg == ".":
            trailing = pos == last
        elif seg == "..":
            if not stack:
                raise BadRequest("path_above_root", "'..' climbs above the root")
            stack.pop()
            trailing = pos == last
        else:
            stack.append(seg)
            trailing = False
    result = "/" + "/".join(stack)
    if trailing and not result.endswith("/"):
        result += "/"
    return result
