"""Middleware: code around each run of a job, and around each enqueue.

A middleware is a callable that takes a context and returns a context manager, sync
or async; a generator function decorated with :func:`contextlib.contextmanager` (or an
async one with :func:`contextlib.asynccontextmanager`) is the usual form::

    @eq.middleware
    @contextlib.contextmanager
    def timed(ctx: soniq.RunContext) -> Iterator[None]:
        started = time.perf_counter()
        yield
        log.info("%s %s in %.3fs", ctx.name, ctx.outcome, time.perf_counter() - started)

    @eq.middleware(on="enqueue")
    @contextlib.contextmanager
    def tag(ctx: soniq.EnqueueContext) -> Iterator[None]:
        ctx.headers["tenant"] = current_tenant()
        yield

Theory of operation:

- **Order.** Middleware run in the order they were registered, the first outermost;
  they are exited in reverse.
- **Runs.** A run middleware is entered before the job's body and exited after it,
  with the body's exception (if any) passed to ``__exit__``/``__aexit__``. Before the
  exit, :attr:`RunContext.outcome` says how the run ended. The exit's return value is
  ignored: a middleware cannot swallow a job's failure (the failure is recorded, and
  retried as usual). An exception a middleware raises (entering, or exiting with
  another exception than the one it was given) is the run's failure, as if the body
  raised it; a middleware that fails to enter leaves the body unrun.
- **Where.** An async job's middleware run on the worker's event loop (a sync context
  manager must not block there). A sync job's sync middleware run in the job's own
  thread, around the body, so thread-locals and context variables they set are the
  job's; its async middleware run on the worker's event loop while the job's thread
  waits.
- **Enqueues.** An enqueue middleware is entered before the insert and exited after
  it, with its error if it failed. It may add :attr:`EnqueueContext.headers`: string
  keys and values stored with every job of the call and given to its runs
  (:attr:`RunContext.headers`, ``Job.headers``); that is how a trace context travels
  from a request to the jobs it enqueued. :attr:`EnqueueContext.ids` holds the new ids
  once the insert returned. ``eq.sync``'s enqueues need sync middleware.
- **Cost.** Without middleware, enqueue and run take the paths they always took: one
  ``if`` each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import attrs

from soniq.core import serialize
from soniq.core.jobs import JobNode, JobSpec

if TYPE_CHECKING:
    from soniq.worker.context import JobContext

#: A middleware: called with the context, returns a context manager (sync or async).
Middleware = Callable[[Any], Any]
#: The most characters a job's headers may take as JSON (their keys and values).
MAX_HEADERS_CHARS = 8_000


class EnqueuedJob(NamedTuple):
    """One job an enqueue call is about to insert."""

    name: str
    queue: str
    args: Mapping[str, Any]


@attrs.define(eq=False)
class EnqueueContext:
    """One enqueue call, as enqueue middleware see it."""

    #: ``"enqueue"``, ``"enqueue_many"``, ``"enqueue_group"`` or ``"enqueue_chain"``.
    operation: str
    #: The call's jobs are inserted on the caller's connection (``connection=``): they
    #: exist only if the caller's transaction commits.
    transactional: bool
    _specs: Sequence[JobSpec] = attrs.field(repr=False, alias="specs")
    #: Headers to store with every job of the call (string keys and values, at most
    #: :data:`MAX_HEADERS_CHARS` as JSON); add to it before the insert.
    headers: dict[str, str] = attrs.field(factory=dict)
    #: The ids of the jobs, in order, once the insert returned (None until then).
    ids: list[int] | None = None
    _jobs: tuple[EnqueuedJob, ...] | None = attrs.field(default=None, init=False, repr=False)

    @property
    def jobs(self) -> tuple[EnqueuedJob, ...]:
        """The jobs of the call, in order: name, queue and arguments of each."""
        if self._jobs is None:
            self._jobs = tuple(
                EnqueuedJob(spec.name, spec.queue, args)
                for spec in self._specs
                for args in spec.args
            )
        return self._jobs

    @property
    def name(self) -> str:
        """The name of the call's job (of its first job, for a group or chain)."""
        return self._specs[0].name

    @property
    def queue(self) -> str:
        """The queue of the call's job (of its first job, for a group or chain)."""
        return self._specs[0].queue

    @property
    def counts(self) -> tuple[tuple[str, str, int], ...]:
        """``(queue, name, jobs)`` for each part of the call, in order: what metrics
        count, with no record per job (an ``enqueue_many`` of 10,000 is one part)."""
        return tuple((spec.queue, spec.name, len(spec.args)) for spec in self._specs)


