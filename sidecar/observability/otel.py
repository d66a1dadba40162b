"""The OTel SDK side of tracing, imported only when spans are exported.

SERVER and CLIENT spans from the SDK, W3C propagation, and the SDK's BatchSpanProcessor
(a bounded queue drained by a worker thread) in front of the OTLP/HTTP exporter, with
counts of the spans exported and lost.
"""

from __future__ import annotations

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
from sidecar.observability.tracing import (
    BATCH_SIZE,
    SCHEDULE_DELAY_MS,
    SHUTDOWN_TIMEOUT_MS,
    Outcome,
    RequestTrace,
)

_PROPAGATOR = TraceContextTextMapPropagator()
StartTrace = Callable[[str, str | None, str | None], RequestTrace]


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


def build(
    *,
    service_name: str,
    endpoint: str,
    sample_ratio: float,
    queue_size: int,
    on_exported: Callable[[str, int], None],
    on_dropped: Callable[[int], None],
    export_timeout_s: float,
) -> tuple[
    TracerProvider, CountingProcessor, Callable[[str, str | None, str | None], RequestTrace]
]:
    """A tracer provider exporting to `endpoint`, its processor, and the per-request start."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = CountingExporter(
        OTLPSpanExporter(endpoint=endpoint, timeout=export_timeout_s), on_exported
    )
    processor = CountingProcessor(exporter, on_dropped, queue_size)
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.version": __version__}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("dotmac-sidecar", __version__)

    def start(method: str, traceparent: str | None, tracestate: str | None) -> RequestTrace:
        carrier: dict[str, str] = {}
        if traceparent:
            carrier["traceparent"] = traceparent
            if tracestate:
                carrier["tracestate"] = tracestate
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.scheme": "http"},
        )
        return SpanTrace(span, method, tracer)

    return provider, processor, start
