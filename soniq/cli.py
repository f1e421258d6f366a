"""The ``soniq`` command.

``soniq worker module:eq [--queues a,b] [--concurrency N] [--burst]`` runs a worker
for the Soniq instance ``eq`` of ``module``. SIGTERM or SIGINT stops it gracefully
(running jobs get ``--shutdown-timeout`` seconds, then are put back) and it exits 0;
a second signal exits at once with status 1. When the database is unavailable at
start, the worker retries with back-off for ``--wait-for-database`` seconds (default
60; 0 fails at once), logging a WARNING that names host, port and database per try,
then exits 1 with a one-line message.

``soniq migrate --database-url URL [--schema S]`` applies pending migrations;
``soniq migrate --sql [--schema S]`` prints the DDL instead, for projects that migrate
with Alembic, Django or plain psql.

``soniq queues --database-url URL [--schema S] [--json]`` lists the queues that are
paused or have stored limits (a table: queue, paused, concurrency, rate; with
``--json``, ``{"paused": [...], "limits": {queue: {"concurrency": N, "rate_limit":
"100/m"}}}``). ``soniq queues pause|resume QUEUE...`` pauses or resumes queues for
every worker; ``soniq queues limit QUEUE... [--concurrency N] [--rate-limit 100/m]``
sets both limits of the queues, as ``eq.set_queue_limits`` does (an option left out
removes that limit; with neither, the queue has no limit), and prints them. A bad
value is one line on stderr and exit 1; a usage error exits 2.

``soniq jobs [--status S] [--queue Q] [--name N] [--limit N] [--before-id ID]
[--json]`` lists jobs, newest first (the next page: ``--before-id`` the last id
shown); ``soniq retry ID...`` or ``soniq retry --failed [--queue Q] [--name N]`` puts
failed (or cancelled) jobs back in line; ``soniq cancel ID...`` cancels jobs (a
running one is asked to stop). Both exit 1 when a job named was left as it was.
``soniq purge --older-than 7d [--status done] [--yes]`` deletes finished jobs that
ended before then (asking first on a terminal; elsewhere ``--yes`` is required).
``soniq workers [--json]`` lists the live workers and the jobs each runs.

``soniq check module:eq [--json]`` compares the jobs waiting to run in the database of
``eq`` with the jobs of the code at hand, before it is deployed: it names every kind
of job the code would fail (an unknown name, a missing or unexpected argument) and
exits 1; 0 when all fit.

``soniq job ID --database-url URL [--json] [--wait SECONDS]`` shows one job: its
status, arguments, attempts, result, last error and traceback, progress, the jobs it
waits for, and its times (exit 1 when there is no such job). With ``--wait`` it first
waits up to that long for the job to end, as ``eq.wait_for`` does, and exits 0 when
the job is done, 1 when it failed or was cancelled, 124 when it has not ended in time.

``soniq dashboard module:eq [--host 127.0.0.1] [--port 8080] [--actions]
[--basic-auth USER:PASSWORD]`` (or ``--database-url URL``) serves the web dashboard
(``pip install 'soniq[dashboard]'``; see docs/dashboard.md): read-only unless
``--actions``; it warns when it listens beyond this machine without basic auth.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from soniq.core.errors import SoniqError
from soniq.core.flow import QueueLimits, queue_limits
from soniq.core.sql.migrate import LATEST_VERSION, MigrationPlan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soniq", description="Soniq job queue")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="create or upgrade Soniq's tables")
    _database_options(migrate)
    migrate.add_argument("--sql", action="store_true", help="print the DDL instead of applying it")
    migrate.add_argument(
        "--from",
        dest="from_version",
        type=int,
        default=None,
        metavar="N",
        help=f"with --sql: only what upgrades a schema at version N (0 to {LATEST_VERSION}), "
        "without BEGIN/COMMIT, to run inside an Alembic or Django migration",
    )
    queues = commands.add_parser(
        "queues",
        help="list paused and limited queues, pause or resume queues, or set their limits",
    )
    queues.add_argument(
        "action", nargs="?", choices=["pause", "resume", "limit"], help="what to do"
    )
    queues.add_argument(
        "names", nargs="*", metavar="QUEUE", help="the queues to pause, resume or limit"
    )
    _database_options(queues)
    queues.add_argument("--json", action="store_true", help="print JSON, for scripts")
    queues.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="with limit: at most N of the queue's jobs running at once (default: no limit)",
    )
    queues.add_argument(
        "--rate-limit",
        default=None,
        metavar="RATE",
        help="with limit: at most this many starts per window, e.g. 10/s, 100/m, 5000/h "
        "(default: no limit)",
    )
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    _database_options(jobs)
    jobs.add_argument("--status", default=None, help="only jobs of this status")
    jobs.add_argument("--queue", default=None, help="only jobs of this queue")
    jobs.add_argument("--name", default=None, help="only jobs of this name")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument(
        "--before-id", type=int, default=None, metavar="ID", help="the next page: below this id"
    )
    jobs.add_argument("--json", action="store_true", help="print JSON, for scripts")
    retry = commands.add_parser("retry", help="put failed or cancelled jobs back in line")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="the jobs to retry")
    _database_options(retry)
    retry.add_argument("--failed", action="store_true", help="every failed job (of --queue)")
    retry.add_argument("--queue", default=None, help="with --failed: only this queue")
    retry.add_argument("--name", default=None, help="with --failed: only jobs of this name")
    retry.add_argument("--json", action="store_true", help="print JSON, for scripts")
    cancel = commands.add_parser("cancel", help="cancel jobs (ask running ones to stop)")
    cancel.add_argument("ids", nargs="+", type=int, metavar="ID", help="the jobs to cancel")
    _database_options(cancel)
    cancel.add_argument("--json", action="store_true", help="print JSON, for scripts")
    purge = commands.add_parser("purge", help="delete finished jobs older than a duration")
    _database_options(purge)
    purge.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="jobs that ended more than this long ago: 90s, 30m, 12h, 7d (or seconds)",
    )
    purge.add_argument(
        "--status",
        action="append",
        choices=["done", "failed", "cancelled"],
        help="only jobs that ended so (repeatable; default: all three)",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.add_argument("--json", action="store_true", help="print JSON, for scripts")
    stats = commands.add_parser(
        "stats", help="jobs ended per minute (done, failed, cancelled) and per second"
    )
    _database_options(stats)
    stats.add_argument(
        "--minutes",
        type=_window_minutes,
        default=15,
        help="the window, in minutes up to now, 1 to 1440 (default 15)",
    )
    stats.add_argument("--queue", default=None, help="only jobs of this queue")
    stats.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=_positive_seconds,
        metavar="SECONDS",
        help="print again every SECONDS (default 2) until interrupted (Ctrl-C)",
    )
    stats.add_argument(
        "--json", action="store_true", help="print JSON, for scripts (with --watch: a line each)"
    )
    workers = commands.add_parser("workers", help="list the live workers and their jobs")
    _database_options(workers)
    workers.add_argument("--json", action="store_true", help="print JSON, for scripts")
    check = commands.add_parser(
        "check", help="check that the code's jobs can run every job waiting in the database"
    )
    check.add_argument("app", help="module:attribute of your Soniq instance, e.g. myapp.jobs:eq")
    check.add_argument("--json", action="store_true", help="print JSON, for scripts")
    job = commands.add_parser("job", help="show one job (and, with --wait, wait for its end)")
    job.add_argument("id", type=int, help="the job's id")
    _database_options(job)
    job.add_argument("--json", action="store_true", help="print JSON, for scripts")
    job.add_argument(
        "--wait",
        type=_non_negative_seconds,
        default=None,
        metavar="SECONDS",
        help="wait up to this long for the job to end first; exit 0 done, 1 failed or "
        "cancelled, 124 not ended in time",
    )
    dashboard = commands.add_parser(
        "dashboard", help="serve the web dashboard (pip install 'soniq[dashboard]')"
    )
    dashboard.add_argument(
        "app",
        nargs="?",
        default=None,
        help="module:attribute of your Soniq instance, e.g. myapp.jobs:eq (or --database-url)",
    )
    _database_options(dashboard)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    dashboard.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    dashboard.add_argument(
        "--actions",
        action="store_true",
        help="enable retry, cancel, pause, resume and purge (default: read-only)",
    )
    dashboard.add_argument(
        "--basic-auth",
        default=os.environ.get("SONIQ_DASHBOARD_BASIC_AUTH"),
        metavar="USER:PASSWORD",
        help="require these credentials (default: $SONIQ_DASHBOARD_BASIC_AUTH; prefer the "
        "variable: a command line is visible to other users)",
    )
    dashboard.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="HOST",
        help="a host name requests may carry (repeatable; default on a loopback address: "
        "localhost, 127.0.0.1, ::1; elsewhere: any)",
    )
    worker = commands.add_parser("worker", help="run a worker")
    worker.add_argument("app", help="module:attribute of your Soniq instance, e.g. myapp.jobs:eq")
    worker.add_argument("--queues", default=None, help="comma-separated queues (default: all)")
    worker.add_argument("--concurrency", type=int, default=10, help="slots for jobs (default 10)")
    worker.add_argument("--burst", action="store_true", help="exit 0 when no job is ready")
    worker.add_argument(
        "--burst-wait",
        type=_non_negative_seconds,
        default=10.0,
        metavar="SECONDS",
        help="with --burst, wait for a retry, snooze or delayed job due within this long "
        "before exiting (default 10; 0 = exit at once)",
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish on SIGTERM (default 30)",
    )
    worker.add_argument(
        "--no-listen",
        action="store_true",
        help="poll only (for PgBouncer in transaction pooling mode)",
    )
    worker.add_argument(
        "--no-periodic",
        action="store_true",
        help="do not enqueue the periodic jobs (@eq.periodic); other workers still do",
    )
    worker.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        help="seconds without heartbeat after which a worker is dead (default 30)",
    )
    worker.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds (default 2)")
    worker.add_argument(
        "--retention",
        type=_retention,
        default=7 * 86400.0,
        metavar="DURATION",
        help="keep finished jobs this long, then delete them: 90s, 30m, 12h, 7d "
        "(default 7d; 0 = delete at completion; forever = never delete)",
    )
    worker.add_argument(
        "--summary-interval",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="log a summary line (jobs run, failed, retried, per second) at INFO this "
        "often, and one at exit (default 60)",
    )
    worker.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between polls when no NOTIFY arrives (default 1)",
    )
    worker.add_argument(
        "--command-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a statement of the worker's own with no answer for this long is given up and "
        "its connection abandoned (default 10, or a third of --stale-after if shorter; "
        "below --stale-after)",
    )
    worker.add_argument(
        "--wait-for-database",
        type=_non_negative_seconds,
        default=60.0,
        metavar="SECONDS",
        help="when the database is unavailable at start, retry for this long before "
        "exiting 1 (default 60; 0 = fail at once)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics from the worker "
        "(needs pip install 'soniq[prometheus]'; see docs/metrics.md)",
    )
    worker.add_argument(
        "--metrics-addr",
        default="0.0.0.0",
        metavar="ADDR",
        help="the address --metrics-port listens on (default 0.0.0.0)",
    )
    worker.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="DEBUG shows a line per job (default INFO)",
    )
    return parser


def _database_options(command: argparse.ArgumentParser) -> None:
    """``--database-url``, ``--schema`` and ``--app``, for the commands that open the
    database."""
    command.add_argument(
        "--database-url",
        default=os.environ.get("SONIQ_DATABASE_URL"),
        help="postgresql:// or sqlite:/// URL (default: $SONIQ_DATABASE_URL)",
    )
    command.add_argument(
        "--schema", default=None, help="schema of Soniq's tables (default: public)"
    )
    command.add_argument(
        "--app",
        dest="app_spec",
        default=None,
        metavar="MODULE:ATTR",
        help="your Soniq instance, e.g. myapp.jobs:eq: its database, schema and settings "
        "(instead of --database-url and --schema)",
    )
    command.add_argument(
        "--no-prepared-statements",
        dest="prepared_statements",
        action="store_false",
        help="prepare no statement on the server: behind PgBouncer in transaction "
        "pooling mode (as Soniq(prepared_statements=False))",
    )


def _soniq_of(args: argparse.Namespace, command: str, spec: str | None = None) -> Any:
    """The Soniq an operator command works on: that of ``--app`` (or ``spec``), or
    one on ``--database-url`` and ``--schema``; None (after saying why on stderr) when
    neither is given, or when both are. Raises what a bad URL raises."""
    spec = spec or args.app_spec
    if spec is not None:
        if args.schema is not None or not args.prepared_statements:
            given = "--schema" if args.schema is not None else "--no-prepared-statements"
            print(
                f"{command}: {given} goes with --database-url; an app (module:eq) brings its own",
                file=sys.stderr,
            )
            return None
        return load_app(spec, command=command)
    if not args.database_url:
        print(
            f"{command}: pass --database-url (or set SONIQ_DATABASE_URL) or --app module:eq",
            file=sys.stderr,
        )
        return None
    from soniq.app import Soniq

    return Soniq(
        args.database_url,
        schema=args.schema or "public",
        prepared_statements=args.prepared_statements,
    )


def _window_minutes(text: str) -> int:
    from soniq.core.admin import MAX_STATS_MINUTES, stats_minutes

    try:
        return stats_minutes(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole minutes from 1 to {MAX_STATS_MINUTES}, got {text!r}"
        ) from None


def _seconds(text: str, *, zero: bool) -> float:
    """A finite number of seconds, > 0 (or >= 0 with ``zero``), from an option."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        wanted = ">= 0" if zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected a number of seconds {wanted}, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def _non_negative_seconds(text: str) -> float:
    return _seconds(text, zero=True)


