"""Validation of enqueue calls, before any SQL exists (no database)."""

from __future__ import annotations

import datetime as dt
import math
import sys
import types
from typing import Any

import pytest

from soniq.core.enqueue import Registry, build_spec, split_options
from soniq.core.errors import (
    JobArgumentsError,
    JobDefinitionError,
    SerializationError,
    UnknownJobError,
)
from soniq.core.jobs import DEFAULT_MAX_RETRIES, JobSpec
from soniq.core.sql.postgres import PostgresQueries

UTC = dt.timezone.utc


def send_invoice(order_id: int, note: str = "") -> None: ...


def anything(**kwargs: Any) -> None: ...


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register(send_invoice, queue="invoices", max_retries=5, priority=3)
    reg.register(anything, name="anything")
    return reg


def spec_of(registry: Registry, job: Any = send_invoice, **kwargs: Any) -> JobSpec:
    options = split_options(kwargs)
    return build_spec(registry, job, [kwargs], options)


def test_defaults_come_from_the_decorator(registry: Registry) -> None:
    spec = spec_of(registry, order_id=1)
    assert (spec.name, spec.queue, spec.priority, spec.max_retries) == (
        f"{__name__}.send_invoice",
        "invoices",
        3,
        5,
    )
    assert spec.args == ({"order_id": 1},)


def test_options_override_and_are_not_arguments(registry: Registry) -> None:
    when = dt.datetime(2030, 1, 1, tzinfo=UTC)
    spec = spec_of(
        registry,
        order_id=1,
        queue="q2",
        priority=-4,
        run_at=when,
        max_retries=0,
        dedupe_key="order-1",
        timeout=dt.timedelta(seconds=90),
    )
    assert spec.args == ({"order_id": 1},)
    assert (spec.queue, spec.priority, spec.run_at, spec.max_retries) == ("q2", -4, when, 0)
    assert (spec.dedupe_key, spec.timeout) == ("order-1", 90.0)


def test_delay_is_relative_to_the_clock_passed_in(registry: Registry) -> None:
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    spec = spec_of(registry, order_id=1, delay=dt.timedelta(minutes=5))
    assert spec.delay == 300.0 and spec.run_at is None
    assert spec.due_at(now) == now + dt.timedelta(minutes=5)
    assert spec_of(registry, order_id=1).due_at(now) == now


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, JobArgumentsError, "missing required argument.*order_id"),
        ({"order_id": 1, "extra": 2}, JobArgumentsError, "unexpected argument.*extra"),
        ({"order_id": 1, "run_at": dt.datetime(2030, 1, 1)}, ValueError, "run_at.*aware"),
        ({"order_id": 1, "run_at": "tomorrow"}, TypeError, "run_at must be a datetime"),
        ({"order_id": 1, "delay": -1}, ValueError, "delay must be >= 0"),
        ({"order_id": 1, "delay": math.inf}, ValueError, "delay"),
        ({"order_id": 1, "delay": "5"}, TypeError, "delay must be seconds"),
        (
            {"order_id": 1, "delay": 1, "run_at": dt.datetime.now(UTC)},
            TypeError,
            "run_at or delay",
        ),
        ({"order_id": 1, "priority": 1.5}, TypeError, "priority must be an int"),
        ({"order_id": 1, "priority": True}, TypeError, "priority must be an int"),
        ({"order_id": 1, "priority": 2**40}, ValueError, "priority must be between"),
        ({"order_id": 1, "max_retries": -1}, ValueError, "max_retries must be an int >= 0"),
        ({"order_id": 1, "queue": ""}, TypeError, "queue must be a non-empty str"),
        ({"order_id": 1, "queue": "a\x00"}, ValueError, "queue must not contain a NUL"),
        ({"order_id": 1, "dedupe_key": 7}, TypeError, "dedupe_key must be a non-empty str"),
        ({"order_id": 1, "timeout": 0}, ValueError, "timeout must be a positive"),
        ({"order_id": math.nan}, SerializationError, "'order_id'"),
        ({"order_id": 1, "note": "\x00"}, SerializationError, "'note'.*NUL"),
        ({"order_id": {1: 2}}, SerializationError, "non-string key"),
        ({"order_id": object()}, SerializationError, "not JSON"),
    ],
)
def test_bad_calls_name_the_argument(
    registry: Registry, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        spec_of(registry, **kwargs)


def test_validation_is_cached_per_set_of_names(registry: Registry) -> None:
    definition = registry.get(f"{__name__}.send_invoice")
    assert definition is not None
    batch = [{"order_id": i} for i in range(1000)] + [{"order_id": 1, "note": "x"}]
    build_spec(registry, send_invoice, batch, {})
    assert definition._checked == {frozenset({"order_id"}), frozenset({"order_id", "note"})}


def test_batch_errors_name_the_index(registry: Registry) -> None:
    with pytest.raises(JobArgumentsError, match="index 2"):
        build_spec(registry, send_invoice, [{"order_id": 1}, {"order_id": 2}, {}], {})
    with pytest.raises(ValueError, match="dedupe_key"):
        build_spec(registry, send_invoice, [{"order_id": 1}] * 2, {"dedupe_key": "k"})


def test_unknown_function_and_names(registry: Registry) -> None:
    def stranger(x: int) -> None: ...

    with pytest.raises(UnknownJobError, match=r"@eq.job\(\)"):
        spec_of(registry, stranger, x=1)
    # An unregistered name is allowed (the web process need not import worker code),
    # with library defaults; a registered name is validated.
    assert spec_of(registry, "elsewhere.job", anything=1).queue == "default"
    with pytest.raises(JobArgumentsError):
        spec_of(registry, f"{__name__}.send_invoice", wrong=1)
    with pytest.raises(TypeError, match="job must be"):
        spec_of(registry, 42)


def test_definitions_that_cannot_be_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry()

    def takes_queue(queue: str) -> None: ...

    def positional(a: int, /) -> None: ...

    with pytest.raises(JobDefinitionError, match="'queue' collides"):
        reg.register(takes_queue)
    with pytest.raises(JobDefinitionError, match="positional-only"):
        reg.register(positional)
    main_job = type(send_invoice)(send_invoice.__code__, {"__name__": "__main__"})
    main_job.__module__ = "__main__"
    # A __main__ with no file (python -c, a REPL) gives no importable name.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    with pytest.raises(JobDefinitionError, match=r"__main__ with no importable name.*name="):
        reg.register(main_job)
    reg.register(main_job, name="named")  # with a name it is fine
    # A script run as `python billing.py` names it as `soniq worker billing:eq` will.
    script = types.ModuleType("__main__")
    script.__file__ = "/srv/app/billing.py"
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert Registry().register(main_job).name == "billing.send_invoice"

    def send(x: int) -> None: ...

    reg.register(send, name="dup")
    with pytest.raises(JobDefinitionError, match="already registered"):
        reg.register(anything, name="dup")


def test_statements_bind_text_only_and_are_rendered_for_both_styles() -> None:
    spec = JobSpec("n", "q", ({"a": 1},), max_retries=DEFAULT_MAX_RETRIES)
    for style, marker in (("numeric", "$3::text::jsonb"), ("format", "%s::text::jsonb")):
        query = PostgresQueries("app schema", style).insert_jobs(spec)  # type: ignore[arg-type]
        assert marker in query.sql and '"app schema".soniq_jobs' in query.sql
        assert all(isinstance(p, (str, type(None))) for p in query.params)
    assert "%s" not in PostgresQueries("s", "numeric").insert_jobs(spec).sql
