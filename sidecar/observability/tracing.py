"""W3C trace context: continue the client's trace, or start one, and pass it to the app."""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class TraceContext:
    """The trace a request belongs to and the sidecar's own span id in it."""

    __slots__ = ("flags", "parent_id", "span_id", "trace_id")

    def __init__(self, trace_id: str, parent_id: str | None, flags: str) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = secrets.token_hex(8)
        self.flags = flags

    @classmethod
    def from_header(cls, value: str | None) -> TraceContext:
        """Continue a valid client `traceparent`; otherwise start a new sampled trace."""
        if value:
            m = _TRACEPARENT.match(value.strip())
            if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
                return cls(m.group(1), m.group(2), m.group(3))
        return cls(secrets.token_hex(16), None, "01")

    def traceparent(self) -> str:
        """The `traceparent` the app receives: this trace, the sidecar's span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"
