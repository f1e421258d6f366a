"""Turning an enqueue call into a :class:`JobSpec`: resolve the job, split options from
arguments, validate both. Every error is raised here, before any SQL exists, so a bad
call can never reach (and abort) the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from soniq.core import limits, serialize
from soniq.core.errors import JobArgumentsError, JobDefinitionError, UnknownJobError
from soniq.core.flow import ClaimLimits, job_limits
from soniq.core.jobs import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    PRIORITY_RANGE,
    RESERVED_OPTIONS,
    JobDefinition,
    JobNode,
    JobSpec,
)
from soniq.core.retry import DEFAULT_BACKOFF, Backoff
from soniq.core.schedules import Schedule

JobRef = Callable[..., Any] | str


class Registry:
    """The job functions known to one Soniq instance, by name and by function, and
    the schedules of its periodic jobs."""

    def __init__(self) -> None:
        self._by_name: dict[str, JobDefinition] = {}
        self._by_func: dict[Callable[..., Any], JobDefinition] = {}
        #: The periodic jobs' schedules, in definition order (see ``soniq.core.schedules``).
        self.schedules: list[Schedule] = []

    def register(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        schedule: Callable[[JobDefinition], Schedule] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> JobDefinition:
        """Register ``func`` as a job and return its definition; with ``schedule``, a
        periodic job, whose schedule (made from the definition) is checked before
        anything is registered: its arguments now, not at the first tick, and the
        same schedule twice is refused."""
        definition = define_job(
            func,
            name=name,
            queue=queue,
            max_retries=max_retries,
            priority=priority,
            timeout=timeout,
            backoff=backoff,
            limits=limits,
        )
        existing = self._by_name.get(definition.name)
        if existing is not None and existing.func is not func:
            raise JobDefinitionError(
                f"a job named {definition.name!r} is already registered "
                f"({existing.func!r}); give one of them another name with @eq.job(name=...)"
            )
        if schedule is not None:
            periodic = schedule(definition)
            _check_schedule(definition, periodic, self.schedules)
            self.schedules.append(periodic)
        self._by_name[definition.name] = definition
        self._by_func[func] = definition
        return definition

    def get(self, name: str) -> JobDefinition | None:
        """The definition registered under ``name``, if any."""
        return self._by_name.get(name)

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        """The registered job names, sorted: what a worker (or a drain) claims."""
        return sorted(self._by_name)

    def claim_limits(self) -> ClaimLimits:
        """The limits of the registered jobs, as a worker's claims obey them."""
        return ClaimLimits.of((d.name, d.limits) for d in self._by_name.values())

    def resolve(self, job: JobRef) -> tuple[str, JobDefinition | None]:
        """The name of ``job`` and its definition (None for an unregistered name)."""
        if isinstance(job, str):
            definition = self._by_name.get(job)
            if definition is None:  # a registered name was checked when it was defined
                _check_name(job)
            return job, definition
        definition = self._by_func.get(job)
        if definition is None:
            if not callable(job):
                raise TypeError(
                    f"job must be a function decorated with @eq.job or a job name (str), "
                    f"got {type(job).__name__}"
                )
            raise UnknownJobError(
                f"{getattr(job, '__qualname__', job)!r} is not registered with this Soniq; "
                "decorate it with @eq.job() on the same Soniq instance, or enqueue it by "
                "its name as a string"
            )
        return definition.name, definition


def _check_schedule(
    definition: JobDefinition, schedule: Schedule, existing: Iterable[Schedule]
) -> None:
    problem = definition.check_names(frozenset(schedule.kwargs))
    if problem is not None:
        raise JobArgumentsError(f"periodic job {definition.name!r}: kwargs: {problem}")
    serialize.check_payload([dict(schedule.kwargs)], job=definition.name)
    if any(s.key == schedule.key for s in existing):
        raise JobDefinitionError(
            f"periodic job {definition.name!r} has this schedule already: {schedule.key}"
        )


