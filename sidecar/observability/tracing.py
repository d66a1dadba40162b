"""Traces: W3C trace context on every request; OTel spans exported over OTLP/HTTP when asked.

Without an `otlp_endpoint` the sidecar still continues the client's trace (or starts one),
logs its ids and hands the app a `traceparent` whose parent is the sidecar's span id: no
SDK work on the request path. With one, each request gets a SERVER span and, when it is
forwarded, a CLIENT child span for the upstream call; the app's `traceparent` names the
CLIENT span. Spans leave through the SDK's BatchSpanProcessor (a bounded queue drained by a
worker thread) to the OTLP/HTTP exporter, so a slow or dead collector never blocks a
request; spans it cannot take are counted as dropped.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the OTel SDK is imported only when export is on (sidecar.observability.otel)
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.observability.otel import CountingProcessor

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
LOG = logging.getLogger("sidecar.tracing")
# ids need to be unique, not secret (the OTel SDK's own generator uses `random` too): no
# getrandom() system call per request
_random_bits = random.getrandbits

# The batch queue: bounded, drained every second or whenever half a batch is waiting.
QUEUE_SIZE = 2048
BATCH_SIZE = 512
SCHEDULE_DELAY_MS = 1000
EXPORT_TIMEOUT_S = 5.0
# How long stop() waits for the last spans to leave.
SHUTDOWN_TIMEOUT_MS = 2000


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a configured endpoint.

    As with `OTEL_EXPORTER_OTLP_ENDPOINT`, a base address gets `/v1/traces` appended; an
    address that already ends in `/v1/traces` is used as written.
    """
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class RequestTrace:
    """The trace one request belongs to, with no SDK behind it (export off).

    `trace_id`/`span_id` are lowercase hex for logs; `upstream_headers()` gives what the app
    receives; `finish()` records the outcome (nothing to record here).
    """

    __slots__ = ("flags", "parent_id", "span_id", "trace_id", "tracestate")

    def __init__(
        self, trace_id: str, parent_id: str | None, flags: str, tracestate: str | None
    ) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = f"{_random_bits(64) or 1:016x}"
        self.flags = flags
        self.tracestate = tracestate

    @classmethod
    def from_headers(cls, traceparent: str | None, tracestate: str | None) -> RequestTrace:
        """Continue a valid client `traceparent` (and its `tracestate`); else start a trace."""
        if traceparent:
            m = _TRACEPARENT.match(traceparent.strip())
            if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
                state = tracestate if tracestate and len(tracestate) <= 512 else None
                return cls(m.group(1), m.group(2), m.group(3), state)
        return cls(f"{_random_bits(128) or 1:032x}", None, "01", None)

    def traceparent(self) -> str:
        """The `traceparent` naming the sidecar's span as the parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def upstream_headers(self, method: str, url: str) -> list[tuple[str, str]]:
        """Trace headers for the upstream request (starts the upstream span, if any)."""
        out = [("traceparent", self.traceparent())]
        if self.tracestate:
            out.append(("tracestate", self.tracestate))
        return out

    def end_upstream(self, status: int | None, error: str | None = None) -> None:
        """The upstream call is over (status None: no response)."""

    def finish(self, outcome: Outcome) -> None:
        """The request is answered."""


class Outcome:
    """What the server span records about a request, filled as the request goes."""

    __slots__ = ("auth_method", "decision", "path", "reason", "route", "rule", "status")

    def __init__(self) -> None:
        self.rule = "-"
        self.route: str | None = None
        self.decision = ""
        self.reason = ""
        self.auth_method = ""
        self.path = ""
        self.status = 500


class Tracing:
    """Makes the RequestTrace of each request; the OTel SDK only when export is on."""

    def __init__(
        self,
        *,
        service_name: str,
        otlp_endpoint: str,
        sample_ratio: float,
        on_spans: Callable[[str, int], None] | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.enabled = bool(otlp_endpoint)
        self._on_spans = on_spans or (lambda result, n: None)
        self._last_drop_log = 0.0
        self._lock = threading.Lock()
        self.provider: TracerProvider | None = None
        self.processor: CountingProcessor | None = None
        self._start_sdk: Callable[[str, str | None, str | None], RequestTrace] | None = None
        if not self.enabled:
            return
        from sidecar.observability import otel

        # the SDK warns once per span when its queue is full; we count and log ourselves
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
        self.provider, self.processor, self._start_sdk = otel.build(
            service_name=service_name,
            endpoint=traces_url(otlp_endpoint),
            sample_ratio=sample_ratio,
            queue_size=queue_size,
            on_exported=self._exported,
            on_dropped=self._dropped_by_queue,
            export_timeout_s=EXPORT_TIMEOUT_S,
        )

    def _exported(self, result: str, count: int) -> None:
        self._on_spans(result, count)
        if result != "exported":
            self._log_drop(f"the trace collector did not take {count} spans")

    def _dropped_by_queue(self, count: int) -> None:
        self._on_spans("queue_full", count)
        self._log_drop("the span export queue is full; spans are dropped")

    def _log_drop(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_drop_log < 10.0:
                return
            self._last_drop_log = now
        LOG.warning(message, extra={"fields": {"event": "spans_dropped"}})

    def start(self, method: str, traceparent: str | None, tracestate: str | None) -> RequestTrace:
        """The trace of a request that just arrived (its SERVER span starts now)."""
        if self._start_sdk is None:
            return RequestTrace.from_headers(traceparent, tracestate)
        return self._start_sdk(method, traceparent, tracestate)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued now (blocking: call from a thread)."""
        if self.processor is None:
            return True
        return self.processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Send what is queued (bounded by SHUTDOWN_TIMEOUT_MS) and stop (blocking)."""
        if self.processor is not None:
            self.processor.shutdown(SHUTDOWN_TIMEOUT_MS)
            self.processor = None
