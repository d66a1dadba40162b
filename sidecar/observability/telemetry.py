"""The seed's observability API for apps: `init_observability`, `get_tracer`, `get_metrics`.

One call sets up, for the whole process:
- tracing: an OTel TracerProvider made global; with an OTLP endpoint, spans leave through
  the same bounded batch queue as the sidecar's (a dead collector never blocks the app);
- metrics: an OTel MeterProvider read by the Prometheus exporter into a registry of its
  own; `get_metrics().create_counter("requests_total").add(1, {...})` then shows on
  `/metrics` at `prometheus_port`. Each instrument keeps at most `MAX_SERIES` attribute sets
  (the SDK folds the rest into one overflow series), so a careless label cannot grow it
  without bound;
- logs: JSON lines on stdout at `DOTMAC_LOG_LEVEL`, carrying the trace and span ids of the
  span current where the line is written.

`DOTMAC_OTLP_ENDPOINT`, `DOTMAC_PROMETHEUS_PORT` and `DOTMAC_LOG_LEVEL` fill arguments left
out. Calling it again replaces nothing: the first set-up stays and is returned.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from sidecar import __version__
from sidecar.observability import logging as logs
from sidecar.observability.tracing import Tracing

# attribute sets kept per instrument before the SDK's overflow series takes the rest
MAX_SERIES = 2000
LOG = logging.getLogger("sidecar.telemetry")


@dataclass
class Observability:
    """What `init_observability` set up (tests and apps may look, nobody needs to)."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    registry: CollectorRegistry
    tracing: Tracing
    prometheus_port: int | None

    def shutdown(self) -> None:
        """Send queued spans (bounded wait) and stop the providers."""
        self.tracing.shutdown()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=2000)


_current: Observability | None = None
_lock = threading.Lock()


def init_observability(
    service_name: str,
    otlp_endpoint: str | None = None,
    prometheus_port: int | None = None,
    *,
    sample_ratio: float = 1.0,
    log_level: str | None = None,
    log_format: str = "json",
    prometheus_addr: str = "0.0.0.0",
) -> Observability:
    """Set up tracing, metrics and logs for this process (see the module docstring).

    `otlp_endpoint`: OTLP/HTTP collector base URL (`/v1/traces` is appended), empty for no
    export. `prometheus_port`: serve `/metrics` there (0: any free port), None for none.
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        if otlp_endpoint is None:
            otlp_endpoint = os.environ.get("DOTMAC_OTLP_ENDPOINT", "")
        if prometheus_port is None and os.environ.get("DOTMAC_PROMETHEUS_PORT"):
            prometheus_port = int(os.environ["DOTMAC_PROMETHEUS_PORT"])
        level = (log_level or os.environ.get("DOTMAC_LOG_LEVEL") or "INFO").upper()
        logs.configure(level, log_format, access_log=False)
        logs.use_otel_context()

        tracing = Tracing(
            service_name=service_name,
            otlp_endpoint=otlp_endpoint,
            sample_ratio=sample_ratio,
            on_spans=_log_span_result,
        )
        tracer_provider = tracing.provider or TracerProvider(
            resource=_resource(service_name), shutdown_on_exit=False
        )
        trace_api.set_tracer_provider(tracer_provider)

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(
            registry=registry,
            disable_target_info=True,
            scope_info_enabled=False,
            cardinality_limits=dict.fromkeys(_INSTRUMENT_TYPES, MAX_SERIES),
        )
        meter_provider = MeterProvider(
            metric_readers=[reader], resource=_resource(service_name), shutdown_on_exit=False
        )
        metrics_api.set_meter_provider(meter_provider)
        port: int | None = None
        if prometheus_port is not None:
            server, _thread = start_http_server(prometheus_port, prometheus_addr, registry)
            port = int(server.server_address[1])
        _current = Observability(
            service_name, tracer_provider, meter_provider, registry, tracing, port
        )
        atexit.register(_current.shutdown)
        return _current


def get_tracer(name: str) -> trace_api.Tracer:
    """A tracer from the process's provider (a no-op one before `init_observability`)."""
    return trace_api.get_tracer(name, __version__)


def get_metrics(name: str = "dotmac.platform") -> metrics_api.Meter:
    """The meter business metrics are made with: `create_counter`, `create_histogram`,
    `create_up_down_counter`, `create_gauge`; each `.add`/`.record` takes attributes."""
    return metrics_api.get_meter(name, __version__)


def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": service_name, "service.version": __version__})


def _log_span_result(result: str, count: int) -> None:
    if result != "exported":
        LOG.debug("spans not exported", extra={"fields": {"result": result, "count": count}})


def _instrument_types() -> tuple[type, ...]:
    """The SDK's public instrument classes (a synchronous gauge keeps the SDK's default)."""
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )

    return (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )


_INSTRUMENT_TYPES = _instrument_types()