def main_module_name() -> str | None:
    """The name under which a worker imports the code running as ``__main__``: the
    module's own name under ``python -m pkg.app``, the script's file name for
    ``python app.py`` (``soniq worker app:eq`` imports it as ``app``), None where there
    is no such name (a REPL, ``python -c``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    stem = os.path.basename(path)[: -len(".py")]
    return stem if stem.isidentifier() else None


def define_job(
    func: Callable[..., Any],
    *,
    name: str | None,
    queue: str,
    max_retries: int,
    priority: int,
    timeout: float | None,
    backoff: Backoff = DEFAULT_BACKOFF,
    limits: Mapping[str, Any] | None = None,
) -> JobDefinition:
    """Check that ``func`` can be a job and describe it; ``limits`` are the keyword
    arguments of :func:`soniq.core.flow.job_limits`."""
    if not isinstance(backoff, Backoff):
        raise JobDefinitionError(f"backoff must be a soniq.Backoff, got {backoff!r}")
    if not callable(func):
        raise JobDefinitionError(f"@eq.job decorates a function, got {type(func).__name__}")
    if name is None:
        module = getattr(func, "__module__", None)
        qualname = func.__qualname__
        if module == "__main__":
            module = main_module_name()
            if module is None or "<locals>" in qualname:
                where = "inside a function" if module else "in __main__ with no importable name"
                raise JobDefinitionError(
                    f"job {qualname!r} is defined {where}, so a worker could not find "
                    "it under the same name; give it one with @eq.job(name='...')"
                )
        name = f"{module}.{qualname}"
    _check_name(name)
    check_queue(queue)
    max_retries = _check_max_retries(max_retries)
    priority = _check_priority(priority)
    timeout = _check_timeout(timeout)
    required, accepted, any_keyword = _describe_signature(func, name)
    limits_of_job = job_limits(name, accepted, **(limits or {}))
    return JobDefinition(
        name=name,
        func=func,
        queue=queue,
        max_retries=max_retries,
        priority=priority,
        timeout=timeout,
        is_async=inspect.iscoroutinefunction(func),
        required=required,
        accepted=accepted,
        takes_any_keyword=any_keyword,
        backoff=backoff,
        limits=limits_of_job,
    )


def _describe_signature(
    func: Callable[..., Any], name: str
) -> tuple[frozenset[str], frozenset[str], bool]:
    required: set[str] = set()
    accepted: set[str] = set()
    any_keyword = False
    for param in inspect.signature(func).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            any_keyword = True
            continue
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
            what = "positional-only" if param.kind is param.POSITIONAL_ONLY else "*args"
            raise JobDefinitionError(
                f"job {name!r}: parameter {param.name!r} is {what}; jobs are called "
                "with keyword arguments, so make it a normal parameter"
            )
        if param.name in RESERVED_OPTIONS:
            raise JobDefinitionError(
                f"job {name!r}: parameter {param.name!r} collides with the enqueue option "
                f"of the same name (reserved: {', '.join(sorted(RESERVED_OPTIONS))}); "
                "rename the parameter"
            )
        accepted.add(param.name)
        if param.default is param.empty:
            required.add(param.name)
    return frozenset(required), frozenset(accepted), any_keyword


def split_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the reserved options from ``kwargs`` (in place) and return them."""
    if not kwargs.keys() & RESERVED_OPTIONS:
        return {}
    return {key: kwargs.pop(key) for key in RESERVED_OPTIONS & kwargs.keys()}


def build_spec(
    registry: Registry,
    job: JobRef,
    batch: list[dict[str, Any]],
    options: Mapping[str, Any],
) -> JobSpec:
    """Validate a call and return what to insert. ``batch`` holds each job's arguments;
    ``options`` the reserved keywords (without ``connection``)."""
    name, definition = registry.resolve(job)
    if definition is not None:
        _check_batch_names(definition, batch)
    serialize.check_payload(batch, job=name)
    return _spec_with_options(name, definition, tuple(batch), options)


def _check_batch_names(definition: JobDefinition, batch: Iterable[Mapping[str, Any]]) -> None:
    for index, args in enumerate(batch):
        problem = definition.check_names(frozenset(args))
        if problem is not None:
            where = f" (in the job at index {index})" if index else ""
            raise JobArgumentsError(f"job {definition.name!r}: {problem}{where}")


def _spec_with_options(
    name: str,
    definition: JobDefinition | None,
    args: tuple[Mapping[str, Any], ...],
    options: Mapping[str, Any],
) -> JobSpec:
    queue = definition.queue if definition else DEFAULT_QUEUE
    priority = definition.priority if definition else 0
    max_retries = definition.max_retries if definition else DEFAULT_MAX_RETRIES
    timeout = definition.timeout if definition else None
    if not options:
        return JobSpec(name, queue, args, priority, None, 0.0, max_retries, None, timeout)
    unknown = options.keys() - RESERVED_OPTIONS
    if unknown:  # only reachable through a direct call with a wrong mapping
        raise TypeError(f"unknown enqueue option(s): {', '.join(sorted(unknown))}")
    run_at, delay = _check_when(options.get("run_at"), options.get("delay"))
    dedupe_key = options.get("dedupe_key")
    if dedupe_key is not None:
        _check_text(
            "dedupe_key",
            dedupe_key,
            limits.MAX_DEDUPE_KEY_LENGTH,
            "MAX_DEDUPE_KEY_LENGTH",
            "hash a longer key, e.g. hashlib.sha256(key.encode()).hexdigest()",
        )
        if len(args) > 1:
            raise ValueError(
                "dedupe_key: every job of one enqueue_many call would get the same key, "
                "and a key may appear once per batch; enqueue keyed jobs one by one"
            )
    if "queue" in options:
        queue = options["queue"]
        check_queue(queue)
    if "priority" in options:
        priority = _check_priority(options["priority"])
    if "max_retries" in options:
        max_retries = _check_max_retries(options["max_retries"])
    if "timeout" in options:
        timeout = _check_timeout(options["timeout"])
    replace = _check_dedupe(options.get("dedupe", "keep"), dedupe_key)
    parents = check_parents(options.get("depends_on"))
    run_anyway = _check_on_parent_failure(options.get("on_parent_failure"), parents)
    if parents and dedupe_key is not None:
        raise ValueError(
            "dedupe_key cannot be combined with depends_on: a job that waits for others "
            "is not deduplicated; enqueue it without one of them"
        )
    return JobSpec(
        name,
        queue,
        args,
        priority,
        run_at,
        delay,
        max_retries,
        dedupe_key,
        timeout,
        replace=replace,
        parents=parents,
        run_if_parent_fails=run_anyway,
    )


