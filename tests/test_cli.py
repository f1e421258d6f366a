"""The ``soniq`` command: its argument handling in process (``soniq.cli.main`` with
argument lists), then each flag and signal with the installed script in a real
process, against the real database.

Jobs that must still be running when a test acts wait behind a gate the test holds
(``tests.worker_app.behind_gate``); waits are for log lines and database conditions,
each with a deadline; every process is bounded by a timeout and killed at the end.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from soniq import JobStatus, QueueLimits, Rate, Soniq, SoniqError
from soniq.cli import _parser, load_app, main
from soniq.core.sql import sqlite as sq
from soniq.core.sql.migrate import LATEST_VERSION
from tests.conftest import Process, listening_sessions, soniq_command, wait_until

Spawn = Callable[..., Process]
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """``soniq worker`` configures the root logger; in process, undo that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def statuses(pg: psycopg.Connection, schema: str) -> collections.Counter[str]:
    rows = pg.execute(f'SELECT status FROM "{schema}".soniq_jobs').fetchall()
    return collections.Counter(row[0] for row in rows)


def notes(pg: psycopg.Connection, schema: str, job_id: int) -> list[str]:
    rows = pg.execute(f'SELECT note FROM "{schema}".runs WHERE job_id = %s', (job_id,))
    return [row[0] for row in rows]


def worker(spawn: Spawn, *args: str) -> Process:
    return spawn("worker", "tests.worker_app:eq", *args)


def env_without_url() -> dict[str, str]:
    env = os.environ.copy()
    env.pop("SONIQ_DATABASE_URL", None)
    return env


# -- in process: arguments --------------------------------------------------------------


def test_worker_defaults() -> None:
    args = _parser().parse_args(["worker", "myapp.jobs:eq"])
    assert (args.command, args.app, args.queues, args.concurrency) == (
        "worker",
        "myapp.jobs:eq",
        None,
        10,
    )
    assert (args.burst, args.no_listen, args.log_level) == (False, False, "INFO")
    assert args.no_periodic is False
    assert (args.shutdown_timeout, args.stale_after, args.heartbeat_interval) == (30, 30, 2)
    assert args.poll_interval == 1


