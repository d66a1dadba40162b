"""`from dotmac.platform.observability import init_observability, get_tracer, get_metrics`
(the seed's API)."""

from sidecar.observability.telemetry import (
    Observability,
    get_metrics,
    get_tracer,
    init_observability,
)

__all__ = ["Observability", "get_metrics", "get_tracer", "init_observability"]