#: Most parents one job may have (``depends_on``), and most jobs one group or chain.
MAX_PARENTS = 100_000


def check_parents(depends_on: object) -> tuple[int, ...]:
    """The ids of ``depends_on`` (a job id, or a list of them), each once, in order."""
    if depends_on is None:
        return ()
    ids = [depends_on] if isinstance(depends_on, int) else depends_on
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise TypeError(f"depends_on must be a job id or a list of job ids, got {depends_on!r}")
    parents: dict[int, None] = {}
    for job_id in ids:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            raise TypeError(
                f"depends_on must hold job ids (ints from enqueue), got {job_id!r} in it"
            )
        parents[job_id] = None
    if len(parents) > MAX_PARENTS:
        raise ValueError(f"depends_on names {len(parents):,} jobs, more than {MAX_PARENTS:,}")
    return tuple(parents)


def _check_on_parent_failure(value: object, parents: tuple[int, ...]) -> bool:
    """True for ``"run"`` (run anyway), False for ``"cancel"`` (the default)."""
    if value is None:
        return False
    if value not in ("cancel", "run"):
        raise ValueError(f"on_parent_failure must be 'cancel' or 'run', got {value!r}")
    if not parents:
        raise ValueError("on_parent_failure applies to a job with depends_on; give both")
    return value == "run"


def _check_dedupe(value: object, dedupe_key: object) -> bool:
    """True for ``dedupe="replace"``, False for ``"keep"`` (the default)."""
    if value not in ("keep", "replace"):
        raise ValueError(f"dedupe must be 'keep' or 'replace', got {value!r}")
    if value == "replace" and dedupe_key is None:
        raise ValueError('dedupe="replace" needs a dedupe_key: the key names the job to replace')
    return value == "replace"


def build_graph(
    registry: Registry,
    members: Iterable[tuple[JobRef, Mapping[str, Any]]],
    *,
    chained: bool,
    then: tuple[JobRef, Mapping[str, Any]] | None = None,
    caller: str,
) -> list[JobNode]:
    """The jobs of a group (``then`` waits for all members) or of a chain
    (``chained``: each waits for the one before). A member is ``(job, mapping)``: the
    mapping holds its arguments, and may hold enqueue options too (``queue``,
    ``priority``, ``delay``, ...), not ``depends_on``, ``dedupe_key`` nor
    ``connection``. ``caller`` names the method in messages."""
    if isinstance(members, (str, bytes, Mapping)) or not isinstance(members, Iterable):
        raise TypeError(f"{caller} takes a list of (job, arguments) pairs, got {members!r}")
    nodes: list[JobNode] = []
    for index, member in enumerate(members):
        spec = _member_spec(registry, member, f"{caller}: the job at index {index}")
        nodes.append(JobNode(spec, (index - 1,) if chained and index else ()))
    if not nodes:
        raise ValueError(f"{caller}: no job given")
    if then is not None:
        spec = _member_spec(registry, then, f"{caller}: then")
        nodes.append(JobNode(spec, tuple(range(len(nodes)))))
    if len(nodes) > MAX_PARENTS:
        raise ValueError(f"{caller}: {len(nodes):,} jobs, more than {MAX_PARENTS:,} in one call")
    return nodes


def _member_spec(registry: Registry, member: object, where: str) -> JobSpec:
    if not isinstance(member, tuple) or len(member) != 2 or not isinstance(member[1], Mapping):
        raise TypeError(
            f"{where} is {member!r}; expected a (job, arguments) pair, e.g. (resize, {{'path': p}})"
        )
    job, mapping = member
    args = dict(mapping)
    options = split_options(args)
    refused = options.keys() & {"connection", "depends_on", "on_parent_failure", "dedupe_key"}
    if refused:
        raise ValueError(f"{where}: {', '.join(sorted(refused))} cannot be given to one job here")
    return build_spec(registry, job, [args], options)


