"""Bad input to enqueue and ``@eq.job`` is refused in Python, before any SQL exists,
with an error of a known type that names the argument and says the fix (no database;
``tests/reliability/test_bad_input_matrix.py`` runs the same inputs on every backend).

Issue 12, defect 3: a 10,000-character queue name, ``delay=1e300`` and arguments
nested 10,000 deep used to reach the server (or blow the recursion limit) instead.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soniq import Rate, Soniq, WorkerConfig
from soniq.core import limits, serialize
from soniq.core.enqueue import Registry, build_spec, split_options
from soniq.core.errors import (
    ConfigurationError,
    JobArgumentsError,
    JobDefinitionError,
    SerializationError,
    UnknownJobError,
)
from soniq.core.jobs import JobSpec

UTC = dt.timezone.utc
LONG = 10_000


def send(order_id: int, note: str = "") -> None: ...


def anything(**kwargs: Any) -> None: ...


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register(send, name="billing.send")
    reg.register(anything, name="anything")
    return reg


def enqueue(registry: Registry, job: Any = "anything", **kwargs: Any) -> JobSpec:
    """What ``eq.enqueue(job, **kwargs)`` checks before its SQL."""
    options = split_options(kwargs)
    return build_spec(registry, job, [kwargs], options)


def enqueue_many(
    registry: Registry, batch: list[dict[str, Any]], job: Any = "anything", **options: Any
) -> JobSpec:
    """What ``eq.enqueue_many(job, batch, **options)`` checks before its SQL."""
    return build_spec(registry, job, batch, options)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def cycle() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


# (kwargs of an enqueue of "anything", error type, words the message must hold: the
# argument's name first, then the fix or the limit)
REFUSED: dict[str, tuple[dict[str, Any], type[Exception], tuple[str, ...]]] = {
    # options
    "long queue": ({"queue": "q" * LONG}, ValueError, ("queue", "MAX_QUEUE_LENGTH", "10,000")),
    "queue with a comma": ({"queue": "a,b"}, ValueError, ("queue", "comma")),
    "empty queue": ({"queue": ""}, TypeError, ("queue", "non-empty str")),
    "queue not a str": ({"queue": 7}, TypeError, ("queue", "non-empty str")),
    "NUL in queue": ({"queue": "a\x00"}, ValueError, ("queue", "NUL")),
    "surrogate in queue": ({"queue": "a\udc80"}, ValueError, ("queue", "surrogate")),
    "long dedupe_key": (
        {"dedupe_key": "k" * LONG},
        ValueError,
        ("dedupe_key", "MAX_DEDUPE_KEY_LENGTH", "hashlib.sha256"),
    ),
    "dedupe_key not a str": ({"dedupe_key": 7}, TypeError, ("dedupe_key", "non-empty str")),
    "surrogate in dedupe_key": ({"dedupe_key": "\ud800"}, ValueError, ("dedupe_key",)),
    "huge delay": ({"delay": 1e300}, ValueError, ("delay", "MAX_DELAY_SECONDS", "run_at")),
    "huge int delay": ({"delay": 10**400}, ValueError, ("delay", "MAX_DELAY_SECONDS")),
    "timedelta.max delay": ({"delay": dt.timedelta.max}, ValueError, ("delay", "100 years")),
    "infinite delay": ({"delay": math.inf}, ValueError, ("delay", "MAX_DELAY_SECONDS")),
    "NaN delay": ({"delay": math.nan}, ValueError, ("delay", ">= 0")),
    "negative delay": ({"delay": -1}, ValueError, ("delay", ">= 0", "run_at")),
    "huge negative delay": ({"delay": -(10**400)}, ValueError, ("delay", ">= 0", "huge int")),
    "huge int timeout": ({"timeout": 10**400}, ValueError, ("timeout", "MAX_TIMEOUT_SECONDS")),
    "delay not a number": ({"delay": "5"}, TypeError, ("delay", "timedelta")),
    "bool delay": ({"delay": True}, TypeError, ("delay",)),
    "far run_at": (
        {"run_at": dt.datetime(9999, 12, 31, tzinfo=UTC)},
        ValueError,
        ("run_at", "MAX_RUN_AT"),
    ),
    "early run_at": (
        {"run_at": dt.datetime(1, 1, 1, tzinfo=UTC)},
        ValueError,
        ("run_at", "MIN_RUN_AT"),
    ),
    "run_at before year 1 in UTC": (
        {"run_at": dt.datetime(1, 1, 1, 3, tzinfo=dt.timezone(dt.timedelta(hours=5)))},
        ValueError,
        ("run_at", "MIN_RUN_AT"),
    ),
    "naive run_at": ({"run_at": dt.datetime(2030, 1, 1)}, ValueError, ("run_at", "aware")),
    "run_at not a datetime": ({"run_at": "2030-01-01"}, TypeError, ("run_at", "datetime")),
    "run_at and delay": (
        {"run_at": dt.datetime(2030, 1, 1, tzinfo=UTC), "delay": 1},
        TypeError,
        ("run_at", "delay", "not both"),
    ),
    "huge timeout": ({"timeout": 1e300}, ValueError, ("timeout", "MAX_TIMEOUT_SECONDS", "None")),
    "zero timeout": ({"timeout": 0}, ValueError, ("timeout", "positive")),
    "NaN timeout": ({"timeout": math.nan}, ValueError, ("timeout", "positive")),
    "bool priority": ({"priority": True}, TypeError, ("priority", "int")),
    "priority out of range": ({"priority": 2**31}, ValueError, ("priority", "between")),
    "float priority": ({"priority": 1.5}, TypeError, ("priority", "int")),
    "negative max_retries": ({"max_retries": -1}, ValueError, ("max_retries", ">= 0")),
    "bool max_retries": ({"max_retries": False}, ValueError, ("max_retries",)),
    "huge max_retries": ({"max_retries": 2**31}, ValueError, ("max_retries", "at most")),
    # arguments
    "NaN": ({"ratio": math.nan}, SerializationError, ("'ratio'", "finite")),
    "infinity": ({"ratio": -math.inf}, SerializationError, ("'ratio'", "finite")),
    "NUL": ({"note": "a\x00b"}, SerializationError, ("'note'", "NUL", "remove it")),
    "NUL in a key": ({"doc": {"k\x00": 1}}, SerializationError, ("doc['k", "(key)", "NUL")),
    "non-string key": ({"tags": {1: "x"}}, SerializationError, ("'tags'", "use string keys")),
    "lone surrogate": ({"note": "\ud800"}, SerializationError, ("'note'", "surrogate", "decode")),
    "surrogate pair": ({"note": "\ud83d\ude00"}, SerializationError, ("'note'", "surrogate")),
    "surrogate in a key": ({"doc": {"\udc80": 1}}, SerializationError, ("(key)", "surrogate")),
    "surrogate in an argument name": ({"\ud800": 1}, SerializationError, ("argument name",)),
    "NUL in an argument name": ({"a\x00": 1}, SerializationError, ("argument name", "NUL")),
    "huge int": ({"n": 10**5000}, SerializationError, ("'n'", "MAX_INT_DIGITS", "string")),
    "int of 641 digits": ({"n": -(10**640)}, SerializationError, ("'n'", "MAX_INT_DIGITS")),
    "deep nesting": (
        {"tree": nested(LONG)},
        SerializationError,
        ("tree[0]['k'][0]", "more)", "MAX_NESTING_DEPTH", "flatten"),
    ),
    "value that contains itself": ({"loop": cycle()}, SerializationError, ("'loop", "itself")),
    "oversized payload": (
        {"blob": "x" * (limits.MAX_ARGS_JSON_CHARS + 1)},
        SerializationError,
        ("'blob'", "MAX_ARGS_JSON_CHARS", "pass its id"),
    ),
    "not JSON": ({"when": dt.date(2030, 1, 1)}, SerializationError, ("'when'", "datetime.date")),
    "bytes": ({"raw": b"x"}, SerializationError, ("'raw'", "not JSON")),
    "a set": ({"ids": {1, 2}}, SerializationError, ("'ids'", "builtins.set")),
    "a mapping that is not a dict": (
        {"m": types.MappingProxyType({"a": 1})},
        SerializationError,
        ("'m'", "dict(value)"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_any_sql(registry: Registry, case: str) -> None:
    kwargs, error, words = REFUSED[case]
    with pytest.raises(error) as info:
        enqueue(registry, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message[:300])
    assert len(message) < 1_000, "the message quotes the value whole"


@pytest.mark.parametrize("case", [c for c in REFUSED if "dedupe_key" not in REFUSED[c][0]])
def test_refused_in_a_batch_too(registry: Registry, case: str) -> None:
    """enqueue_many: options apply to every job; a bad argument names its job's index.
    (A dedupe_key is refused in any batch: see test_dedupe_key_in_a_batch.)"""
    kwargs, error, words = REFUSED[case]
    options = split_options(dict(kwargs))
    arguments = {k: v for k, v in kwargs.items() if k not in options}
    batch = [{"ok": 1}, {"ok": 2}, arguments] if arguments else [{"ok": 1}, {"ok": 2}]
    with pytest.raises(error) as info:
        enqueue_many(registry, batch, **options)
    message = str(info.value)
    assert words[0] in message
    if arguments:
        assert "index 2" in message


def test_dedupe_key_in_a_batch(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"dedupe_key.*one by one"):
        enqueue_many(registry, [{"a": 1}, {"a": 2}], dedupe_key="k")


def test_enqueue_by_name_checks_the_name(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"job name is 10,000 characters.*MAX_JOB_NAME_LENGTH"):
        enqueue(registry, "j" * LONG)
    with pytest.raises(TypeError, match="job name must be a non-empty str"):
        enqueue(registry, "")
    with pytest.raises(ValueError, match="job name must not contain a NUL"):
        enqueue(registry, "a\x00b")
    with pytest.raises(ValueError, match="job name contains the UTF-16 surrogate"):
        enqueue(registry, "a\ud800")
    with pytest.raises(ValueError, match="MAX_JOB_NAME_LENGTH"):
        enqueue_many(registry, [{}], "j" * (limits.MAX_JOB_NAME_LENGTH + 1))
    # an unregistered name of the maximum length is fine (a worker elsewhere knows it)
    assert enqueue(registry, "j" * limits.MAX_JOB_NAME_LENGTH).name == "j" * 200


def test_enqueue_of_an_unknown_function_or_object(registry: Registry) -> None:
    def stranger() -> None: ...

    with pytest.raises(UnknownJobError, match=r"@eq.job\(\)"):
        enqueue(registry, stranger)
    with pytest.raises(TypeError, match="job name"):
        enqueue(registry, 42)


def test_argument_names_are_checked_against_the_signature(registry: Registry) -> None:
    with pytest.raises(JobArgumentsError, match=r"missing required argument.*order_id"):
        enqueue(registry, "billing.send")
    with pytest.raises(JobArgumentsError, match=r"unexpected argument.*orderid"):
        enqueue(registry, "billing.send", order_id=1, orderid=1)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"name": "n" * LONG}, ValueError, ("job name", "MAX_JOB_NAME_LENGTH", "@eq.job")),
        ({"name": ""}, TypeError, ("job name", "non-empty")),
        ({"name": "a\x00"}, ValueError, ("job name", "NUL")),
        ({"queue": "q" * LONG}, ValueError, ("queue", "MAX_QUEUE_LENGTH")),
        ({"queue": "a,b"}, ValueError, ("queue", "comma")),
        ({"queue": "\ud800"}, ValueError, ("queue", "surrogate")),
        ({"timeout": 1e300}, ValueError, ("timeout", "MAX_TIMEOUT_SECONDS")),
        ({"timeout": -1}, ValueError, ("timeout", "positive")),
        ({"priority": True}, TypeError, ("priority",)),
        ({"max_retries": -1}, ValueError, ("max_retries",)),
        ({"backoff": 3}, JobDefinitionError, ("backoff",)),
    ],
)
def test_decoration_uses_the_same_limits(
    options: dict[str, Any], error: type[Exception], words: tuple[str, ...]
) -> None:
    def job(x: int) -> None: ...

    options.setdefault("name", "a.job")
    with pytest.raises(error) as info:
        Registry().register(job, **options)
    for word in words:
        assert word in str(info.value)


def test_decoration_refuses_reserved_and_positional_parameters() -> None:
    def uses_queue(queue: str) -> None: ...

    def positional(x: int, /) -> None: ...

    with pytest.raises(JobDefinitionError, match="'queue' collides with the enqueue option"):
        Registry().register(uses_queue, name="a")
    with pytest.raises(JobDefinitionError, match="positional-only"):
        Registry().register(positional, name="b")


# -- the limits themselves: the maximum passes, one more is refused ---------------------


def test_text_limits_are_inclusive(registry: Registry) -> None:
    spec = enqueue(
        registry,
        queue="q" * limits.MAX_QUEUE_LENGTH,
        dedupe_key="☕" * limits.MAX_DEDUPE_KEY_LENGTH,
    )
    assert len(spec.queue) == 200 and len(spec.dedupe_key or "") == 512
    # the NOTIFY payload of the longest queue, even in 4-byte characters, stays far
    # below PostgreSQL's 8000 bytes
    assert len(("\U0001f600" * limits.MAX_QUEUE_LENGTH).encode()) < 8000
    # and the longest key fits a btree entry (2704 bytes) in any characters
    assert len(("\U0001f600" * limits.MAX_DEDUPE_KEY_LENGTH).encode()) < 2704


def test_time_limits_are_inclusive(registry: Registry) -> None:
    assert enqueue(registry, delay=limits.MAX_DELAY_SECONDS).delay == limits.MAX_DELAY_SECONDS
    assert enqueue(registry, delay=dt.timedelta(days=365 * 100)).delay > 0
    assert enqueue(registry, delay=5e-324).delay == 5e-324
    assert enqueue(registry, run_at=limits.MAX_RUN_AT).run_at == limits.MAX_RUN_AT
    assert enqueue(registry, run_at=limits.MIN_RUN_AT).run_at == limits.MIN_RUN_AT
    assert enqueue(registry, timeout=limits.MAX_TIMEOUT_SECONDS).timeout is not None
    with pytest.raises(ValueError, match="MAX_DELAY_SECONDS"):
        enqueue(registry, delay=math.nextafter(limits.MAX_DELAY_SECONDS, math.inf))


def test_run_at_is_sent_in_utc(registry: Registry) -> None:
    """The same instant, in UTC: an offset with microseconds (which Python allows) is
    no valid PostgreSQL input, and the far ends of the range are judged in UTC."""
    odd = dt.timezone(dt.timedelta(hours=5, microseconds=1))
    when = dt.datetime(2030, 1, 1, 12, tzinfo=odd)
    spec = enqueue(registry, run_at=when)
    assert spec.run_at == when and spec.run_at is not None
    assert spec.run_at.utcoffset() == dt.timedelta(0)


def test_nesting_limit_is_inclusive(registry: Registry) -> None:
    enqueue(registry, tree=nested(limits.MAX_NESTING_DEPTH))
    with pytest.raises(SerializationError, match="MAX_NESTING_DEPTH"):
        enqueue(registry, tree=nested(limits.MAX_NESTING_DEPTH + 1))


def test_int_limit_is_inclusive(registry: Registry) -> None:
    biggest = 10**limits.MAX_INT_DIGITS - 1
    spec = enqueue(registry, n=biggest, m=-biggest)
    assert json.loads(serialize.dumps(spec.args[0])) == {"n": biggest, "m": -biggest}


def test_size_limit_is_exact(registry: Registry) -> None:
    # {"blob":"x..."} is 12 characters of JSON around the string
    fits = "x" * (limits.MAX_ARGS_JSON_CHARS - 11)
    assert len(serialize.dumps({"blob": fits})) == limits.MAX_ARGS_JSON_CHARS
    enqueue(registry, blob=fits)
    with pytest.raises(SerializationError, match="1,000,001 characters"):
        enqueue(registry, blob=fits + "x")
    # escapes count: 200,000 control characters are 1,200,000 characters of JSON
    with pytest.raises(SerializationError, match="'blob'"):
        enqueue(registry, small=1, blob="\x01" * 200_000)
    enqueue(registry, blob="\x01" * 150_000)


def test_size_limit_names_the_job_in_a_batch(registry: Registry) -> None:
    big = "x" * limits.MAX_ARGS_JSON_CHARS
    with pytest.raises(SerializationError, match=r"'blob'.*index 1"):
        enqueue_many(registry, [{"blob": "x"}, {"blob": big}])


def test_batch_size_limit(registry: Registry) -> None:
    each = "x" * (limits.MAX_ARGS_JSON_CHARS // 2)
    jobs = limits.MAX_BATCH_JSON_CHARS // len(each) + 1
    with pytest.raises(SerializationError, match=r"MAX_BATCH_JSON_CHARS.*split the batch"):
        enqueue_many(registry, [{"blob": each} for _ in range(jobs)])
    enqueue_many(registry, [{"blob": each} for _ in range(jobs - 2)])


def test_recursion_limit_never_shows(registry: Registry) -> None:
    """Nothing the walk meets ends in RecursionError: the depth check stops first,
    also for a dict that contains itself and for a value of many distinct levels."""
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(SerializationError) as info:
        enqueue(registry, doc=looped)
    assert "doc['self']['self']" in str(info.value) and "contains itself" in str(info.value)
    with pytest.raises(SerializationError, match="more than 100 levels"):
        enqueue(registry, doc=nested(100_000))


def test_messages_abbreviate_deep_paths(registry: Registry) -> None:
    with pytest.raises(SerializationError) as info:
        enqueue(registry, tree=nested(200, leaf=math.nan))
    assert "more)" in str(info.value) and len(str(info.value)) < 500


def test_check_arguments_refuses_what_the_walk_refuses() -> None:
    """``check_arguments`` is what the worker uses for results: the same refusals."""
    with pytest.raises(SerializationError, match="MAX_NESTING_DEPTH"):
        serialize.check_arguments({"result": nested(LONG)}, job="")
    with pytest.raises(SerializationError, match="surrogate"):
        serialize.check_arguments({"result": ["\udfff"]}, job="")


# -- what is accepted comes back as it went in -----------------------------------------


def test_big_floats_stay_floats() -> None:
    """PostgreSQL's jsonb keeps 1e+16 as the integer 10000000000000000 (it would come
    back an int), so floats from 1e16 up are written in full, with a fraction."""
    values = [1e16, -1.5e300, 1.7976931348623157e308, 123456789.0, 5e-324, 1e-7]
    text = serialize.dumps({"v": values, "s": "e+ in a string"})
    assert "e+" not in text.replace("e+ in", "")
    back = json.loads(text)
    assert back == {"v": values, "s": "e+ in a string"}
    assert all(type(v) is float for v in back["v"])
    assert serialize.dumps([1, "x"]) == '[1,"x"]'  # the fast path is untouched


def test_tuples_come_back_as_lists(registry: Registry) -> None:
    spec = enqueue(registry, point=(1, 2))
    assert json.loads(serialize.dumps(spec.args[0])) == {"point": [1, 2]}


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (1e16 is not 10**16)."""
    if isinstance(a, dict):
        return (
            type(b) is dict
            and a.keys() == b.keys()
            and all(same(value, b[key]) for key, value in a.items())
        )
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        return type(b) is float and a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


