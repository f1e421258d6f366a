"""The values Soniq passes around: what to insert (:class:`JobSpec`), a stored job
(:class:`Job`), and a registered job function (:class:`JobDefinition`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from soniq.core.flow import JobLimits
from soniq.core.retry import DEFAULT_BACKOFF, Backoff
from soniq.core.states import JobStatus

#: Keyword names that ``enqueue`` reads as options; a job may not use them as parameters.
RESERVED_OPTIONS: frozenset[str] = frozenset(
    {
        "connection",
        "queue",
        "priority",
        "run_at",
        "delay",
        "max_retries",
        "dedupe_key",
        "dedupe",
        "timeout",
        "depends_on",
        "on_parent_failure",
    }
)
DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


@attrs.frozen
class JobSpec:
    """What one enqueue call inserts: the options shared by its jobs, and each job's
    arguments (one mapping for ``enqueue``, several for ``enqueue_many``).

    ``run_at`` is an explicit aware time; when it is None the job is due ``delay``
    seconds after the database's statement time (so client clock skew cannot delay it).
    """

    name: str
    queue: str
    args: tuple[Mapping[str, Any], ...]
    priority: int = 0
    run_at: dt.datetime | None = None
    delay: float = 0.0
    max_retries: int = DEFAULT_MAX_RETRIES
    dedupe_key: str | None = None
    timeout: float | None = None
    #: ``dedupe="replace"``: a job holding ``dedupe_key`` that has not started takes
    #: this call's arguments and options (one that runs gives the key up instead).
    replace: bool = False
    #: The existing jobs these wait for (``depends_on``).
    parents: tuple[int, ...] = ()
    #: ``on_parent_failure="run"``: a parent that fails or is cancelled counts as
    #: ended instead of cancelling these jobs.
    run_if_parent_fails: bool = False
    #: Headers carried to every run of these jobs (string keys and values, set by
    #: enqueue middleware, e.g. a trace context); None: none (the column stays NULL).
    headers: Mapping[str, str] | None = None

    @property
    def is_plain(self) -> bool:
        """Inserted by the plain enqueue statements, which group commit may merge: no
        parents, no replacing."""
        return not self.parents and not self.replace

    def due_at(self, now: dt.datetime) -> dt.datetime:
        """When the jobs become ready, for backends that keep time themselves."""
        if self.run_at is not None:
            return self.run_at
        return now + dt.timedelta(seconds=self.delay)


@attrs.frozen
class JobNode:
    """One job of an insert of several that wait for one another (``enqueue_group``,
    ``enqueue_chain``): ``spec`` holds one job, ``after`` the positions of the earlier
    nodes of the same insert that it waits for."""

    spec: JobSpec
    after: tuple[int, ...] = ()


@attrs.frozen
class Job:
    """A job as stored. Returned by ``get_job``."""

    id: int
    name: str
    queue: str
    args: Mapping[str, Any]
    status: JobStatus
    priority: int
    run_at: dt.datetime
    attempts: int
    max_retries: int
    timeout: float | None
    dedupe_key: str | None
    worker_id: str | None
    last_error: str | None
    result: Any
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    #: How many times a worker started it. Above ``attempts`` when a run was put back
    #: without counting its attempt (shutdown, or a lost completion) and run again:
    #: the trace of a run that may have happened twice.
    claims: int = 0
    #: How many times the job snoozed (raised :class:`soniq.Snooze`).
    snoozes: int = 0
    #: The traceback of the last error (a failure, a retry), as the worker formatted it.
    traceback: str | None = None
    #: The jobs it waits (or waited) for: ``depends_on``, or its group's or chain's.
    parents: tuple[int, ...] = ()
    #: How many of :attr:`parents` have not ended yet (0 unless ``waiting``).
    waiting_for: int = 0
    #: The last progress the job reported (``current_job().set_progress``), 0 to 1.
    progress: float | None = None
    #: The message that came with :attr:`progress`.
    progress_message: str | None = None
    #: The headers enqueue middleware gave it (see docs/metrics.md); empty: none.
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class WorkerIdentity:
    """Who a worker is, as its row in the workers table says: its id, where it runs,
    the queues it takes (None: all) and its number of slots."""

    id: str
    hostname: str
    pid: int
    queues: tuple[str, ...] | None
    concurrency: int


# Not frozen: a frozen attrs class sets each field through object.__setattr__, and
# one of these is made per job a worker runs (with Outcome, 8% of a drain of quick
# jobs). Nothing changes one after it is made.
@attrs.define
class Claimed:
    """A job a worker has just claimed: what it needs to run it."""

    id: int
    name: str
    queue: str
    args: dict[str, Any]
    attempts: int
    max_retries: int
    timeout: float | None
    claims: int = 1
    #: Claimed under limits (its own or its queue's): when its end is written, the
    #: worker claims again at once, as the limit then has room.
    limited: bool = False
    #: The results of its parents that are done, by id (None: it has no parents).
    parent_results: Mapping[int, Any] | None = None
    #: The headers it was enqueued with (None: none; see :attr:`JobSpec.headers`).
    headers: Mapping[str, str] | None = None


@attrs.frozen(eq=False)
class JobDefinition:
    """A function registered with ``@eq.job``, with its defaults and the facts about
    its signature that enqueue-time validation needs."""

    name: str
    func: Callable[..., Any]
    queue: str
    max_retries: int
    priority: int
    timeout: float | None
    is_async: bool
    required: frozenset[str]
    accepted: frozenset[str]
    takes_any_keyword: bool
    backoff: Backoff = DEFAULT_BACKOFF
    limits: JobLimits | None = None
    # Argument-name sets already checked, so a batch is validated once per shape.
    _checked: set[frozenset[str]] = attrs.field(factory=set, init=False, repr=False)

    def check_names(self, names: frozenset[str]) -> str | None:
        """None if a call with exactly these keyword names is valid, else the problem."""
        if names in self._checked:
            return None
        problems = []
        missing = self.required - names
        if missing:
            problems.append(f"missing required argument(s) {', '.join(sorted(missing))}")
        unexpected = frozenset() if self.takes_any_keyword else names - self.accepted
        if unexpected:
            problems.append(
                f"unexpected argument(s) {', '.join(sorted(unexpected))}; "
                f"it accepts {', '.join(sorted(self.accepted)) or 'no arguments'}"
            )
        if problems:
            return "; ".join(problems)
        self._checked.add(names)
        return None
