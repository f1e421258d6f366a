"""The operator's commands, as an operator runs them: ``soniq jobs``, ``soniq
retry``, ``soniq cancel`` on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from soniq import JobStatus, Soniq
from soniq.cli import main
from soniq.core.jobs import JobSpec, WorkerIdentity
from tests.conftest import new_soniq
from tests.test_cli import QUEUES_HEADER


@pytest.fixture(params=["sqlite", "asyncpg"])
def eq(request: pytest.FixtureRequest, tmp_path: Path) -> Soniq:
    app = new_soniq(request.param, request, tmp_path)
    app.sync.ensure_initialized()
    request.addfinalizer(app.sync.close)
    return app


def where(eq: Soniq) -> list[str]:
    """The database options that name ``eq``'s database."""
    config = eq._config
    if config.kind == "postgres":
        return ["--database-url", config.dsn, "--schema", config.schema]
    return ["--database-url", f"sqlite:///{config.location}"]


def run(eq: Soniq, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main([*argv, *where(eq)])
    return status, capsys.readouterr().out


def _failing(eq: Soniq) -> list[int]:
    @eq.job(name="ops.fail", max_retries=0)
    def fail(n: int) -> None:
        raise ValueError(f"no {n}")

    ids = eq.sync.enqueue_many(fail, [{"n": n} for n in range(3)])
    eq.sync.run_worker(burst=True)
    return ids


def test_soniq_jobs_lists_a_page_as_a_table_or_json(
    eq: Soniq, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = _failing(eq)
    later = eq.sync.enqueue("ops.other", delay=60, queue="mail")
    status, out = run(eq, capsys, "jobs", "--limit", "2")
    header, *rows = out.splitlines()
    assert status == 0 and header.split() == [
        "id",
        "status",
        "queue",
        "name",
        "attempts",
        "at",
        "last",
        "error",
    ]
    assert [row.split()[:5] for row in rows] == [
        [str(later), "queued", "mail", "ops.other", "0/4"],
        [str(failed[2]), "failed", "default", "ops.fail", "1/1"],
    ]
    assert rows[1].endswith("ValueError: no 2")
    status, out = run(eq, capsys, "jobs", "--status", "failed", "--before-id", str(failed[2]))
    assert [int(row.split()[0]) for row in out.splitlines()[1:]] == failed[1::-1]
    status, out = run(eq, capsys, "jobs", "--queue", "mail", "--json")
    [shown] = json.loads(out)
    assert (shown["id"], shown["status"], shown["queue"]) == (later, "queued", "mail")
    assert run(eq, capsys, "jobs", "--name", "ops.nobody") == (0, "no job\n")
    assert main(["jobs", "--status", "stuck", *where(eq)]) == 1
    assert "status must be one of" in capsys.readouterr().err


def test_soniq_retry_and_cancel(eq: Soniq, capsys: pytest.CaptureFixture[str]) -> None:
    failed = _failing(eq)
    assert run(eq, capsys, "retry", str(failed[0])) == (0, f"{failed[0]}: retried\n")
    status, out = run(eq, capsys, "retry", str(failed[0]), "--json")
    assert (status, json.loads(out)) == (1, {"id": failed[0], "retried": False})
    assert run(eq, capsys, "retry", "--failed", "--name", "ops.fail") == (
        0,
        "retried 2 job(s)\n",
    )
    assert [eq.sync.get_job(i).status for i in failed] == [JobStatus.QUEUED] * 3
    status, out = run(eq, capsys, "cancel", str(failed[1]), "987654")
    assert status == 1
    assert out.splitlines() == [
        f"{failed[1]}: cancelled",
        "987654: left as it was (finished, or no such job)",
    ]
    assert eq.sync.get_job(failed[1]).status is JobStatus.CANCELLED
    assert main(["retry", *where(eq)]) == 2
    assert main(["retry", "1", "--queue", "q", *where(eq)]) == 2


def test_soniq_purge_asks_on_a_terminal_and_needs_yes_elsewhere(
    eq: Soniq, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = _failing(eq)
    done = eq.sync.enqueue("ops.other")
    eq.sync.cancel_job(done)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["purge", "--older-than", "0s", *where(eq)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    asked: list[str] = []

    def answer(question: str) -> str:
        asked.append(question)
        return "n" if len(asked) == 1 else "y"

    monkeypatch.setattr("builtins.input", answer)
    assert run(eq, capsys, "purge", "--older-than", "0", "--status", "failed") == (
        1,
        "soniq purge: nothing deleted\n",
    )
    assert asked == ["Delete the jobs (failed) that ended more than 0s ago? [y/N] "]
    assert run(eq, capsys, "purge", "--older-than", "0", "--status", "failed") == (
        0,
        "deleted 3 job(s)\n",
    )
    assert all(eq.sync.get_job(i) is None for i in failed)
    assert run(eq, capsys, "purge", "--older-than", "7d", "--yes", "--json") == (
        0,
        '{"deleted": 0}\n',
    )
    assert eq.sync.get_job(done) is not None  # it ended just now


def test_soniq_workers_lists_each_worker_and_its_jobs(
    eq: Soniq, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(eq, capsys, "workers") == (0, "no worker\n")
    backend = eq.sync.async_twin().backend

    async def register() -> list[int]:
        try:
            await backend.register_worker(WorkerIdentity("w1", "host-a", 7, ("mail",), 4))
            ids = [await backend.insert_jobs(_spec()) for _ in range(2)]
            await backend.claim_jobs(2, "w1", None)
            return [i for [i] in ids]
        finally:
            await backend.close()

    ids = asyncio.run(register())
    status, out = run(eq, capsys, "workers")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["worker", "host", "pid", "queues", "running", "heartbeat", "jobs"]
    assert row.split()[:5] == ["w1", "host-a", "7", "mail", "2/4"]
    assert row.split()[-2:] == [str(i) for i in ids]
    status, out = run(eq, capsys, "workers", "--json")
    assert status == 0
    [shown] = json.loads(out)
    assert (shown["id"], shown["queues"], shown["running"]) == ("w1", ["mail"], ids)


def _spec() -> JobSpec:
    return JobSpec("ops.other", "mail", ({},))


def test_soniq_queues_counts_each_queues_jobs(
    eq: Soniq, capsys: pytest.CaptureFixture[str]
) -> None:
    _failing(eq)  # 3 failed in default
    eq.sync.enqueue("ops.other", queue="mail")
    eq.sync.enqueue("ops.other", queue="mail", delay=3600)
    eq.sync.pause_queue("mail")
    status, out = run(eq, capsys, "queues")
    header, *rows = out.splitlines()
    assert status == 0 and header.split() == QUEUES_HEADER
    cells = [row.split() for row in rows]
    assert [c[:7] for c in cells] == [
        ["default", "0", "0", "0", "0", "3", "0"],
        ["mail", "1", "1", "0", "0", "0", "0"],
    ]
    assert cells[0][7] == "-" and cells[1][7].endswith("s")  # the oldest ready job's wait
    assert [c[8:] for c in cells] == [["no", "-", "-"], ["yes", "-", "-"]]
    status, out = run(eq, capsys, "queues", "--json")
    shown = json.loads(out)
    assert [(q["queue"], q["failed"], q["queued"]) for q in shown["queues"]] == [
        ("default", 3, 0),
        ("mail", 0, 1),
    ]
    assert shown["paused"] == ["mail"]


def test_soniq_stats_prints_the_jobs_ended_per_minute(
    eq: Soniq, capsys: pytest.CaptureFixture[str]
) -> None:
    _failing(eq)
    status, out = run(eq, capsys, "stats", "--minutes", "2")
    summary, header, *rows = out.splitlines()
    assert status == 0
    assert summary.startswith("jobs ended in the last 2 min: 0 done, 3 failed, 0 cancelled; ")
    assert header.split() == ["minute", "done", "failed", "cancelled"]
    assert len(rows) == 2 and sum(int(r.split()[2]) for r in rows) == 3
    assert any(r.endswith("#" * 30) for r in rows)  # the busiest minute's bar
    status, out = run(eq, capsys, "stats", "--queue", "mail", "--json")
    shown = json.loads(out)
    assert (shown["minutes"], shown["failed"], len(shown["buckets"])) == (15, 0, 15)
    assert set(shown["buckets"][0]) == {"start", "done", "failed", "cancelled"}
    with pytest.raises(SystemExit):
        main(["stats", "--minutes", "0", *where(eq)])
    assert "--minutes: expected whole minutes from 1 to 1440" in capsys.readouterr().err


@pytest.mark.slow
def test_soniq_stats_watch_prints_until_interrupted(eq: Soniq) -> None:
    """--watch prints a fresh JSON line each interval, sees jobs that end meanwhile,
    and Ctrl-C (SIGINT) ends it with status 0."""
    argv = [sys.executable, "-m", "soniq", "stats", "--watch", "0.05", "--json", *where(eq)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["cancelled"] == 0
        eq.sync.cancel_job(eq.sync.enqueue("ops.other"))
        for _ in range(200):  # bounded: at 0.05 s a line, 10 s at most
            if json.loads(proc.stdout.readline())["cancelled"] == 1:
                break
        else:
            raise AssertionError("the cancelled job never showed")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