@attrs.define(eq=False)
class RunContext:
    """One run of a job, as run middleware see it."""

    #: The job as the body sees it (``soniq.current_job()``): id, name, queue,
    #: attempt, claims, worker id, cancellation...
    job: JobContext
    #: The job's arguments.
    args: Mapping[str, Any]
    #: The headers the job was enqueued with (empty: none).
    headers: Mapping[str, str]
    #: The body is an ``async def`` (run on the loop), else a function run in a thread.
    is_async: bool
    #: How the run ended, set before the middleware are exited: ``"done"``,
    #: ``"failed"`` (no attempt left, or not retryable), ``"retried"`` (failed, will
    #: run again), ``"snoozed"``, ``"cancelled"``, or ``"released"`` (put back at
    #: shutdown). None while the body runs.
    outcome: str | None = None

    @property
    def id(self) -> int:
        """The job's id."""
        return self.job.id

    @property
    def name(self) -> str:
        """The job's name."""
        return self.job.name

    @property
    def queue(self) -> str:
        """The job's queue."""
        return self.job.queue

    @property
    def attempt(self) -> int:
        """The attempt this run is (1 for the first)."""
        return self.job.attempt


class MiddlewareChain:
    """The middleware of one Soniq (and its sync twin), by what they wrap."""

    def __init__(self) -> None:
        #: Around each run of a job, in registration order (the first outermost).
        self.run: tuple[Middleware, ...] = ()
        #: Around each enqueue call.
        self.enqueue: tuple[Middleware, ...] = ()

    def add(self, func: Middleware, on: Literal["run", "enqueue"]) -> None:
        """Register ``func`` around runs (``on="run"``) or enqueues."""
        if not callable(func):
            raise TypeError(f"middleware must be callable (ctx -> context manager), got {func!r}")
        if on == "run":
            self.run = (*self.run, func)
        elif on == "enqueue":
            self.enqueue = (*self.enqueue, func)
        else:
            raise ValueError(f"middleware(on=...) must be 'run' or 'enqueue', got {on!r}")

    def enqueue_context(
        self, operation: str, specs: Sequence[JobSpec], connection: Any
    ) -> EnqueueContext:
        """The context of an enqueue call of ``specs``."""
        return EnqueueContext(operation, connection is not None, specs=specs)

    async def around_enqueue(
        self,
        ctx: EnqueueContext,
        insert: Callable[[dict[str, str] | None], Awaitable[list[int]]],
    ) -> list[int]:
        """Run ``insert`` (given the headers to store) inside the enqueue middleware."""
        entered: list[tuple[Any, bool]] = []
        try:
            for func in self.enqueue:
                manager = func(ctx)
                entered.append((manager, await enter_async(manager)))
            ctx.ids = await insert(checked_headers(ctx.headers))
        except BaseException as exc:
            error = await exit_all_async(entered, exc)
            if error is exc or error is None:
                raise
            raise error  # noqa: B904 (an exit's own error; its __context__ is exc)
        error = await exit_all_async(entered, None)
        if error is not None:
            raise error
        return ctx.ids

    def around_enqueue_sync(
        self,
        ctx: EnqueueContext,
        insert: Callable[[dict[str, str] | None], list[int]],
    ) -> list[int]:
        """Blocking :meth:`around_enqueue`: its middleware must be sync."""
        entered: list[tuple[Any, bool]] = []
        try:
            for func in self.enqueue:
                manager = func(ctx)
                entered.append((manager, enter_sync(manager, func)))
            ctx.ids = insert(checked_headers(ctx.headers))
        except BaseException as exc:
            error = exit_all_sync(entered, exc)
            if error is exc or error is None:
                raise
            raise error  # noqa: B904 (an exit's own error; its __context__ is exc)
        error = exit_all_sync(entered, None)
        if error is not None:
            raise error
        return ctx.ids


def with_headers(spec: JobSpec, headers: dict[str, str] | None) -> JobSpec:
    """``spec`` carrying ``headers`` (itself when there are none)."""
    return spec if headers is None else attrs.evolve(spec, headers=headers)


def nodes_with_headers(nodes: list[JobNode], headers: dict[str, str] | None) -> list[JobNode]:
    """``nodes`` whose jobs carry ``headers`` (themselves when there are none)."""
    if headers is None:
        return nodes
    return [attrs.evolve(n, spec=attrs.evolve(n.spec, headers=headers)) for n in nodes]


