"""Optional OpenTelemetry traces: with OTEL_EXPORTER_OTLP_ENDPOINT set, the real daemon exports one server span
per request over OTLP/HTTP, here to a local collector that decodes them with OpenTelemetry's own protobuf types;
without it, nothing is exported."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from conftest import Daemon, wait_for

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                                    reason="the otel extra is not installed (pip install -e '.[otel]')")

MODEL = "smollm2:latest"


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    self.server.spans.append({
                        "name": span.name, "service": service, "attributes": attributes, "trace": span.trace_id,
                        "id": span.span_id, "parent": span.parent_span_id, "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_a_span_per_request_with_its_model_and_tokens(collector: Collector, tmp_path: Path, gguf_path: Path) -> None:
    daemon = Daemon(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    daemon.start()
    try:
        assert daemon.cli("create", "smollm2", "--from", str(gguf_path)).returncode == 0
        answer = ollama.Client(host=daemon.base_url).chat(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], options={"num_predict": 6})

        def chat_span() -> dict[str, Any] | None:
            return next((s for s in collector.spans if s["name"] == "POST /api/chat"), None)

        assert wait_for(lambda: chat_span() is not None, timeout=20), collector.spans
        span = chat_span()
        assert span is not None and span["service"] == "mgr"
        attributes = span["attributes"]
        assert attributes["http.response.status_code"] == 200 and attributes["mgr.api"] == "ollama"
        assert attributes["gen_ai.request.model"] == MODEL
        assert attributes["gen_ai.usage.input_tokens"] == answer.prompt_eval_count
        assert attributes["gen_ai.usage.output_tokens"] == answer.eval_count
        assert span["end"] - span["start"] >= (answer.total_duration or 0) * 0.99
        # it waited for the model's load: a child span says how long
        [queue] = [s for s in collector.spans if s["parent"] == span["id"]]
        assert queue["name"] == "queue" and queue["trace"] == span["trace"] and queue["attributes"]["mgr.load_ms"] > 0
        assert span["start"] <= queue["start"] < queue["end"] <= span["end"]
    finally:
        daemon.stop()


def test_no_endpoint_no_traces(collector: Collector, tmp_path: Path) -> None:
    before = len(collector.spans)
    daemon = Daemon(tmp_path)
    daemon.start()
    daemon.cli("list")
    daemon.stop()
    assert len(collector.spans) == before
    assert "OpenTelemetry" not in daemon.log_path.read_text()