def commands() -> dict[str, argparse.ArgumentParser]:
    """The ``soniq`` commands, by name, each with its parser."""
    # argparse has no public way back to its subparsers: its one subparsers action.
    action = _parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return dict(action.choices)  # type: ignore[arg-type]


def with_app(argv: Sequence[str], spec: str) -> list[str]:
    """``argv`` of a ``soniq`` command with the Soniq ``spec`` (``module:attr``) added
    where that command takes one: as its positional argument (``worker``, ``check``,
    ``dashboard``), else as ``--app`` after the command's own arguments (before them,
    ``queues pause mail`` would lose ``pause``). Unchanged when it names a database
    already (``--app``, ``--database-url``) or names no command (``--help``). What
    ``flask soniq`` and ``manage.py soniq`` run."""
    args = list(argv)
    if not args or args[0].startswith("-"):
        return args
    if any(a.split("=", 1)[0] in ("--app", "--database-url") for a in args[1:]):
        return args
    command = commands().get(args[0])
    if command is None:
        return args  # an unknown command: soniq says so
    if any(action.dest == "app" and not action.option_strings for action in command._actions):
        return [args[0], spec, *args[1:]]
    return [*args, "--app", spec]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soniq`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "queues":
        return _queues(args)
    if args.command == "job":
        return _opened(args, _job)
    if args.command == "jobs":
        return _opened(args, _list_jobs)
    if args.command == "retry":
        if bool(args.ids) == args.failed:
            print("soniq retry: name the jobs, or pass --failed", file=sys.stderr)
            return 2
        if not args.failed and (args.queue or args.name):
            print("soniq retry: --queue and --name go with --failed", file=sys.stderr)
            return 2
        return _opened(args, _retry)
    if args.command == "cancel":
        return _opened(args, _cancel)
    if args.command == "workers":
        return _opened(args, _workers)
    if args.command == "stats":
        return _opened(args, _stats)
    if args.command == "check":
        return _check(args)
    if args.command == "purge":
        statuses = ", ".join(args.status or ["done", "failed", "cancelled"])
        question = (
            f"Delete the jobs ({statuses}) that ended more than "
            f"{_spoken(args.older_than)} ago? [y/N] "
        )
        if not args.yes:
            if not sys.stdin.isatty():
                print("soniq purge: pass --yes to delete without a terminal", file=sys.stderr)
                return 2
            if input(question).strip().lower() not in ("y", "yes"):
                print("soniq purge: nothing deleted")
                return 1
        return _opened(args, _purge)
    if args.command == "dashboard":
        return _dashboard(args)
    return 2  # pragma: no cover  (argparse rejects unknown commands)


def _migrate(args: argparse.Namespace) -> int:
    try:
        if args.from_version is not None and not args.sql:
            print("soniq migrate: --from goes with --sql", file=sys.stderr)
            return 2
        if args.from_version is not None and not 0 <= args.from_version <= LATEST_VERSION:
            print(
                f"soniq migrate: --from must be a schema version from 0 (none) to "
                f"{LATEST_VERSION}, got {args.from_version}",
                file=sys.stderr,
            )
            return 2
        schema = args.schema or "public"
        if args.sql and args.app_spec is None:
            sys.stdout.write(MigrationPlan(schema).script(args.from_version))
            return 0
        eq = _soniq_of(args, "soniq migrate")
        if eq is None:
            return 2
        try:
            schema = eq._config.schema  # an app's schema is its own
            if args.sql:  # the DDL of that schema, without opening the database
                sys.stdout.write(MigrationPlan(schema).script(args.from_version))
                return 0
            # (Each backend numbers its own schema versions: SQLite's has more.)
            version = eq.sync.backend.migrate(apply=True)
        finally:
            eq.sync.close()
    except (SoniqError, ValueError) as exc:
        print(f"soniq migrate: {exc}", file=sys.stderr)
        return 1
    print(f"soniq migrate: schema {schema!r} is at version {version}")
    return 0


def _queues(args: argparse.Namespace) -> int:
    command = "soniq queues" if args.action is None else f"soniq queues {args.action}"
    if args.app_spec is None and not args.database_url:
        _soniq_of(args, command)  # says what to pass
        return 2
    if args.action is None and args.names:
        print(f"soniq queues: pause, resume or limit {args.names[0]!r}?", file=sys.stderr)
        return 2
    if args.action is not None and not args.names:
        print(f"{command}: name the queues", file=sys.stderr)
        return 2
    if args.action != "limit" and (args.concurrency is not None or args.rate_limit is not None):
        given = "--concurrency" if args.concurrency is not None else "--rate-limit"
        print(f"{command}: {given} goes with `soniq queues limit QUEUE`", file=sys.stderr)
        return 2
    from soniq.core.enqueue import check_queue

    try:
        # Checked before the database is opened (so a bad name changes no queue),
        # naming the options as typed.
        for name in args.names:
            check_queue(name)
        options = ("--concurrency", "--rate-limit")
        wanted = queue_limits(args.concurrency, args.rate_limit, options=options)
        eq = _soniq_of(args, command)
        if eq is None:  # (it said why)
            return 2
        try:
            eq.sync.ensure_initialized(migrate=False)
            if args.action is None:
                _list_queues(eq.sync, as_json=args.json)
            elif args.action == "limit":
                for name in args.names:
                    eq.sync.set_queue_limits(
                        name, concurrency=wanted.concurrency, rate_limit=wanted.rate_limit
                    )
                stored = eq.sync.queue_limits()  # read back: what every worker now obeys
                for name in args.names:
                    _print_limits(name, stored.get(name, QueueLimits()), as_json=args.json)
            else:
                act = eq.sync.pause_queue if args.action == "pause" else eq.sync.resume_queue
                done = f"{args.action}d"
                for name in args.names:
                    changed = act(name)
                    if args.json:
                        print(
                            json.dumps({"queue": name, "action": args.action, "changed": changed})
                        )
                    else:
                        print(f"{name}: {done}" if changed else f"{name}: already {done}")
        finally:
            eq.sync.close()
    except (SoniqError, ValueError, TypeError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _opened(args: argparse.Namespace, act: Any) -> int:
    """Run ``act(eq.sync, args)`` (its exit status) on the database of ``args``; a bad
    value or an unreachable database is one line on stderr and exit 1."""
    command = f"soniq {args.command}"
    try:
        eq = _soniq_of(args, command)
        if eq is None:
            return 2
        try:
            eq.sync.ensure_initialized(migrate=False)
            return int(act(eq.sync, args))
        finally:
            eq.sync.close()
    except (SoniqError, ValueError, TypeError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1


def _list_jobs(eq: Any, args: argparse.Namespace) -> int:
    jobs = eq.list_jobs(
        status=args.status,
        queue=args.queue,
        name=args.name,
        limit=args.limit,
        before_id=args.before_id,
    )
    return _print_records(
        jobs,
        args,
        empty="no job",
        header=("id", "status", "queue", "name", "attempts", "at", "last error"),
        row=_job_row,
    )


def _job_row(job: Any) -> tuple[str, ...]:
    at = job.finished_at or job.started_at or job.run_at
    error = job.last_error or ""
    return (
        str(job.id),
        job.status.value,
        job.queue,
        job.name,
        f"{job.attempts}/{job.max_retries + 1}",
        at.isoformat(timespec="seconds"),
        error if len(error) <= 60 else error[:57] + "...",
    )


def _retry(eq: Any, args: argparse.Namespace) -> int:
    if args.failed:
        count = eq.retry_failed(queue=args.queue, name=args.name)
        print(json.dumps({"retried": count}) if args.json else f"retried {count} job(s)")
        return 0
    left = 0
    for job_id in args.ids:
        retried = eq.retry_job(job_id)
        left += not retried
        if args.json:
            print(json.dumps({"id": job_id, "retried": retried}))
        elif retried:
            print(f"{job_id}: retried")
        else:
            print(f"{job_id}: left as it was (not failed nor cancelled, or its dedupe key is held)")
    return 1 if left else 0


def _cancel(eq: Any, args: argparse.Namespace) -> int:
    from soniq.core.states import JobStatus

    left = 0
    for job_id in args.ids:
        changed = eq.cancel_job(job_id)
        job = eq.get_job(job_id) if changed else None
        running = job is not None and job.status is JobStatus.RUNNING
        left += not changed
        if args.json:
            print(json.dumps({"id": job_id, "cancelled": changed, "running": running}))
        elif running:
            print(f"{job_id}: asked to stop (it is running; its worker cancels it)")
        elif changed:
            print(f"{job_id}: cancelled")
        else:
            print(f"{job_id}: left as it was (finished, or no such job)")
    return 1 if left else 0


def _check(args: argparse.Namespace) -> int:
    app = load_app(args.app, command="soniq check")
    try:
        app.sync.ensure_initialized(migrate=False)
        problems = app.sync.check_backlog()
    except (SoniqError, ValueError) as exc:
        print(f"soniq check: {exc}", file=sys.stderr)
        return 1
    finally:
        app.sync.close()
    if args.json:
        print(json.dumps([_json_fields(p) for p in problems]))
    elif problems:
        print(f"soniq check: {len(problems)} kind(s) of waiting job would fail with this code:")
        for p in problems:
            given = f"arguments ({', '.join(p.arguments)})" if p.arguments else "no arguments"
            print(f"  {p.name} ({p.jobs:,} job(s), oldest {p.oldest_id}) with {given}: {p.problem}")
    else:
        print("soniq check: every job waiting to run fits the code")
    return 1 if problems else 0


def _purge(eq: Any, args: argparse.Namespace) -> int:
    count = eq.purge_jobs(older_than=args.older_than, status=args.status)
    print(json.dumps({"deleted": count}) if args.json else f"deleted {count} job(s)")
    return 0


def _workers(eq: Any, args: argparse.Namespace) -> int:
    return _print_records(
        eq.list_workers(),
        args,
        empty="no worker",
        header=("worker", "host", "pid", "queues", "running", "heartbeat", "jobs"),
        row=_worker_row,
    )


def _worker_row(w: Any) -> tuple[str, ...]:
    jobs = " ".join(str(i) for i in w.running[:10]) + (" ..." if len(w.running) > 10 else "")
    return (
        w.id,
        w.hostname,
        str(w.pid),
        ",".join(w.queues) if w.queues else "*",
        f"{len(w.running)}/{w.concurrency}",
        f"{w.heartbeat_age:.1f}s ago",
        jobs,
    )


def _stats(eq: Any, args: argparse.Namespace) -> int:
    """``soniq stats``: once, or with ``--watch`` every so often until interrupted."""
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    try:
        while True:
            stats = eq.stats(minutes=args.minutes, queue=args.queue)
            if clear:
                print("\x1b[H\x1b[2J", end="")  # home, clear: the table stays in place
            _print_stats(stats, args)
            if args.watch is None:
                return 0
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _print_stats(stats: Any, args: argparse.Namespace) -> None:
    if args.json:
        fields = _json_fields(stats)
        fields["buckets"] = [_json_fields(b) for b in stats.buckets]
        print(json.dumps(fields))
        return
    where = f" of queue {args.queue}" if args.queue else ""
    print(
        f"jobs{where} ended in the last {stats.minutes} min: {stats.done} done, "
        f"{stats.failed} failed, {stats.cancelled} cancelled; {stats.per_second:.1f}/s"
    )
    most = max((b.done + b.failed + b.cancelled for b in stats.buckets), default=0)
    rows = [("minute", "done", "failed", "cancelled", "")]
    for b in stats.buckets:
        total = b.done + b.failed + b.cancelled
        bar = "#" * round(30 * total / most) if most else ""
        local = b.start.astimezone().strftime("%H:%M")
        rows.append((local, str(b.done), str(b.failed), str(b.cancelled), bar))
    _print_table(rows)


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` or plain seconds, as seconds."""
    from soniq.core.admin import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _retention(text: str) -> float | None:
    """``--retention``: a duration, or ``forever`` (None: never delete)."""
    if text.lower() in ("forever", "none"):
        return None
    try:
        return _duration(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 12h or 7d, 0 (delete at completion) or "
            f"forever, got {text!r}"
        ) from None


def _spoken(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _print_records(
    records: Sequence[Any],
    args: argparse.Namespace,
    *,
    empty: str,
    header: tuple[str, ...],
    row: Callable[[Any], tuple[str, ...]],
) -> int:
    """A listing command's output: JSON (``--json``), ``empty`` when there is nothing,
    else a table of ``header`` and ``row(record)`` per record."""
    if args.json:
        print(json.dumps([_json_fields(record) for record in records]))
    elif not records:
        print(empty)
    else:
        _print_table([header, *(row(record) for record in records)])
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows as aligned columns, the first the header (the last column unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


#: The exit status of ``soniq job --wait`` when the job has not ended in time (as
#: coreutils' ``timeout``).
TIMED_OUT = 124


def _job(eq: Any, args: argparse.Namespace) -> int:
    from soniq.core.states import JobStatus

    status = 0
    if args.wait is not None:
        try:
            eq.wait_for(args.id, timeout=args.wait)
        except TimeoutError:
            status = TIMED_OUT
        except SoniqError:  # failed or cancelled: shown below; not found: too
            status = 1
    job = eq.get_job(args.id)
    if job is None:
        print(f"soniq job: no job has id {args.id}", file=sys.stderr)
        return 1
    fields = _json_fields(job)
    if args.json:
        print(json.dumps(fields))
    else:
        traceback = fields.pop("traceback")
        width = max(len(name) for name in fields)
        for name, value in fields.items():
            if value not in (None, [], {}):
                shown = value if isinstance(value, str) else json.dumps(value)
                print(f"{name.ljust(width)}  {shown}")
        if traceback:
            print(f"\n{traceback.rstrip()}")
    if args.wait is not None and status == 0 and job.status is not JobStatus.DONE:
        status = 1
    return status


def _json_fields(value: Any) -> dict[str, Any]:
    """The fields of an attrs value (a job, a worker, a problem) as JSON values:
    times in ISO 8601, statuses by name, tuples as lists."""
    fields = attrs.asdict(value, recurse=False)
    for name, field in fields.items():
        if hasattr(field, "isoformat"):
            fields[name] = field.isoformat()
        elif isinstance(field, enum.Enum):
            fields[name] = field.value
        elif isinstance(field, tuple):
            fields[name] = list(field)
        elif isinstance(field, Mapping):
            fields[name] = dict(field)
    return fields


def _list_queues(eq: Any, *, as_json: bool) -> None:
    """Every queue with jobs (other than done ones) or settings: its jobs by status,
    the wait of its oldest ready job, paused, limits (``eq.queue_stats``). A table,
    or JSON: ``queues`` (the stats), and ``paused`` and ``limits`` as before."""
    stats = eq.queue_stats()
    if as_json:
        limits = {
            q.queue: {"concurrency": q.concurrency, "rate_limit": q.rate_limit}
            for q in stats
            if q.concurrency is not None or q.rate_limit is not None
        }
        paused = [q.queue for q in stats if q.paused]
        shown = [_json_fields(q) for q in stats]
        print(json.dumps({"queues": shown, "paused": paused, "limits": limits}))
        return
    if not stats:
        print("no queue has jobs waiting, running or failed, or settings")
        return
    rows = [
        (
            "queue",
            "queued",
            "scheduled",
            "running",
            "waiting",
            "failed",
            "cancelled",
            "oldest",
            "paused",
            "concurrency",
            "rate",
        )
    ]
    for q in stats:
        counts = (q.queued, q.scheduled, q.running, q.waiting, q.failed, q.cancelled)
        rows.append(
            (
                q.queue,
                *(str(n) for n in counts),
                "-" if q.oldest_queued_age is None else _age(q.oldest_queued_age),
                "yes" if q.paused else "no",
                "-" if q.concurrency is None else str(q.concurrency),
                q.rate_limit or "-",
            )
        )
    _print_table(rows)


def _age(seconds: float) -> str:
    """A wait, to the unit an operator reads: 0.4s, 42s, 12m, 3.5h, 2.1d."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_limits(name: str, limits: QueueLimits, *, as_json: bool) -> None:
    """The limits of queue ``name`` after ``soniq queues limit``."""
    if as_json:
        print(
            json.dumps(
                {
                    "queue": name,
                    "action": "limit",
                    "concurrency": limits.concurrency,
                    "rate_limit": limits.rate_limit,
                }
            )
        )
    elif limits.concurrency is None and limits.rate is None:
        print(f"{name}: no limits")
    else:
        concurrency = "none" if limits.concurrency is None else str(limits.concurrency)
        rate = "none" if limits.rate is None else limits.rate_limit
        print(f"{name}: concurrency {concurrency}, rate limit {rate}")