# Everything JSON-shaped, including what must be refused (surrogates, NUL, NaN, huge
# ints, deep values), so the property also says that nothing unsafe slips through.
_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()))
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**64, -(2**63), 10**640 - 1, -(10**640), 10**700])
    | st.floats()
    | st.sampled_from([1e16, -1e22, 1.5e300, 5e-324, -0.0, 2.0**53 + 2])
    | _text
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_text.filter(bool), _values, max_size=5))
def test_what_build_spec_accepts_round_trips(args: dict[str, Any]) -> None:
    registry = Registry()
    registry.register(anything, name="anything")
    try:
        spec = build_spec(registry, "anything", [args], {})
    except SerializationError:
        return
    text = serialize.dumps(spec.args[0])
    assert text.isascii()
    assert same(args, json.loads(text))


@settings(max_examples=100)
@given(st.lists(st.dictionaries(_text.filter(bool), _values, max_size=3), min_size=2, max_size=4))
def test_what_a_batch_accepts_round_trips(batch: list[dict[str, Any]]) -> None:
    registry = Registry()
    registry.register(anything, name="anything")
    try:
        spec = build_spec(registry, "anything", batch, {})
    except SerializationError:
        return
    assert same(batch, json.loads(serialize.dumps(list(spec.args))))
    assert same(batch, json.loads(serialize.dumps(spec.args)))  # as the SQL builder does


