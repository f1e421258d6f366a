"""soniq.contrib.otel: a job's run span is a child of the enqueue that made it, in the
trace of the request around that enqueue, on every backend; spans a job makes are
children of its run span (async jobs on the loop, sync jobs in their thread)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from soniq import Snooze, Soniq
from soniq.contrib.otel import instrument

pytestmark = pytest.mark.timeout(60)

BURST = {"burst": True, "burst_wait": 0, "concurrency": 4}


def traced(eq: Soniq) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert instrument(eq, provider) is instrument(eq, provider)  # once per Soniq
    return provider, exporter


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_run_spans_are_children_of_the_request_that_enqueued(any_eq: Soniq) -> None:
    provider, exporter = traced(any_eq)
    tracer = provider.get_tracer("test")

    @any_eq.job(name="o.work")
    async def work() -> None:
        with tracer.start_as_current_span("inside async"):
            pass

    @any_eq.job(name="o.sync_work")
    def sync_work() -> None:
        with tracer.start_as_current_span("inside sync"):
            pass

    @any_eq.job(name="o.fail", max_retries=0)
    async def fail() -> None:
        raise RuntimeError("broken")

    @any_eq.job(name="o.snooze")
    async def snooze() -> None:
        raise Snooze(3600)

    with tracer.start_as_current_span("request") as request:
        ids = [await any_eq.enqueue(job) for job in (work, sync_work, fail, snooze)]
    job = await any_eq.get_job(ids[0])
    assert job is not None and job.headers["traceparent"].startswith("00-")
    await any_eq.run_worker(**BURST)

    spans = list(exporter.get_finished_spans())
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}
    for name, inside in [("o.work", "inside async"), ("o.sync_work", "inside sync")]:
        enqueue, run = one(spans, f"enqueue {name}"), one(spans, f"run {name}")
        assert enqueue.kind is SpanKind.PRODUCER and run.kind is SpanKind.CONSUMER
        assert parent_of(enqueue) == request.get_span_context().span_id
        assert parent_of(run) == enqueue.context.span_id
        assert parent_of(one(spans, inside)) == run.context.span_id
        assert run.attributes is not None and run.attributes["soniq.outcome"] == "done"
        assert run.attributes["messaging.destination.name"] == "default"
        assert run.status.status_code is StatusCode.UNSET
    failed = one(spans, "run o.fail")
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.attributes is not None and failed.attributes["soniq.outcome"] == "failed"
    snoozed = one(spans, "run o.snooze")
    assert snoozed.status.status_code is StatusCode.UNSET
    assert snoozed.attributes is not None and snoozed.attributes["soniq.outcome"] == "snoozed"
    assert one(spans, "enqueue o.work").attributes["messaging.message.id"] == str(ids[0])  # type: ignore[index]


async def test_enqueue_many_is_one_span_and_each_run_its_child(any_eq: Soniq) -> None:
    _, exporter = traced(any_eq)

    @any_eq.job(name="o.each")
    async def each(n: int) -> None: ...

    await any_eq.enqueue_many(each, [{"n": n} for n in range(3)])
    await any_eq.run_worker(**BURST)
    spans = list(exporter.get_finished_spans())
    enqueue = one(spans, "enqueue o.each")
    assert enqueue.parent is None  # no request around it: a trace of its own
    assert enqueue.attributes is not None
    assert enqueue.attributes["messaging.batch.message_count"] == 3
    runs = [s for s in spans if s.name == "run o.each"]
    assert len(runs) == 3
    assert {parent_of(r) for r in runs} == {enqueue.context.span_id}
