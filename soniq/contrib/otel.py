"""OpenTelemetry traces of a Soniq application (``pip install soniq[otel]``).

::

    from soniq.contrib.otel import instrument

    instrument(eq)  # in the process that enqueues, and in the worker's

Each enqueue call is a ``PRODUCER`` span (``enqueue <job name>``), and the current
trace context is written into the jobs' headers with the global propagator (W3C
``traceparent`` by default). Each run is a ``CONSUMER`` span (``run <job name>``)
whose parent is read back from the job's headers: a job's run sits in the trace of
the request that enqueued it, under its enqueue span, however long it waited and
whichever worker ran it. A run that raises records the exception and ends with
status ERROR (a snooze does not); ``soniq.outcome`` says how it ended.

The run span is current while the job's body runs: spans the job makes are its
children. A sync job's span is started in the job's own thread.

Spans follow OpenTelemetry's messaging conventions: ``messaging.system`` is
``soniq``, ``messaging.destination.name`` the queue, ``messaging.message.id`` the
job's id; ``soniq.job.name`` and ``soniq.job.attempt`` name the job and the run.
Only the API is needed here (``opentelemetry-api``); the SDK and exporters are the
application's to configure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "soniq.contrib.otel needs opentelemetry-api: pip install soniq[otel]"
    ) from exc

from soniq import EnqueueContext, RunContext, Snooze, Soniq, __version__

__all__ = ["SoniqTracing", "instrument"]


class SoniqTracing:
    """The enqueue and run middleware that trace a Soniq, with ``tracer``."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    @contextlib.contextmanager
    def enqueue(self, ctx: EnqueueContext) -> Iterator[None]:
        """A PRODUCER span around the insert; its context goes into the headers."""
        count = sum(n for _, _, n in ctx.counts)
        attributes: dict[str, str | int] = {
            "messaging.system": "soniq",
            "messaging.operation.type": "send",
            "messaging.destination.name": ctx.queue,
            "soniq.job.name": ctx.name,
            "soniq.operation": ctx.operation,
        }
        if count > 1:
            attributes["messaging.batch.message_count"] = count
        with self.tracer.start_as_current_span(
            f"enqueue {ctx.name}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            propagate.inject(ctx.headers)
            yield
            if ctx.ids is not None and len(ctx.ids) == 1:
                span.set_attribute("messaging.message.id", str(ctx.ids[0]))

    @contextlib.contextmanager
    def run(self, ctx: RunContext) -> Iterator[None]:
        """A CONSUMER span around the run, the child of the enqueue's span."""
        parent = propagate.extract(ctx.headers) if ctx.headers else None
        attributes: dict[str, str | int] = {
            "messaging.system": "soniq",
            "messaging.operation.type": "process",
            "messaging.destination.name": ctx.queue,
            "messaging.message.id": str(ctx.id),
            "soniq.job.name": ctx.name,
            "soniq.job.attempt": ctx.attempt,
        }
        with self.tracer.start_as_current_span(
            f"run {ctx.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Snooze:
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                if ctx.outcome is not None:
                    span.set_attribute("soniq.outcome", ctx.outcome)


def instrument(eq: Soniq, tracer_provider: TracerProvider | None = None) -> SoniqTracing:
    """Trace ``eq``'s enqueues and runs (the global tracer provider unless given);
    once per Soniq (a second call returns the first's tracing)."""
    found: SoniqTracing | None = getattr(eq, "_otel", None)
    if found is not None:
        return found
    tracing = SoniqTracing(trace.get_tracer("soniq", __version__, tracer_provider))
    eq.middleware(on="enqueue")(tracing.enqueue)
    eq.middleware(tracing.run)
    eq._otel = tracing  # type: ignore[attr-defined]
    return tracing