def _check_name(name: object) -> None:
    _check_text(
        "job name",
        name,
        limits.MAX_JOB_NAME_LENGTH,
        "MAX_JOB_NAME_LENGTH",
        "give the job a shorter one with @eq.job(name=...)",
    )


def check_queue(queue: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem if ``queue`` cannot be a
    queue's name (empty, too long, a NUL, a surrogate, a comma)."""
    _check_text("queue", queue, limits.MAX_QUEUE_LENGTH, "MAX_QUEUE_LENGTH", "use a shorter name")
    assert isinstance(queue, str)
    if "," in queue:
        # The NOTIFY of an enqueue carries queue names joined by commas, and a worker
        # reads `queues="a,b"` as two queues: a comma would make the name ambiguous.
        raise ValueError(
            f"queue must not contain a comma (queue names are joined by commas in "
            f"wake-ups and in the worker's queues option), got {queue!r}"
        )


def _check_text(option: str, value: object, maximum: int, constant: str, fix: str) -> None:
    """``value`` is a str PostgreSQL stores as given and that is at most ``maximum``
    characters (``soniq.core.limits.<constant>``); ``fix`` says what to do instead."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{option} must be a non-empty str, got {value!r}")
    if len(value) > maximum:
        raise ValueError(
            f"{option} is {len(value):,} characters, more than the {maximum} allowed "
            f"(soniq.core.limits.{constant}): {fix}; it starts {value[:40]!r}"
        )
    if "\x00" in value:
        raise ValueError(f"{option} must not contain a NUL character (\\u0000)")
    found = serialize.find_surrogate(value)
    if found is not None:
        raise ValueError(
            f"{option} contains the UTF-16 surrogate {found.group()!r} at index "
            f"{found.start()}, which is not a character and cannot be stored; decode "
            "the text properly"
        )


def _check_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"priority must be an int (higher runs first), got {value!r}")
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise ValueError(f"priority must be between {low} and {high}, got {value}")
    return value


def _check_max_retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_retries must be an int >= 0 (N allows N+1 runs), got {value!r}")
    if value > PRIORITY_RANGE[1]:
        raise ValueError(f"max_retries must be at most {PRIORITY_RANGE[1]}, got {value}")
    return value


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be seconds (a number or timedelta) or None, got {value!r}")
    seconds = _seconds(value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {_short(value)}")
    if seconds > limits.MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"timeout must be at most {limits.MAX_TIMEOUT_SECONDS:,.0f} seconds (100 years, "
            f"soniq.core.limits.MAX_TIMEOUT_SECONDS), got {_short(value)}; for no timeout pass "
            "None"
        )
    return seconds


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a huge int"
    return text if len(text) <= 60 else f"{text[:57]}..."


def _seconds(value: Any) -> float:
    """``float(value)``, with an integer too large for a float giving an infinity of
    its sign (which the callers refuse by name) instead of an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _check_when(run_at: object, delay: object) -> tuple[dt.datetime | None, float]:
    if run_at is not None and delay is not None:
        raise TypeError("pass run_at or delay, not both")
    if run_at is not None:
        if not isinstance(run_at, dt.datetime):
            raise TypeError(f"run_at must be a datetime, got {type(run_at).__name__}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ValueError(
                "run_at must be timezone-aware (a naive datetime is ambiguous); pass e.g. "
                "datetime.now(timezone.utc) + timedelta(minutes=5), or use delay="
            )
        if not limits.MIN_RUN_AT <= run_at <= limits.MAX_RUN_AT:
            raise ValueError(
                f"run_at must be between {limits.MIN_RUN_AT.isoformat()} and "
                f"{limits.MAX_RUN_AT.isoformat()} (soniq.core.limits.MIN_RUN_AT, "
                f"MAX_RUN_AT), so every backend and driver can store and read it back; "
                f"got {run_at.isoformat()}"
            )
        # In UTC: the same instant, in a form every backend parses (an offset with
        # microseconds, which Python allows, is not valid PostgreSQL input).
        return run_at.astimezone(dt.timezone.utc), 0.0
    if delay is None:
        return None, 0.0
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        seconds = _seconds(delay)
    else:
        raise TypeError(f"delay must be seconds (a number) or a timedelta, got {delay!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"delay must be >= 0 seconds, got {_short(delay)}; use run_at for a time")
    if seconds > limits.MAX_DELAY_SECONDS:
        raise ValueError(
            f"delay must be at most {limits.MAX_DELAY_SECONDS:,.0f} seconds (100 years, "
            f"soniq.core.limits.MAX_DELAY_SECONDS), got {_short(delay)}; for a fixed time use "
            "run_at"
        )
    return None, seconds
