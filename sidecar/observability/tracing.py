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
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar import __version__

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_PROPAGATOR = TraceContextTextMapPropagator()
LOG = logging.getLogger("sidecar.tracing")

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
        self.span_id = secrets.token_hex(8)
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
        return cls(secrets.token_hex(16), None, "01", None)

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


class SpanTrace(RequestTrace):
    """A request traced with OTel SDK spans (export on)."""

    __slots__ = ("_method", "_server", "_tracer", "_upstream")

    def __init__(self, server: trace_api.Span, method: str, tracer: trace_api.Tracer) -> None:
        ctx = server.get_span_context()
        RequestTrace.__init__(
            self,
            format(ctx.trace_id, "032x"),
            None,
            "01" if ctx.trace_flags.sampled else "00",
            None,
        )
        self.span_id = format(ctx.span_id, "016x")
        self._server = server
        self._method = method
        self._tracer = tracer
        self._upstream: trace_api.Span | None = None

    def upstream_headers(self, method: str, url: str) -> list[tuple[str, str]]:
        server = self._server
        if not server.is_recording():
            # not sampled: the app still joins the trace, under the sidecar's span id
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=trace_api.set_span_in_context(server))
            return list(carrier.items())
        span = self._tracer.start_span(
            method,
            context=trace_api.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url},
        )
        self._upstream = span
        carrier = {}
        _PROPAGATOR.inject(carrier, context=trace_api.set_span_in_context(span))
        return list(carrier.items())

    def end_upstream(self, status: int | None, error: str | None = None) -> None:
        span = self._upstream
        if span is None:
            return
        self._upstream = None
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            span.set_attribute("error.type", error or str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def finish(self, outcome: Outcome) -> None:
        server = self._server
        self.end_upstream(None, "aborted")
        if not server.is_recording():
            return
        if outcome.route is not None:
            server.update_name(f"{self._method} {outcome.route}")
            server.set_attribute("http.route", outcome.route)
        attributes: dict[str, Any] = {
            "http.response.status_code": outcome.status,
            "dotmac.rule": outcome.rule,
        }
        if outcome.path:
            attributes["url.path"] = outcome.path
        if outcome.decision:
            attributes["dotmac.decision"] = outcome.decision
        if outcome.reason:
            attributes["dotmac.reason"] = outcome.reason
        if outcome.auth_method:
            attributes["dotmac.auth_method"] = outcome.auth_method
        server.set_attributes(attributes)
        if outcome.status >= 500:
            server.set_attribute("error.type", outcome.reason or str(outcome.status))
            server.set_status(Status(StatusCode.ERROR))
        server.end()


class CountingExporter(SpanExporter):
    """Wraps the OTLP exporter: counts spans handed over, exported and lost."""

    def __init__(self, inner: SpanExporter, on_result: Callable[[str, int], None]) -> None:
        self.inner = inner
        self.on_result = on_result
        self.taken = 0  # written by the export thread only

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        self.on_result(
            "exported" if result is SpanExportResult.SUCCESS else "export_failed", len(spans)
        )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, plus a count of the spans its full queue drops.

    The batch queue drops its oldest span when a new one arrives and it is full; the queue
    length is (spans ended) - (spans taken by the exporter) - (spans dropped), each written
    by one thread only, so no lock is taken on the request path.
    """

    def __init__(
        self, exporter: CountingExporter, on_drop: Callable[[int], None], queue_size: int
    ) -> None:
        self.exporter = exporter
        self.on_drop = on_drop
        self.queue_size = queue_size
        self.ended = 0
        self.dropped = 0
        self.inner = BatchSpanProcessor(
            exporter,
            max_queue_size=queue_size,
            max_export_batch_size=min(BATCH_SIZE, queue_size),
            schedule_delay_millis=SCHEDULE_DELAY_MS,
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or not ctx.trace_flags.sampled:
            return
        if self.ended - self.exporter.taken - self.dropped >= self.queue_size:
            self.dropped += 1
            self.on_drop(1)
        self.ended += 1
        self.inner.on_end(span)

    def shutdown(self, timeout_millis: int = SHUTDOWN_TIMEOUT_MS) -> None:
        # BatchSpanProcessor.shutdown() waits up to 30 s; its batch processor takes a bound
        batch = getattr(self.inner, "_batch_processor", None)
        if batch is not None:
            batch.shutdown(timeout_millis=timeout_millis)
        else:
            inner: Any = self.inner  # typed in some SDK releases, untyped in others
            inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


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
        if not self.enabled:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # the SDK warns once per span when its queue is full; we count and log ourselves
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
        exporter = CountingExporter(
            OTLPSpanExporter(endpoint=traces_url(otlp_endpoint), timeout=EXPORT_TIMEOUT_S),
            self._exported,
        )
        self.processor = CountingProcessor(exporter, self._dropped_by_queue, queue_size)
        self.provider = TracerProvider(
            resource=Resource.create(
                {"service.name": service_name, "service.version": __version__}
            ),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("dotmac-sidecar", __version__)

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
        if not self.enabled:
            return RequestTrace.from_headers(traceparent, tracestate)
        carrier: dict[str, str] = {}
        if traceparent:
            carrier["traceparent"] = traceparent
            if tracestate:
                carrier["tracestate"] = tracestate
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.scheme": "http"},
        )
        return SpanTrace(span, method, self.tracer)

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
