"""Path-template matching, compiled once per policy load into a segment trie.

Patterns are literal segments, `{name}` (one segment, captured), `*` (one segment) and
`**` (zero or more trailing segments, last only). A lookup walks the trie once, so its cost
grows with the depth of the path, not with the number of rules; the lowest-numbered rule
whose methods also match wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_VAR = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()+,=:@%]+$")


class PatternError(ValueError):
    """A path pattern is malformed."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled path pattern of one rule."""

    rule_index: int
    text: str
    captures: tuple[tuple[int, str], ...]  # (segment position, variable name)

    @property
    def variables(self) -> frozenset[str]:
        """Names this pattern captures."""
        return frozenset(name for _, name in self.captures)


def parse_pattern(text: str, rule_index: int) -> tuple[list[str], Pattern]:
    """Split and validate a pattern; returns its trie keys ('' for one segment, '**')."""
    if not text.startswith("/"):
        raise PatternError(f"path pattern {text!r} must start with '/'")
    body = text.rstrip("/")
    segments = body.split("/")[1:] if body else []
    keys: list[str] = []
    captures: list[tuple[int, str]] = []
    seen: set[str] = set()
    for pos, seg in enumerate(segments):
        if seg == "**":
            if pos != len(segments) - 1:
                raise PatternError(f"path pattern {text!r}: '**' may only be the last segment")
            keys.append("**")
            continue
        if seg == "*":
            keys.append("")
            continue
        var = _VAR.match(seg)
        if var:
            name = var.group(1)
            if name in seen:
                raise PatternError(f"path pattern {text!r}: variable {{{name}}} appears twice")
            seen.add(name)
            captures.append((pos, name))
            keys.append("")
            continue
        if seg in ("", ".", "..") or not _LITERAL.match(seg):
            raise PatternError(
                f"path pattern {text!r}: bad segment {seg!r} (use literal text, {{name}}, * or **)"
            )
        keys.append("/" + seg)  # literal keys carry a '/' so they never clash with '' or '**'
    return keys, Pattern(rule_index, text, tuple(captures))


class _Node:
    __slots__ = ("children", "ends", "tails", "wild")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.wild: _Node | None = None
        self.ends: list[Pattern] = []  # patterns that end exactly here
        self.tails: list[Pattern] = []  # patterns ending in ** here


class PathMatcher:
    """All patterns of a policy in one trie."""

    def __init__(self) -> None:
        self._root = _Node()

    def add(self, keys: Sequence[str], pattern: Pattern) -> None:
        """Insert one parsed pattern."""
        node = self._root
        for key in keys:
            if key == "**":
                node.tails.append(pattern)
                return
            if key == "":
                if node.wild is None:
                    node.wild = _Node()
                node = node.wild
            else:
                node = node.children.setdefault(key[1:], _Node())
        node.ends.append(pattern)

    def candidates(self, path: str) -> list[Pattern]:
        """Every pattern matching `path` (normalized; trailing slash ignored)."""
        body = path.rstrip("/")
        segments = body.split("/")[1:] if body else []
        found: list[Pattern] = []
        self._walk(self._root, segments, 0, found)
        return found

    def _walk(self, node: _Node, segments: list[str], i: int, found: list[Pattern]) -> None:
        if node.tails:
            found.extend(node.tails)
        if i == len(segments):
            found.extend(node.ends)
            return
        child = node.children.get(segments[i])
        if child is not None:
            self._walk(child, segments, i + 1, found)
        if node.wild is not None:
            self._walk(node.wild, segments, i + 1, found)


def captures(pattern: Pattern, path: str) -> dict[str, str]:
    """The variables `pattern` captures from `path` (which it is known to match)."""
    if not pattern.captures:
        return {}
    segments = path.rstrip("/").split("/")[1:]
    return {name: segments[pos] for pos, name in pattern.captures}
