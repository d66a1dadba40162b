"""Audit events: every allow/deny decision and every secret read, one JSON line each.

Never a secret value or a credential: a secret read names the path, version, tenant, rule
and request id; a decision names the rule, outcome, reason and the kind of caller.
The sink is stdout or `file:PATH` (appended, line-buffered).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from sidecar.observability.logging import flush_lines, timestamp, write_line

_encode = json.JSONEncoder(separators=(",", ":")).encode
_str = json.encoder.encode_basestring_ascii  # a JSON string literal, as json.dumps writes it


class AuditLog:
    """Writes audit events to the configured sink."""

    def __init__(self, sink: str = "stdout") -> None:
        self.sink = sink
        self._out: IO[str]
        if sink.startswith("file:"):
            self._out = open(sink[5:], "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._out = sys.stdout
            self._owned = False

    def _write(self, event: dict[str, Any]) -> None:
        line = {
            "ts": timestamp(time.time()),
            "level": "INFO",
            "msg": "audit",
            **event,
        }
        write_line(self._out, _encode(line) + "\n")

    def secret_read(
        self, *, path: str, version: str, tenant: str | None, rule: str, request_id: str
    ) -> None:
        """A secret was read for a request (injected as a header)."""
        self._write(
            {
                "event": "secret_read",
                "path": path,
                "version": version,
                "tenant": tenant,
                "rule": rule,
                "request_id": request_id,
            }
        )

    def secret_loaded(self, *, path: str, version: str, purpose: str) -> None:
        """A secret was read by a background loop (refresh or file rendering)."""
        self._write(
            {
                "event": "secret_read",
                "path": path,
                "version": version,
                "tenant": None,
                "rule": None,
                "request_id": None,
                "purpose": purpose,
            }
        )

    def decision(
        self,
        *,
        decision: str,
        rule: str,
        reason: str,
        subject_kind: str,
        method: str,
        path: str,
        request_id: str,
        trace_id: str,
    ) -> None:
        """A policy decision on a request (one per request: the line is built directly)."""
        s = _str
        write_line(
            self._out,
            f'{{"ts":"{timestamp(time.time())}","level":"INFO","msg":"audit","event":"decision",'
            f'"decision":{s(decision)},"rule":{s(rule)},"reason":{s(reason)},'
            f'"subject_kind":{s(subject_kind)},"method":{s(method)},"path":{s(path)},'
            f'"request_id":{s(request_id)},"trace_id":{s(trace_id)}}}\n',
        )

    def close(self) -> None:
        """Close a file sink."""
        flush_lines()
        if self._owned:
            self._out.close()
