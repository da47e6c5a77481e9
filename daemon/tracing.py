"""Optional OpenTelemetry traces: one server span per HTTP request (its model, API, status, tokens, queue wait and
time to first token as attributes, its queue wait as a child span), exported over OTLP/HTTP.

On only when an OTLP endpoint is configured the standard way (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter reads its other OTEL_* variables itself) and the SDK is
installed (`pip install 'mgr[otel]'`); otherwise nothing is imported and nothing costs anything. The span is
written once the request has ended, from the same record the access log prints (logs.py), so the request path
carries no tracing code. Incoming `traceparent` headers are not followed (not done yet).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .metrics import RequestRecord

log = logging.getLogger("mgr.daemon")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Traces:
    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def request(self, record: RequestRecord, endpoint: str, status: int, api: str, seconds: float) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        ended = time.time_ns()
        started = ended - int(seconds * 1e9)
        attributes: dict[str, str | int | float] = {
            "http.request.method": record.method, "url.path": record.path, "http.route": endpoint,
            "http.response.status_code": status, "mgr.api": api,
        }
        if record.model:
            attributes["gen_ai.request.model"] = record.model
        if record.prompt_tokens or record.completion_tokens:
            attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
        if record.first_token_seconds is not None:
            attributes["mgr.time_to_first_token_ms"] = round(record.first_token_seconds * 1000, 1)
        span = self.tracer.start_span(f"{record.method} {endpoint}", kind=SpanKind.SERVER, start_time=started,
                                      attributes=attributes)
        if record.queue_seconds:
            queued = started + int((record.leased_at - record.started - record.queue_seconds) * 1e9)
            child = self.tracer.start_span("queue", context=set_span_in_context(span), start_time=queued,
                                           attributes={"mgr.load_ms": round(record.load_seconds * 1000, 1)})
            child.end(end_time=queued + int(record.queue_seconds * 1e9))
        span.end(end_time=ended)


def from_environment(env: Mapping[str, str] | None = None) -> Traces | None:
    """Traces when an OTLP endpoint is set and the SDK is there; None (and a log line saying why) otherwise."""
    env = os.environ if env is None else env
    if not any(env.get(variable) for variable in ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but OpenTelemetry's SDK is not installed (pip install 'mgr[otel]'): "
                    "no traces")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "mgr"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # flushed at exit (the SDK's atexit)
    log.info("OpenTelemetry traces to %s", next(env[v] for v in ENDPOINT_VARIABLES if env.get(v)))
    return Traces(provider.get_tracer("mgr"))