def test_refusals_are_typed_errors_of_soniq_or_builtins() -> None:
    """SerializationError is a ValueError, so ``except ValueError`` catches both kinds."""
    assert issubclass(SerializationError, ValueError)
    assert all(issubclass(error, (ValueError, TypeError)) for _, error, _ in REFUSED.values())


def test_limits_are_documented() -> None:
    for name in limits.__all__:
        assert name.isupper() and getattr(limits, name) is not None
    assert isinstance(limits.MAX_RUN_AT, dt.datetime) and isinstance(limits.MIN_RUN_AT, dt.datetime)
    # every constant has its own comment in the module's source
    source = Path(limits.__file__).read_text(encoding="utf-8")
    for name in limits.__all__:
        line = next(i for i, text in enumerate(source.splitlines()) if text.startswith(name))
        assert source.splitlines()[line - 1].startswith("#:"), name


@pytest.mark.parametrize(
    ("queues", "problem"),
    [
        (["mail,sms"], "must not contain a comma"),
        (["q" * 201], "more than the 200 allowed"),
        ([""], "non-empty str"),
        (["nul\x00"], "NUL"),
        ([], "queue names"),
    ],
)
def test_a_worker_takes_the_queue_names_enqueue_takes(queues: list[str], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=f"queues: .*{problem}|{problem}"):
        WorkerConfig(queues=queues)


