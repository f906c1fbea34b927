"""OpenTelemetry tracing (``--otlp-endpoint``), as TGI's router exports it: one span per
request with ``validation``, ``queue`` and ``inference`` child spans, sent over OTLP/gRPC.
An incoming W3C ``traceparent`` header makes the request span its child.

Spans are built once per finished request from the timings already measured, with
explicit start and end times, so tracing adds nothing to the per-token path.
"""

from __future__ import annotations

import time

DEFAULT_SERVICE_NAME = "text-generation-inference.router"


class Tracer:
    def __init__(self, endpoint: str, service_name: str = DEFAULT_SERVICE_NAME):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        insecure = not endpoint.startswith("https://")
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure), schedule_delay_millis=500)
        )
        self.tracer = self.provider.get_tracer("tgi_compat")
        self.propagator = TraceContextTextMapPropagator()

    def _ns(self, monotonic: float) -> int:
        # Timings are monotonic; spans want wall-clock nanoseconds.
        return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)

    def record(self, r, gen, t, error: str | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        parent = self.propagator.extract(r.trace_headers) if r.trace_headers else None
        start = self._ns(r.start)
        end = start + int(t.total * 1e9)
        attributes = {
            "request_id": r.id,
            "route": r.route,
            "prompt_tokens": r.input_length,
        }
        if gen is not None:
            attributes.update(generated_tokens=len(gen.ids), finish_reason=gen.finish_reason or "")
        span = self.tracer.start_span("generate", context=parent, start_time=start, attributes=attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        ctx = trace.set_span_in_context(span)
        cursor = start
        for name, seconds in (("validation", t.validation), ("queue", t.queue), ("inference", t.inference)):
            child_end = cursor + int(seconds * 1e9)
            self.tracer.start_span(name, context=ctx, start_time=cursor).end(end_time=child_end)
            cursor = child_end
        span.end(end_time=end)

    def shutdown(self) -> None:
        self.provider.shutdown()