def checked_headers(headers: object) -> dict[str, str] | None:
    """The headers to store, or None when empty; TypeError/ValueError naming the
    problem for what cannot be stored (not str to str, a NUL, too long)."""
    if not headers:
        return None
    if not isinstance(headers, Mapping):
        raise TypeError(f"EnqueueContext.headers must be a dict of str to str, got {headers!r}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"EnqueueContext.headers holds str keys and str values, got {key!r}: {value!r}"
            )
        for text in (key, value):
            if "\x00" in text or serialize.find_surrogate(text) is not None:
                raise ValueError(
                    f"EnqueueContext.headers: {key!r} holds a NUL character or a lone "
                    "surrogate, which cannot be stored"
                )
    found = dict(headers)
    size = len(serialize.dumps(found))
    if size > MAX_HEADERS_CHARS:
        raise ValueError(
            f"EnqueueContext.headers take {size:,} characters as JSON, more than "
            f"{MAX_HEADERS_CHARS:,}: headers carry context (ids, a trace), not data"
        )
    return found


# -- entering and exiting ----------------------------------------------------------


async def enter_async(manager: Any) -> bool:
    """Enter ``manager`` on the loop; True when it is an async context manager."""
    if hasattr(manager, "__aenter__"):
        await manager.__aenter__()
        return True
    _sync_manager(manager)
    manager.__enter__()
    return False


def enter_in_thread(
    manager: Any, loop: asyncio.AbstractEventLoop | None, context: contextvars.Context
) -> bool:
    """Enter ``manager`` from a sync job's thread: a sync one here, an async one on
    the worker's ``loop`` (in the run's ``context``) while the thread waits; True when
    it is async."""
    if hasattr(manager, "__enter__"):
        manager.__enter__()
        return False
    if not hasattr(manager, "__aenter__"):
        _sync_manager(manager)  # raises, naming what was returned
    if loop is None:
        raise TypeError(
            "an async middleware cannot wrap a sync job run with no event loop "
            "(drain(eq.sync)): use `await drain(eq)`, or make the middleware sync"
        )
    on_loop(loop, manager.__aenter__(), context)
    return True


def enter_sync(manager: Any, func: Middleware) -> bool:
    """Enter a sync ``manager`` (an async one: TypeError naming ``func``)."""
    if not hasattr(manager, "__aenter__"):
        _sync_manager(manager)  # raises unless it is one, naming what was returned
    if not hasattr(manager, "__enter__"):
        raise TypeError(
            f"middleware {getattr(func, '__qualname__', func)!r} returned an async context "
            "manager; eq.sync's enqueues need a sync one (contextlib.contextmanager)"
        )
    manager.__enter__()
    return False


def _sync_manager(manager: Any) -> None:
    if not hasattr(manager, "__enter__") or not hasattr(manager, "__exit__"):
        raise TypeError(
            "a middleware must return a context manager (sync or async), got "
            f"{type(manager).__name__}; decorate it with contextlib.contextmanager"
        )


async def exit_all_async(
    entered: list[tuple[Any, bool]], error: BaseException | None
) -> BaseException | None:
    """Exit ``entered`` (manager, is async) in reverse with ``error``; the error that
    remains (an exit that raises replaces it; returning True swallows nothing)."""
    for manager, is_async in reversed(entered):
        try:
            if is_async:
                await manager.__aexit__(*_exc_info(error))
            else:
                manager.__exit__(*_exc_info(error))
        except BaseException as raised:
            error = raised
    return error


def exit_all_sync(
    entered: list[tuple[Any, bool]],
    error: BaseException | None,
    loop: asyncio.AbstractEventLoop | None = None,
    context: contextvars.Context | None = None,
) -> BaseException | None:
    """:func:`exit_all_async` on this thread; async managers exit on ``loop``, in the
    ``context`` they were entered in."""
    for manager, is_async in reversed(entered):
        try:
            if is_async:
                assert loop is not None
                on_loop(loop, manager.__aexit__(*_exc_info(error)), context)
            else:
                manager.__exit__(*_exc_info(error))
        except BaseException as raised:
            error = raised
    return error


def on_loop(
    loop: asyncio.AbstractEventLoop,
    awaitable: Awaitable[Any],
    context: contextvars.Context | None = None,
) -> Any:
    """Run ``awaitable`` on ``loop`` (another thread's) and wait for its result; in
    ``context`` when given (Python 3.11+), so that an async middleware's enter and
    exit share one context: a variable its enter sets, its exit can reset. (3.10's
    tasks take a copy of the context each: there the exit sees the enter's variables
    as they were, and cannot reset them.)"""

    async def run() -> Any:
        return await awaitable

    if context is None or sys.version_info < (3, 11):
        return asyncio.run_coroutine_threadsafe(run(), loop).result()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def start() -> None:
        task = loop.create_task(run(), context=context)  # type: ignore[call-arg,unused-ignore]
        task.add_done_callback(functools.partial(_settle, done))

    loop.call_soon_threadsafe(start)
    return done.result()


def _settle(done: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        done.cancel()
        return
    error = task.exception()
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())


def _exc_info(error: BaseException | None) -> tuple[Any, Any, Any]:
    if error is None:
        return None, None, None
    return type(error), error, error.__traceback__