# -- concurrency and rate limits: refused at definition, the argument named ----------------


def account_job(account_id: int, note: str = "") -> None: ...


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"concurrency": 0}, JobDefinitionError, "concurrency must be at least 1"),
        ({"concurrency": -2}, JobDefinitionError, "concurrency must be at least 1"),
        ({"concurrency": 1.5}, JobDefinitionError, "concurrency must be an int"),
        ({"concurrency": True}, JobDefinitionError, "concurrency must be an int"),
        ({"rate_limit": "10/fortnight"}, JobDefinitionError, "rate_limit must be a string"),
        ({"rate_limit": "0/s"}, JobDefinitionError, "at least 1 start"),
        ({"concurrency": 2**31}, JobDefinitionError, "concurrency must be at most 1,000,000"),
        ({"rate_limit": f"{2**31}/s"}, JobDefinitionError, "allows at most 1,000,000 starts"),
        ({"rate_limit": 10}, JobDefinitionError, "rate_limit must be a string"),
        (
            {"concurrency": 1, "concurrency_key": "account"},
            JobDefinitionError,
            "concurrency_key must name one of its parameters (account_id, note)",
        ),
        ({"concurrency_key": "account_id"}, JobDefinitionError, "needs concurrency="),
        ({"rate_key": "account_id"}, JobDefinitionError, "needs rate_limit="),
        (
            {"rate_limit": "1/s", "rate_key": "nope"},
            JobDefinitionError,
            "rate_key must name one of its parameters",
        ),
    ],
)
def test_bad_limits_are_refused_at_definition(
    options: dict[str, Any], error: type[Exception], words: str
) -> None:
    registry = Registry()
    with pytest.raises(error) as caught:
        registry.register(account_job, name="acct", limits=options)
    assert words in str(caught.value)
    assert "'acct'" in str(caught.value)  # the job is named
    assert registry.get("acct") is None  # nothing half-registered


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("10/s", 10, 1.0), ("100/m", 100, 60.0), ("5000/h", 5000, 3600.0), (" 3 / minute", 3, 60.0)],
)
def test_rates_in_every_documented_unit(text: str, count: int, period: float) -> None:
    registry = Registry()
    definition = registry.register(account_job, name="acct", limits={"rate_limit": text})
    assert definition.limits is not None and definition.limits.rate == Rate(count, period)


def test_bad_queue_limits_name_the_argument(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path / 'q.db'}")
    eq.sync.ensure_initialized()
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        eq.sync.set_queue_limits("mail", concurrency=0)
    with pytest.raises(ValueError, match="rate_limit must be a string like"):
        eq.sync.set_queue_limits("mail", rate_limit="5 per second")
    with pytest.raises(TypeError, match="concurrency must be an int"):
        eq.sync.set_queue_limits("mail", concurrency="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be at most"):
        eq.sync.set_queue_limits("mail", concurrency=2**31)
    assert eq.sync.queue_limits() == {}  # nothing stored
    eq.sync.close()
