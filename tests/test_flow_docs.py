"""docs/flow-control.md, checked: every Python example runs (on ``memory://``, on an
SQLite file and on PostgreSQL, each in a database of its own), its ``soniq queues``
transcript is what the command prints, every mistake it lists raises as it says, and
the behaviour it states beyond the examples holds."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from soniq import JobDefinitionError, JobStatus, QueueLimits, Soniq
from soniq.cli import main
from soniq.core.flow import ClaimLimits, JobLimits, Rate
from soniq.drivers.postgres_async import ClaimOrder
from soniq.testing import drain

DOC = Path(__file__).resolve().parent.parent / "docs" / "flow-control.md"
TEXT = DOC.read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", TEXT, re.S)
KINDS = ("memory", "sqlite", "postgresql")


def flat(text: str) -> str:
    """``text`` with every run of white space made one space (the doc wraps lines)."""
    return " ".join(text.split())


@pytest.fixture(params=KINDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty, migrated database of each kind."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("fresh_database")
    app = Soniq(url)
    try:
        app.sync.ensure_initialized()
    finally:
        app.sync.close()
    return url


def run_example(index: int, url: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_flow", "DATABASE_URL": url}
    exec(compile(EXAMPLES[index], str(DOC), "exec"), namespace)
    return namespace


# -- the examples -----------------------------------------------------------------------


def test_the_doc_has_the_examples_this_file_runs() -> None:
    assert len(EXAMPLES) == 5
    assert all("DATABASE_URL" in example for example in EXAMPLES)


def test_the_job_limits_example_defines_them(database: str) -> None:
    eq = run_example(0, database)["eq"]
    assert {d.name: d.limits for d in eq.registry} == {
        "docs_flow.export_report": JobLimits(concurrency=2),
        "docs_flow.sync_account": JobLimits(concurrency=1, concurrency_key="account_id"),
        "docs_flow.call_partner": JobLimits(rate=Rate(10, 1.0)),
        "docs_flow.send_mail": JobLimits(rate=Rate(20, 60.0), rate_key="to"),
    }
    assert eq.registry.get("docs_flow.send_mail").queue == "mail"


def test_the_queue_limits_example_runs(database: str) -> None:
    run_example(1, database)


def test_the_per_key_example_never_runs_two_of_one_account(database: str) -> None:
    namespace = run_example(2, database)
    assert namespace["most"] == {1: 1, 2: 1}
    assert namespace["running"] == {1: 0, 2: 0}
    eq = namespace["eq"]  # closed by the example; its blocking twin opens anew
    try:
        # A fresh database: the example's jobs are 1 to 6.
        assert [eq.sync.get_job(i).status for i in range(1, 7)] == [JobStatus.DONE] * 6
    finally:
        eq.sync.close()


def test_the_rate_example_waits_for_the_window(database: str) -> None:
    started = time.monotonic()
    namespace = run_example(3, database)
    assert len(namespace["starts"]) == 3
    assert time.monotonic() - started < 5  # the burst worker did not wait past its due


def test_the_drain_example_ignores_the_rate(database: str) -> None:
    run_example(4, database)


# -- the transcript of soniq queues -----------------------------------------------------


def transcript() -> list[tuple[list[str], str]]:
    """The commands of the doc's console block and what each prints."""
    [block] = re.findall(r"```console\n(.*?)```", TEXT, re.S)
    steps: list[tuple[list[str], str]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((shlex.split(line[2:]), ""))
        else:
            argv, out = steps[-1]
            steps[-1] = (argv, out + line + "\n")
    return steps


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_soniq_queues_transcript_is_what_the_command_prints(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("fresh_database")
    assert main(["migrate", "--database-url", url]) == 0
    capsys.readouterr()
    steps = transcript()
    assert len(steps) == 3
    for argv, expected in steps:
        assert argv[0] == "soniq"
        argv = [url if arg == "URL" else arg for arg in argv[1:]]
        assert main(argv) == 0, argv
        assert capsys.readouterr().out == expected, argv


def test_the_json_listing_is_as_documented(
    fresh_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    documented = re.search(r"`soniq queues --json` prints `(.*?)`", TEXT, re.S)
    assert documented is not None
    eq = Soniq(fresh_database)
    try:
        eq.sync.ensure_initialized()
        eq.sync.set_queue_limits("mail", concurrency=5, rate_limit="100/m")
    finally:
        eq.sync.close()
    assert main(["queues", "--json", "--database-url", fresh_database]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The doc's "[...]": the queues' stats (here mail's, at zero), the paused ones (none).
    shown = json.loads(flat(documented[1]).replace("[...]", "[]"))
    assert list(printed) == list(shown) and printed["limits"] == shown["limits"]
    assert printed["paused"] == [] and [q["queue"] for q in printed["queues"]] == ["mail"]


# -- mistakes ---------------------------------------------------------------------------

#: Each mistake the doc lists (its message), and the options that make it.
MISTAKES: list[tuple[str, list[dict[str, Any]]]] = [
    ("concurrency must be at least 1", [{"concurrency": 0}, {"concurrency": -3}]),
    (
        "concurrency must be an int",
        [{"concurrency": "2"}, {"concurrency": 2.0}, {"concurrency": True}],
    ),
    (
        "rate_limit must be a string like '10/s', '100/m' or '5000/h'",
        [
            {"rate_limit": "10/fortnight"},
            {"rate_limit": "10 per second"},
            {"rate_limit": "10/S"},
            {"rate_limit": 10},
            {"rate_limit": "-1/s"},
        ],
    ),
    ("rate_limit must allow at least 1 start", [{"rate_limit": "0/s"}]),
    ("concurrency must be at most 1,000,000", [{"concurrency": 2**31}]),
    ("rate_limit allows at most 1,000,000 starts", [{"rate_limit": "2000000/h"}]),
    (
        "concurrency_key must name one of its parameters",
        [
            {"concurrency": 1, "concurrency_key": "account"},
            {"concurrency": 1, "concurrency_key": 1},
        ],
    ),
    ("rate_key must name one of its parameters", [{"rate_limit": "1/s", "rate_key": "acount"}]),
    ("needs concurrency= as well", [{"concurrency_key": "account_id"}]),
    ("needs rate_limit= as well", [{"rate_key": "account_id", "concurrency": 1}]),
]


def documented_mistakes() -> list[str]:
    """The message of each mistake the doc lists: the last code span of each item."""
    section = TEXT.split("## Mistakes", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^- (.*?)(?=^- |^\n)", section, re.S | re.M)
    return [flat(re.findall(r"`([^`]*)`", item)[-1]) for item in items]


def test_the_doc_lists_exactly_the_mistakes_tested_here() -> None:
    assert documented_mistakes() == [message for message, _ in MISTAKES]


@pytest.mark.parametrize("decorator", ["job", "periodic"])
@pytest.mark.parametrize(
    ("message", "options"),
    [(message, options) for message, cases in MISTAKES for options in cases],
)
def test_each_mistake_raises_where_it_is_written(
    decorator: str, message: str, options: dict[str, Any]
) -> None:
    eq = Soniq("memory://")

    def sync_account(account_id: int = 0) -> None: ...

    with pytest.raises(JobDefinitionError) as raised:
        if decorator == "job":
            eq.job(name="flow.sync_account", **options)(sync_account)
        else:
            eq.periodic(every=60, name="flow.sync_account", **options)(sync_account)
    assert str(raised.value).startswith("job 'flow.sync_account': ")
    assert message in str(raised.value)
    assert list(eq.registry) == []


@pytest.mark.parametrize(
    ("queue", "options", "error", "message"),
    [
        ("mail", {"concurrency": 0}, ValueError, "concurrency must be at least 1"),
        ("mail", {"concurrency": "5"}, TypeError, "concurrency must be an int"),
        ("mail", {"rate_limit": "10/fortnight"}, ValueError, "rate_limit must be a string"),
        ("mail", {"rate_limit": "0/m"}, ValueError, "rate_limit must allow at least 1 start"),
        ("a,b", {"concurrency": 1}, ValueError, "queue must not contain a comma"),
        ("", {"concurrency": 1}, TypeError, "queue must be a non-empty str"),
    ],
)
def test_set_queue_limits_refuses_bad_values_before_any_sql(
    queue: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    # Nothing listens there: a statement would fail with DatabaseUnavailable.
    eq = Soniq("postgresql://nobody@127.0.0.1:1/nothing", connect_timeout=0.5)
    try:
        with pytest.raises(error, match=re.escape(message)):
            eq.sync.set_queue_limits(queue, **options)
        with pytest.raises(error, match=re.escape(message)):
            asyncio.run(eq.set_queue_limits(queue, **options))
    finally:
        eq.sync.close()


# -- what the doc says beyond its examples -----------------------------------------------


def claimed(eq: Soniq, names: list[str], slots: int = 10) -> list[int]:
    """The ids a worker of ``eq``'s definitions claims now (its claim, limits included)."""
    limits = eq.registry.claim_limits()

    async def claim() -> list[int]:
        try:
            rows = await eq.backend.claim_jobs(slots, "w", None, names, limits)
            return [row.id for row in rows]
        finally:
            await eq.close()

    return asyncio.run(claim())


def test_a_missing_key_argument_counts_as_null_not_as_its_default(database: str) -> None:
    eq = Soniq(database)

    @eq.job(name="flow.sync", concurrency=1, concurrency_key="account_id")
    def sync(account_id: int | str | None = 0) -> None: ...

    missing = eq.sync.enqueue(sync)
    null = eq.sync.enqueue(sync, account_id=None)
    zero = eq.sync.enqueue(sync, account_id=0)
    one = eq.sync.enqueue(sync, account_id=1)
    one_text = eq.sync.enqueue(sync, account_id="1")
    eq.sync.close()
    # One per value: the missing argument and None share the group of null.
    assert claimed(eq, ["flow.sync"]) == [missing, zero, one, one_text]
    assert null not in claimed(eq, ["flow.sync"])


@pytest.mark.parametrize("kind", ["memory", "postgresql"])
@pytest.mark.parametrize("backlog", ["unlimited", "limited"])
def test_a_backlog_of_one_kind_of_job_does_not_starve_the_other(
    kind: str, backlog: str, request: pytest.FixtureRequest
) -> None:
    url = "memory://" if kind == "memory" else request.getfixturevalue("fresh_database")
    eq = Soniq(url)
    eq.sync.ensure_initialized()

    @eq.job(name="flow.limited", concurrency=100)
    def limited() -> None: ...

    @eq.job(name="flow.free")
    def free() -> None: ...

    crowd, lone = (free, limited) if backlog == "unlimited" else (limited, free)
    eq.sync.enqueue_many(crowd, [{} for _ in range(60)])
    waiting = eq.sync.enqueue(lone, priority=10)  # first in claim order
    eq.sync.close()

    async def claims_until_it_starts() -> int:
        limits = eq.registry.claim_limits()
        try:
            async with eq.backend.worker_session() as ops:
                for n in range(1, 60):
                    rows = await ops.claim_jobs(1, "w", None, ["flow.free", "flow.limited"], limits)
                    if [row.id for row in rows] == [waiting]:
                        return n
        finally:
            await eq.close()
        return 0

    # Each claim of the other kind fills the worker's one slot from its backlog; the
    # waiting job's claim goes first at least once in ClaimOrder.FAIR_TURNS + 1 claims (every
    # other claim on SQLite), and finds it at the head of the line.
    assert 0 < asyncio.run(claims_until_it_starts()) <= ClaimOrder.FAIR_TURNS + 1


# Two Soniq instances on one database: memory:// gives each a database of its own.
@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_a_worker_without_the_limit_claims_freely_and_its_runs_count(database: str) -> None:
    limited, unlimited = Soniq(database), Soniq(database)

    @limited.job(name="flow.export", concurrency=1)
    def export(n: int) -> None: ...

    unlimited.job(name="flow.export")(export)
    ids = limited.sync.enqueue_many(export, [{"n": n} for n in range(3)])
    limited.sync.close()
    assert claimed(unlimited, ["flow.export"], slots=2) == ids[:2]  # no limit in its code
    assert claimed(limited, ["flow.export"]) == []  # those two run: the limit is full


def test_drain_ignores_queue_limits_too(database: str) -> None:
    eq = Soniq(database)

    @eq.job(name="flow.mail", queue="mail")
    async def mail(n: int) -> None: ...

    async def main() -> None:
        await eq.set_queue_limits("mail", concurrency=1, rate_limit="1/h")
        await eq.enqueue_many(mail, [{"n": n} for n in range(3)])
        assert (await drain(eq)).done == 3
        await eq.close()

    asyncio.run(main())


def test_a_burst_worker_leaves_a_rate_limited_backlog_after_burst_wait(database: str) -> None:
    eq = Soniq(database)

    @eq.job(name="flow.slow", rate_limit="1/h")
    async def slow(n: int) -> None: ...

    async def main() -> list[JobStatus]:
        ids = await eq.enqueue_many(slow, [{"n": n} for n in range(3)])
        started = time.monotonic()
        await eq.run_worker(burst=True, burst_wait=0.5)
        assert time.monotonic() - started < 10
        statuses = [(await eq.get_job(i)).status for i in ids]  # type: ignore[union-attr]
        await eq.close()
        return statuses

    assert asyncio.run(main()) == [JobStatus.DONE, JobStatus.QUEUED, JobStatus.QUEUED]


def test_queue_limits_change_from_the_next_claim(
    database: str, request: pytest.FixtureRequest
) -> None:
    """Lowered, removed and raised: each applies at the next claim."""
    eq = Soniq(database)

    @eq.job(name="flow.mail", queue="mail")
    def mail(n: int) -> None: ...

    ids = eq.sync.enqueue_many(mail, [{"n": n} for n in range(6)])
    eq.sync.set_queue_limits("mail", concurrency=1)
    eq.sync.close()
    assert claimed(eq, ["flow.mail"]) == ids[:1]
    eq.sync.set_queue_limits("mail")  # removed
    eq.sync.close()
    assert claimed(eq, ["flow.mail"], slots=1) == ids[1:2]
    eq.sync.set_queue_limits("mail", rate_limit="1/h")  # one start in this hour
    eq.sync.close()
    assert claimed(eq, ["flow.mail"]) == ids[2:3]
    assert claimed(eq, ["flow.mail"]) == []
    eq.sync.set_queue_limits("mail", rate_limit="2/h")  # raised: room for one more
    eq.sync.close()
    assert claimed(eq, ["flow.mail"]) == ids[3:4]


def test_the_stored_limits_read_back_as_set(database: str) -> None:
    eq = Soniq(database)
    try:
        eq.sync.set_queue_limits("mail", concurrency=3, rate_limit="5000/hour")
        eq.sync.set_queue_limits("reports", rate_limit="10/sec")
        assert eq.sync.queue_limits() == {
            "mail": QueueLimits(3, Rate(5000, 3600.0)),
            "reports": QueueLimits(rate=Rate(10, 1.0)),
        }
        assert eq.sync.queue_limits()["mail"].rate_limit == "5000/h"
    finally:
        eq.sync.close()


def test_the_claim_limits_of_a_worker_are_its_definitions() -> None:
    """What a worker passes to its claims: the limits of its own jobs, by name."""
    eq = Soniq("memory://")

    @eq.job(name="flow.a", concurrency=2)
    def a() -> None: ...

    @eq.job(name="flow.b")
    def b() -> None: ...

    assert eq.registry.claim_limits() == ClaimLimits((("flow.a", JobLimits(concurrency=2)),))


@pytest.mark.parametrize("database", ["memory", "postgresql"], indirect=True)
def test_a_key_with_room_does_not_hide_the_keys_behind_it(database: str) -> None:
    eq = Soniq(database)

    @eq.job(name="flow.sync", concurrency=1, concurrency_key="account_id")
    def sync(account_id: int) -> None: ...

    ids = eq.sync.enqueue_many(sync, [{"account_id": 1}] * 40 + [{"account_id": 2}])
    eq.sync.close()
    assert claimed(eq, ["flow.sync"]) == [ids[0], ids[-1]]  # one per account