def load_app(spec: str, command: str = "soniq worker") -> Any:
    """Import ``module:attribute`` (the working directory is importable, as with
    ``python -m``) and return the attribute; ``command`` names the command in errors."""
    from soniq.app import Soniq

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"{command}: expected module:attribute (e.g. myapp.jobs:eq), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name
        if missing is None or not (module_name + ".").startswith(missing + "."):
            raise  # the app's own import failed: its traceback says where
        raise SystemExit(
            f"{command}: no module named {exc.name!r} (from {spec!r}); run it from your "
            "project's directory, or put that on PYTHONPATH"
        ) from None
    if not hasattr(module, attribute):
        raise SystemExit(
            f"{command}: module {module_name!r} has no attribute {attribute!r} "
            f"(the Soniq instance, as in {module_name}:eq)"
        )
    app = getattr(module, attribute)
    if not isinstance(app, Soniq):
        raise SystemExit(f"{command}: {spec} is {type(app).__name__}, not a Soniq instance")
    return app


def _worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = load_app(args.app)
    queues = [q for q in args.queues.split(",") if q] if args.queues else None
    if args.metrics_port is not None and not _serve_metrics(app, args):
        return 1

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                logging.getLogger("soniq.worker").error("second signal: exiting now")
                os._exit(1)
            logging.getLogger("soniq.worker").info(
                "%s: stopping (send it again to exit at once)", signal.Signals(signum).name
            )
            task.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await app.run_worker(
                queues=queues,
                concurrency=args.concurrency,
                burst=args.burst,
                burst_wait=args.burst_wait,
                shutdown_timeout=args.shutdown_timeout,
                listen=not args.no_listen,
                periodic=not args.no_periodic,
                stale_after=args.stale_after,
                heartbeat_interval=args.heartbeat_interval,
                poll_interval=args.poll_interval,
                wait_for_database=args.wait_for_database,
                retention=args.retention,
                summary_interval=args.summary_interval,
                **(
                    {}
                    if args.command_timeout is None
                    else {"command_timeout": args.command_timeout}
                ),
            )
        except asyncio.CancelledError:
            pass
        finally:
            await app.close()

    try:
        asyncio.run(run())
    except (SoniqError, ValueError) as exc:
        print(f"soniq worker: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_metrics(app: Any, args: argparse.Namespace) -> bool:
    """``--metrics-port``: instrument the app (if it is not yet) and serve /metrics from
    a daemon thread; False (said on stderr) when the extra is missing or the port is
    taken."""
    try:
        from soniq.contrib import prometheus
    except ImportError:
        print(
            "soniq worker: --metrics-port needs prometheus-client; pip install 'soniq[prometheus]'",
            file=sys.stderr,
        )
        return False
    prometheus.instrument(app)
    try:
        prometheus.start_http_server(args.metrics_port, args.metrics_addr)
    except OSError as exc:
        print(
            f"soniq worker: --metrics-port {args.metrics_port}: cannot listen on "
            f"{args.metrics_addr}: {exc}",
            file=sys.stderr,
        )
        return False
    logging.getLogger("soniq.worker").info(
        "metrics on http://%s:%d/metrics", args.metrics_addr, args.metrics_port
    )
    return True


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from soniq import dashboard
    except ImportError as exc:
        print(
            f"soniq dashboard: {exc.name or exc} is not installed; pip install 'soniq[dashboard]'",
            file=sys.stderr,
        )
        return 1
    if args.basic_auth:
        try:
            dashboard.parse_basic_auth(args.basic_auth)
        except ValueError as exc:
            print(f"soniq dashboard: --basic-auth: {exc}", file=sys.stderr)
            return 2
    elif not dashboard.is_loopback(args.host):
        print(
            f"soniq dashboard: WARNING: listening on {args.host} without --basic-auth: "
            "anyone who can reach this address sees the jobs' arguments and errors"
            + (" and can act on them" if args.actions else ""),
            file=sys.stderr,
        )
    try:
        app = _soniq_of(args, "soniq dashboard", args.app or args.app_spec)
    except (SoniqError, ValueError) as exc:
        print(f"soniq dashboard: {exc}", file=sys.stderr)
        return 1
    if app is None:
        return 2
    dashboard.serve(
        app,
        host=args.host,
        port=args.port,
        actions=args.actions,
        basic_auth=args.basic_auth or None,
        allowed_hosts=args.allowed_hosts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