def test_worker_flags_are_parsed() -> None:
    args = _parser().parse_args(
        [
            *("worker", "m:eq", "--queues", "mail,reports", "--concurrency", "3", "--burst"),
            *("--no-listen", "--shutdown-timeout", "2.5", "--log-level", "debug"),
        ]
    )
    assert (args.queues, args.concurrency, args.burst) == ("mail,reports", 3, True)
    # Any case is accepted; the level is read in upper case.
    assert (args.no_listen, args.shutdown_timeout, args.log_level) == (True, 2.5, "DEBUG")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "required: command"),
        (["launch"], "invalid choice: 'launch'"),
        (["worker"], "required: app"),
        (["worker", "m:eq", "--concurrency", "many"], "invalid int value: 'many'"),
        (["worker", "m:eq", "--poll-interval", "soon"], "invalid float value: 'soon'"),
        (["worker", "m:eq", "--surprise"], "unrecognized arguments: --surprise"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: soniq" in err and complaint in err


# -- in process: loading the app ----------------------------------------------------------


def test_load_app_returns_the_soniq(worker_app: Any) -> None:
    assert load_app("tests.worker_app:eq") is worker_app.eq


@pytest.mark.parametrize("spec", ["tests.worker_app", ":eq", "tests.worker_app:", ""])
def test_load_app_wants_module_colon_attribute(spec: str) -> None:
    with pytest.raises(
        SystemExit, match=re.escape(f"expected module:attribute (e.g. myapp.jobs:eq), got {spec!r}")
    ):
        load_app(spec)


def test_load_app_of_a_missing_module_names_it() -> None:
    with pytest.raises(SystemExit, match=r"no module named 'tests\.no_such_module'.*PYTHONPATH"):
        load_app("tests.no_such_module:eq")


@pytest.mark.parametrize(
    ("module", "missing"),
    [
        ("broken_app", "no_such_dependency_of_the_app"),
        # A missing module whose name prefixes the app's as text, not as a package
        # (myapp_extra importing a missing myapp): the app's own failure too.
        ("broken_app_extra", "broken_app"),
    ],
)
def test_an_import_error_inside_the_app_keeps_its_traceback(
    tmp_path: Any, module: str, missing: str
) -> None:
    (tmp_path / f"{module}.py").write_text(f"import {missing}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError, match=f"'{missing}'"):
            load_app(f"{module}:eq")
    finally:
        sys.path.remove(str(tmp_path))


def test_load_app_of_something_else_says_what_it_is(worker_app: Any) -> None:
    with pytest.raises(SystemExit, match=r"tests.worker_app:URL is str, not a Soniq instance"):
        load_app("tests.worker_app:URL")


def test_load_app_of_a_missing_attribute_says_it_is_missing(worker_app: Any) -> None:
    with pytest.raises(SystemExit, match="no_such_name"):
        try:
            load_app("tests.worker_app:no_such_name")
        except SystemExit as exc:
            assert "NoneType" not in str(exc), str(exc)
            raise


# -- in process: errors end in exit 1 with one line -------------------------------------


def test_a_soniq_error_of_the_worker_is_one_line_and_exit_1(
    worker_app: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad setting is caught by the CLI's catch-all (SoniqError) before any job runs."""
    assert main(["worker", "tests.worker_app:eq", "--concurrency", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("soniq worker: concurrency must be")
    assert "Traceback" not in err


def test_any_soniq_error_is_caught_and_others_are_not(
    worker_app: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(self: Soniq, **kwargs: Any) -> None:
        raise SoniqError("the database said no")

    monkeypatch.setattr(Soniq, "run_worker", fails)
    assert main(["worker", "tests.worker_app:eq"]) == 1
    assert capsys.readouterr().err == "soniq worker: the database said no\n"

    async def bug(self: Soniq, **kwargs: Any) -> None:
        raise RuntimeError("a bug, with its traceback")

    monkeypatch.setattr(Soniq, "run_worker", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["worker", "tests.worker_app:eq"])


def test_the_worker_gets_the_flags(worker_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def run_worker(self: Soniq, **kwargs: Any) -> None:
        seen.update(kwargs, app=self)

    monkeypatch.setattr(Soniq, "run_worker", run_worker)
    argv = ["worker", "tests.worker_app:eq", "--queues", "mail,,reports", "--no-listen"]
    argv += ["--concurrency", "3", "--burst", "--shutdown-timeout", "4", "--poll-interval", "0.5"]
    argv += ["--stale-after", "9", "--heartbeat-interval", "3", "--no-periodic"]
    argv += ["--burst-wait", "2.5", "--retention", "12h", "--summary-interval", "5"]
    assert main(argv) == 0
    assert seen["app"] is worker_app.eq
    expected = {
        "queues": ["mail", "reports"],
        "concurrency": 3,
        "burst": True,
        "shutdown_timeout": 4.0,
        "listen": False,
        "periodic": False,
        "burst_wait": 2.5,
        "stale_after": 9.0,
        "heartbeat_interval": 3.0,
        "poll_interval": 0.5,
        "retention": 43200.0,
        "summary_interval": 5.0,
    }
    assert {k: seen[k] for k in expected} == expected
    assert main(["worker", "tests.worker_app:eq", "--retention", "forever"]) == 0
    assert seen["retention"] is None  # never delete
    assert main(["worker", "tests.worker_app:eq"]) == 0
    assert (seen["retention"], seen["summary_interval"]) == (7 * 86400.0, 60.0)


def test_migrate_without_a_url_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    assert main(["migrate"]) == 2
    assert (
        "pass --database-url (or set SONIQ_DATABASE_URL) or --app module:eq"
        in capsys.readouterr().err
    )


def test_migrate_sql_prints_the_ddl_of_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--sql", "--schema", "jobs_here"]) == 0
    out = capsys.readouterr().out
    assert re.search(r'CREATE TABLE (IF NOT EXISTS )?"?jobs_here"?\."?soniq_jobs', out), out


def test_migrate_with_a_bad_url_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--database-url", "mysql://h/db"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("soniq migrate: database_url 'mysql://h/db' has scheme 'mysql'")


def test_migrate_reads_the_url_from_the_environment(
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SONIQ_DATABASE_URL", database_url)
    assert main(["migrate", "--schema", schema]) == 0
    assert f"schema {schema!r} is at version" in capsys.readouterr().out
    assert pg.execute("SELECT to_regclass(%s)", (f'"{schema}".soniq_jobs',)).fetchone() != (None,)


def test_migrate_says_the_version_of_the_backend_it_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each backend numbers its own schema versions (SQLite's job table was rebuilt once
    more): the report is the version the file now has."""
    assert main(["migrate", "--database-url", f"sqlite:///{tmp_path / 'jobs.db'}"]) == 0
    assert capsys.readouterr().out.endswith(f"is at version {sq.LATEST_VERSION}\n")


# -- the installed script ---------------------------------------------------------------


@pytest.mark.slow
def test_the_installed_script_runs(soniq_processes: Spawn) -> None:
    script = Path(sys.executable).parent / "soniq"
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .)"
    assert soniq_command() == [str(script)]
    code, out = soniq_processes("--help").finish(30)
    assert code == 0 and "worker" in out and "migrate" in out, out


@pytest.mark.slow
def test_migrate_exit_statuses(database_url: str, schema: str, soniq_processes: Spawn) -> None:
    code, out = soniq_processes("migrate", env=env_without_url()).finish(30)
    assert (code, out) == (
        2,
        "soniq migrate: pass --database-url (or set SONIQ_DATABASE_URL) or --app module:eq\n",
    )
    code, out = soniq_processes("migrate", "--sql", "--schema", schema).finish(30)
    assert code == 0 and f'"{schema}".soniq_jobs' in out, out
    code, out = soniq_processes("migrate", "--database-url", "mysql://h/db").finish(30)
    assert code == 1 and out.startswith("soniq migrate: database_url 'mysql://h/db'"), out
    code, out = soniq_processes(
        "migrate", "--database-url", database_url, "--schema", schema
    ).finish(60)
    assert code == 0 and "is at version" in out, out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.worker_app", "expected module:attribute"),
        ("tests.worker_app:URL", "is str, not a Soniq instance"),
        ("tests.no_such_module:eq", "no module named 'tests.no_such_module'"),
    ],
)
def test_an_app_that_does_not_load_exits_1(
    worker_app: Any, spec: str, message: str, soniq_processes: Spawn
) -> None:
    code, out = soniq_processes("worker", spec, "--burst").finish(30)
    assert code == 1 and message in out, out


@pytest.mark.slow
def test_an_unknown_log_level_is_a_usage_error(worker_app: Any, soniq_processes: Spawn) -> None:
    code, out = worker(soniq_processes, "--burst", "--log-level", "LOUD").finish(30)
    assert (code, "Traceback" in out) == (2, False), out


# -- the installed script: the worker's flags ---------------------------------------------


@pytest.mark.slow
def test_queues_only_those_queues_jobs_run_and_burst_exits_0(
    worker_app: Any, soniq_processes: Spawn
) -> None:
    eq = worker_app.eq
    default = eq.sync.enqueue(worker_app.record, n=1)
    mail = eq.sync.enqueue(worker_app.record, n=2, queue="mail")
    reports = eq.sync.enqueue(worker_app.record_sync, n=3, queue="reports")
    code, out = worker(soniq_processes, "--burst", "--queues", "mail,reports").finish()
    assert code == 0, out
    assert "queues=mail,reports" in out  # the INFO start line
    assert [eq.sync.get_job(i).status for i in (default, mail, reports)] == [
        JobStatus.QUEUED,
        JobStatus.DONE,
        JobStatus.DONE,
    ]


@pytest.mark.slow
def test_retention_and_the_summary_lines(worker_app: Any, soniq_processes: Spawn) -> None:
    """--retention 0 deletes jobs at completion; --summary-interval logs a line per
    interval while jobs end, and the worker logs the whole run's counts at exit."""
    eq = worker_app.eq
    ids = eq.sync.enqueue_many(worker_app.sleep_then_record, [{"seconds": 0.2}] * 3)
    argv = ["--burst", "--concurrency", "1", "--retention", "0", "--summary-interval", "0.1"]
    code, out = worker(soniq_processes, *argv).finish()
    assert code == 0, out
    assert all(eq.sync.get_job(i) is None for i in ids), out  # deleted at completion
    assert re.search(r"INFO soniq.worker: last 0.1s: done 1, .*; [0-9.]+ jobs/s; running", out)
    stopped = r"worker \S+ stopped after [0-9.]+s: done 3, failed 0, cancelled 0, retried 0, "
    assert re.search(stopped + r"snoozed 0; [0-9.]+ jobs/s", out), out


@pytest.mark.slow
def test_no_listen_polls_without_a_listen_session(
    worker_app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    eq = worker_app.eq

    def done(job_id: int) -> bool:
        return eq.sync.get_job(job_id).status == JobStatus.DONE

    first = eq.sync.enqueue(worker_app.record, n=1)
    poller = worker(soniq_processes, "--no-listen", "--poll-interval", "0.1")
    wait_until(lambda: done(first), 30, "the poller's first claim")
    assert listening_sessions(pg, schema) == 0
    second = eq.sync.enqueue(worker_app.record, n=2)
    wait_until(lambda: done(second), 30, "a later poll")
    assert listening_sessions(pg, schema) == 0
    poller.send_signal(signal.SIGTERM)
    assert poller.finish()[0] == 0
    # The control: without --no-listen the same check sees the worker's LISTEN.
    listener = worker(soniq_processes, "--poll-interval", "30")
    wait_until(lambda: listening_sessions(pg, schema) == 1, 30, "the worker's LISTEN session")
    third = eq.sync.enqueue(worker_app.record, n=3)
    wait_until(lambda: done(third), 20, "the NOTIFY to wake the worker")
    listener.send_signal(signal.SIGTERM)
    assert listener.finish()[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING"])
def test_log_level(worker_app: Any, level: str, soniq_processes: Spawn) -> None:
    ids = worker_app.eq.sync.enqueue_many(worker_app.record, [{"n": 1}, {"n": 2}])
    code, out = worker(soniq_processes, "--burst", "--log-level", level).finish()
    assert code == 0, out
    per_job = [f"DEBUG soniq.worker: job {i} tests.worker_app.record: start" for i in ids]
    started = re.search(r"INFO soniq.worker: worker \S+ started", out)
    if level == "DEBUG":  # a line per job
        assert all(line in out for line in per_job) and started, out
    elif level == "INFO":
        assert started and " DEBUG " not in out, out
    else:
        assert " INFO " not in out and " DEBUG " not in out, out


@pytest.mark.slow
def test_concurrency_bounds_the_jobs_running_at_once(
    worker_app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    worker_app.close_gate(pg)
    ids = worker_app.eq.sync.enqueue_many(worker_app.behind_gate, [{}] * 4)
    proc = worker(soniq_processes, "--concurrency", "2", "--burst", "--poll-interval", "0.1")

    def started() -> int:
        return sum(notes(pg, schema, i).count("started") for i in ids)

    wait_until(lambda: started() == 2, 30, "two jobs to start")
    # Both slots are taken by jobs that cannot end: nothing more is claimed.
    assert statuses(pg, schema) == {"running": 2, "queued": 2}
    worker_app.open_gate(pg)
    code, out = proc.finish()
    assert code == 0, out
    assert statuses(pg, schema) == {"done": 4}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_running_job_finish_and_exits_0(
    worker_app: Any,
    pg: psycopg.Connection,
    schema: str,
    soniq_processes: Spawn,
    signum: signal.Signals,
) -> None:
    worker_app.close_gate(pg)
    job_id = worker_app.eq.sync.enqueue(worker_app.behind_gate)
    proc = worker(soniq_processes, "--poll-interval", "0.1")
    wait_until(lambda: notes(pg, schema, job_id) == ["started"], 30, "the job to start")
    proc.send_signal(signum)
    proc.wait_for_output(f"{signum.name}: stopping")
    assert worker_app.eq.sync.get_job(job_id).status == JobStatus.RUNNING
    worker_app.open_gate(pg)  # the job may end now, within --shutdown-timeout (30 s)
    code, out = proc.finish()
    assert code == 0, out
    assert worker_app.eq.sync.get_job(job_id).status == JobStatus.DONE
    assert notes(pg, schema, job_id) == ["started", "finished"]


@pytest.mark.slow
@pytest.mark.parametrize("job_name", ["sleep_then_record", "sync_sleep_then_record"])
def test_shutdown_timeout_puts_back_what_does_not_finish_in_time(
    worker_app: Any, pg: psycopg.Connection, schema: str, job_name: str, soniq_processes: Spawn
) -> None:
    job_id = worker_app.eq.sync.enqueue(getattr(worker_app, job_name), seconds=60)
    proc = worker(soniq_processes, "--shutdown-timeout", "0.5", "--poll-interval", "0.1")
    wait_until(lambda: notes(pg, schema, job_id) == ["started"], 30, "the job to start")
    proc.send_signal(signal.SIGTERM)
    # Well before the job's 60 s, even with a sync job's thread stuck in it: exit 0,
    # the job put back with the attempt uncounted.
    code, out = proc.finish(timeout=30)
    assert code == 0, out
    job = worker_app.eq.sync.get_job(job_id)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.QUEUED, 0, None)


@pytest.mark.slow
def test_a_second_signal_exits_1_at_once(
    worker_app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    worker_app.close_gate(pg)
    job_id = worker_app.eq.sync.enqueue(worker_app.behind_gate)
    proc = worker(soniq_processes, "--poll-interval", "0.1")
    wait_until(lambda: notes(pg, schema, job_id) == ["started"], 30, "the job to start")
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("SIGTERM: stopping")  # the first one is handled: now the second
    proc.send_signal(signal.SIGTERM)
    code, out = proc.finish(timeout=20)  # not the 30 s its job would be given
    assert code == 1, out
    assert "second signal: exiting now" in out
    # Nothing was written on the way out: the job is left to the rescue of dead workers.
    assert worker_app.eq.sync.get_job(job_id).status == JobStatus.RUNNING


QUEUES_HEADER = [
    "queue",
    "queued",
    "scheduled",
    "running",
    "waiting",
    "failed",
    "cancelled",
    "oldest",
    "paused",
]
QUEUES_HEADER += ["concurrency", "rate"]


def _table(out: str) -> list[list[str]]:
    """A table printed by the CLI, as rows of cells."""
    return [line.split() for line in out.splitlines()]


def test_queues_are_paused_listed_and_resumed_from_the_command_line(
    database_url: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--database-url", database_url, "--schema", schema]
    assert main(["migrate", *where]) == 0
    capsys.readouterr()
    assert main(["queues", "pause", "mail", "reports", *where]) == 0
    assert capsys.readouterr().out == "mail: paused\nreports: paused\n"
    assert main(["queues", "pause", "mail", "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "queue": "mail",
        "action": "pause",
        "changed": False,
    }
    assert main(["queues", *where]) == 0
    assert _table(capsys.readouterr().out) == [
        QUEUES_HEADER,
        ["mail", *"000000", "-", "yes", "-", "-"],
        ["reports", *"000000", "-", "yes", "-", "-"],
    ]
    assert main(["queues", "resume", "mail", *where]) == 0
    assert capsys.readouterr().out == "mail: resumed\n"
    assert main(["queues", "--json", *where]) == 0
    # "paused" as it always was, so scripts that read it still work; "limits" and each
    # queue's counts ("queues", as eq.queue_stats) beside it.
    assert json.loads(capsys.readouterr().out) == {
        "paused": ["reports"],
        "limits": {},
        "queues": [
            {
                "queue": "reports",
                **dict.fromkeys(
                    ["queued", "scheduled", "running", "waiting", "failed", "cancelled"], 0
                ),
                "oldest_queued_age": None,
                "paused": True,
                "concurrency": None,
                "rate_limit": None,
            }
        ],
    }
    assert main(["queues", "resume", "reports", *where]) == 0
    capsys.readouterr()
    assert main(["queues", *where]) == 0
    assert capsys.readouterr().out == (
        "no queue has jobs waiting, running or failed, or settings\n"
    )
    eq = Soniq(database_url, schema=schema)
    try:
        assert eq.sync.paused_queues() == []  # what every worker reads
    finally:
        eq.sync.close()


def test_queue_limits_are_set_listed_and_removed_from_the_command_line(
    database_url: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--database-url", database_url, "--schema", schema]
    assert main(["migrate", *where]) == 0
    capsys.readouterr()
    argv = ["queues", "limit", "mail", "--concurrency", "5", "--rate-limit", "100/minute"]
    assert main([*argv, *where]) == 0
    assert capsys.readouterr().out == "mail: concurrency 5, rate limit 100/m\n"
    # Both limits are set by each call (as set_queue_limits does): one left out is gone.
    argv = ["queues", "limit", "reports", "bulk", "--rate-limit", "5000/h", "--json"]
    assert main([*argv, *where]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"queue": "reports", "action": "limit", "concurrency": None, "rate_limit": "5000/h"},
        {"queue": "bulk", "action": "limit", "concurrency": None, "rate_limit": "5000/h"},
    ]
    assert main(["queues", "limit", "bulk", "--concurrency", "2", *where]) == 0
    assert capsys.readouterr().out == "bulk: concurrency 2, rate limit none\n"
    assert main(["queues", "pause", "archive", "reports", *where]) == 0
    capsys.readouterr()
    assert main(["queues", *where]) == 0
    assert _table(capsys.readouterr().out) == [
        QUEUES_HEADER,
        ["archive", *"000000", "-", "yes", "-", "-"],
        ["bulk", *"000000", "-", "no", "2", "-"],
        ["mail", *"000000", "-", "no", "5", "100/m"],
        ["reports", *"000000", "-", "yes", "-", "5000/h"],
    ]
    assert main(["queues", "--json", *where]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [q["queue"] for q in listed.pop("queues")] == ["archive", "bulk", "mail", "reports"]
    assert listed == {
        "paused": ["archive", "reports"],
        "limits": {
            "bulk": {"concurrency": 2, "rate_limit": None},
            "mail": {"concurrency": 5, "rate_limit": "100/m"},
            "reports": {"concurrency": None, "rate_limit": "5000/h"},
        },
    }
    eq = Soniq(database_url, schema=schema)
    try:  # what every worker reads
        assert eq.sync.queue_limits() == {
            "bulk": QueueLimits(concurrency=2),
            "mail": QueueLimits(5, Rate(100, 60.0)),
            "reports": QueueLimits(rate=Rate(5000, 3600.0)),
        }
    finally:
        eq.sync.close()
    # With neither option: no limit. A paused queue stays paused.
    assert main(["queues", "limit", "mail", "reports", *where]) == 0
    assert capsys.readouterr().out == "mail: no limits\nreports: no limits\n"
    assert main(["queues", "limit", "mail", "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "queue": "mail",
        "action": "limit",
        "concurrency": None,
        "rate_limit": None,
    }
    assert main(["queues", *where]) == 0
    assert _table(capsys.readouterr().out) == [
        QUEUES_HEADER,
        ["archive", *"000000", "-", "yes", "-", "-"],
        ["bulk", *"000000", "-", "no", "2", "-"],
        ["reports", *"000000", "-", "yes", "-", "-"],
    ]


@pytest.mark.parametrize(
    ("options", "code", "complaint"),
    [
        (["--concurrency", "0"], 1, "soniq queues limit: --concurrency must be at least 1, got 0"),
        (["--concurrency", "-2"], 1, "--concurrency must be at least 1, got -2"),
        (["--concurrency", "many"], 2, "argument --concurrency: invalid int value: 'many'"),
        (["--rate-limit", "10/fortnight"], 1, "soniq queues limit: --rate-limit must be a string"),
        (["--rate-limit", "0/s"], 1, "--rate-limit must allow at least 1 start, got '0/s'"),
        (["--rate-limit", "100"], 1, "--rate-limit must be a string like '10/s'"),
    ],
)
def test_queues_limit_refuses_bad_values_before_opening_the_database(
    options: list[str], code: int, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens there: opening the database would be another error.
    nowhere = ["--database-url", "postgresql://nobody@127.0.0.1:1/nothing"]
    try:
        assert main(["queues", "limit", "mail", *options, *nowhere]) == code
    except SystemExit as exited:  # argparse's own refusals
        assert exited.code == code
    err = capsys.readouterr().err
    assert complaint in err and "unavailable" not in err, err
    assert len(err.splitlines()) == 1 or code == 2, err


def test_queues_limit_with_a_bad_name_changes_no_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert main(["migrate", "--database-url", url]) == 0
    argv = ["queues", "limit", "mail", "a,b", "--concurrency", "3", "--database-url", url]
    assert main(argv) == 1
    assert "soniq queues limit: queue must not contain a comma" in capsys.readouterr().err
    eq = Soniq(url)
    try:
        assert eq.sync.queue_limits() == {}  # not even mail's
    finally:
        eq.sync.close()


@pytest.mark.parametrize(
    ("argv", "code", "complaint"),
    [
        (
            ["queues", "pause", "mail"],
            2,
            "pass --database-url (or set SONIQ_DATABASE_URL) or --app module:eq",
        ),
        (["queues", "pause", "--database-url", "sqlite:///x.db"], 2, "name the queues"),
        (["queues", "mail", "--database-url", "sqlite:///x.db"], 2, "invalid choice: 'mail'"),
        (["queues", "pause", "a,b", "--database-url", "sqlite:///{tmp}/q.db"], 1, "comma"),
        (
            ["queues", "limit", "mail"],
            2,
            "pass --database-url (or set SONIQ_DATABASE_URL) or --app module:eq",
        ),
        (["queues", "limit", "--database-url", "sqlite:///x.db"], 2, "limit: name the queues"),
        (
            ["queues", "pause", "mail", "--concurrency", "2", "--database-url", "sqlite:///x.db"],
            2,
            "soniq queues pause: --concurrency goes with `soniq queues limit QUEUE`",
        ),
        (
            ["queues", "--rate-limit", "1/s", "--database-url", "sqlite:///x.db"],
            2,
            "soniq queues: --rate-limit goes with `soniq queues limit QUEUE`",
        ),
    ],
)
def test_queues_usage_errors(
    argv: list[str],
    code: int,
    complaint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    if "{tmp}" in argv[-1]:
        app = Soniq(argv[-1].format(tmp=tmp_path))
        app.sync.ensure_initialized()
        app.sync.close()
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        assert main(argv) == code
    except SystemExit as exited:  # argparse's own refusals
        assert exited.code == code
    assert complaint in capsys.readouterr().err


@pytest.mark.slow
def test_a_queue_limit_set_by_the_installed_script_holds_a_running_worker(
    worker_app: Any,
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    soniq_processes: Spawn,
) -> None:
    """Set with ``soniq queues limit``, obeyed by a worker process at its next claim;
    removed the same way, and the worker takes the rest."""
    where = ["--database-url", database_url, "--schema", schema]
    code, out = soniq_processes("queues", "limit", "default", "--concurrency", "1", *where).finish(
        30
    )
    assert (code, out) == (0, "default: concurrency 1, rate limit none\n")
    worker_app.close_gate(pg)
    ids = worker_app.eq.sync.enqueue_many(worker_app.behind_gate, [{}] * 3)
    proc = worker(soniq_processes, "--concurrency", "4", "--poll-interval", "0.1")

    def started() -> int:
        return sum(notes(pg, schema, i).count("started") for i in ids)

    wait_until(lambda: started() == 1, 30, "one job to start")
    # A negative can only be watched for a while: ten polls of the worker.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert statuses(pg, schema) == {"running": 1, "queued": 2}
        time.sleep(0.05)
    code, out = soniq_processes("queues", "--json", *where).finish(30)
    listed = json.loads(out)
    assert code == 0 and {k: listed[k] for k in ("paused", "limits")} == {
        "paused": [],
        "limits": {"default": {"concurrency": 1, "rate_limit": None}},
    }, out
    [default] = listed["queues"]  # the limit holds: one running, two queued
    assert (default["running"], default["queued"], default["concurrency"]) == (1, 2, 1), out
    code, out = soniq_processes("queues", "limit", "default", *where).finish(30)
    assert (code, out) == (0, "default: no limits\n")
    wait_until(lambda: started() == 3, 30, "the others to start once the limit is gone")
    worker_app.open_gate(pg)
    wait_until(lambda: statuses(pg, schema) == {"done": 3}, 30, "all three to finish")
    proc.send_signal(signal.SIGTERM)
    assert proc.finish()[0] == 0


def test_operator_commands_open_the_database_of_an_app(
    worker_app: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--app module:eq instead of --database-url: that Soniq's database and schema
    (ahead of $SONIQ_DATABASE_URL)."""
    monkeypatch.setenv("SONIQ_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    job_id = worker_app.eq.sync.enqueue(worker_app.record, n=7, queue="mail")
    assert main(["jobs", "--app", "tests.worker_app:eq", "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["args"]) == (job_id, {"n": 7})
    assert main(["queues", "pause", "mail", "--app", "tests.worker_app:eq"]) == 0
    assert capsys.readouterr().out == "mail: paused\n"
    assert worker_app.eq.sync.paused_queues() == ["mail"]
    with pytest.raises(SystemExit, match="expected module:attribute"):
        main(["stats", "--app", "tests.worker_app"])


def test_migrate_with_an_app_uses_its_schema(
    worker_app: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = worker_app.eq._config.schema
    assert main(["migrate", "--sql", "--from", "0", "--app", "tests.worker_app:eq"]) == 0
    assert f'CREATE SCHEMA IF NOT EXISTS "{schema}"' in capsys.readouterr().out
    assert main(["migrate", "--app", "tests.worker_app:eq"]) == 0
    assert (
        capsys.readouterr().out
        == f"soniq migrate: schema {schema!r} is at version {LATEST_VERSION}\n"
    )
    # An app brings its own schema: one given beside it is a mistake, not ignored.
    assert main(["migrate", "--app", "tests.worker_app:eq", "--schema", "other"]) == 2
    assert "--schema goes with --database-url" in capsys.readouterr().err
    # Every command that takes --app refuses it so, with exit 2 and no traceback.
    for argv in (["queues"], ["queues", "pause", "q"], ["stats"], ["jobs"], ["workers"]):
        assert main([*argv, "--app", "tests.worker_app:eq", "--schema", "other"]) == 2, argv
        assert "--schema goes with --database-url" in capsys.readouterr().err, argv


def test_with_app_puts_the_soniq_where_each_command_takes_it() -> None:
    """What flask soniq and manage.py soniq run: the parser says where a command
    takes its Soniq."""
    from soniq.cli import with_app

    assert with_app(["worker", "--burst"], "m:eq") == ["worker", "m:eq", "--burst"]
    assert with_app(["check"], "m:eq") == ["check", "m:eq"]
    assert with_app(["dashboard", "--actions"], "m:eq") == ["dashboard", "m:eq", "--actions"]
    assert with_app(["queues", "pause", "mail"], "m:eq") == [
        "queues",
        "pause",
        "mail",
        "--app",
        "m:eq",
    ]
    assert with_app(["jobs", "--database-url=x"], "m:eq") == ["jobs", "--database-url=x"]
    assert with_app(["--help"], "m:eq") == ["--help"]
    assert with_app(["nope"], "m:eq") == ["nope"]
