"""docs/workflows.md, checked: every Python example runs (on ``memory://``, on an
SQLite file and on PostgreSQL, each in a database of its own; the transactional one
on PostgreSQL), and every mistake it lists raises as it says."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from soniq import JobStatus, Soniq
from soniq.worker.context import JobContext
from tests.test_flow_docs import database

DOC = Path(__file__).resolve().parent.parent / "docs" / "workflows.md"
TEXT = DOC.read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", TEXT, re.S)
__all__ = ["database"]  # a fixture, used by name
TRANSACTIONAL = 3  # the example with connection=: PostgreSQL only


def run_example(index: int, url: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_wf", "DATABASE_URL": url}
    exec(compile(EXAMPLES[index], str(DOC), "exec"), namespace)
    return namespace


def test_the_doc_has_the_examples_this_file_runs() -> None:
    assert len(EXAMPLES) == 6
    assert all("DATABASE_URL" in example for example in EXAMPLES)


@pytest.mark.parametrize("index", [i for i in range(6) if i != TRANSACTIONAL])
def test_an_example_runs(database: str, index: int) -> None:
    run_example(index, database)  # each asserts what it shows


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_the_transactional_example_enqueues_the_graph_atomically(database: str) -> None:
    eq = run_example(TRANSACTIONAL, database)["eq"]
    try:
        jobs = [eq.sync.get_job(i) for i in range(1, 5)]
        assert [(j.name, j.status, j.parents) for j in jobs] == [
            ("docs_wf.pay", JobStatus.QUEUED, ()),
            ("docs_wf.ship", JobStatus.WAITING, (1,)),
            ("docs_wf.pay", JobStatus.QUEUED, ()),
            ("docs_wf.ship", JobStatus.WAITING, (3,)),
        ]
    finally:
        eq.sync.close()


def mistakes() -> list[tuple[str, str, str]]:
    """The rows of the Mistakes table: (call, error class, message start)."""
    section = TEXT.split("## Mistakes", 1)[1]
    rows = re.findall(r"^\| `(.+?)` \| `(\w+)`: (.+?) \|$", section, re.M)
    assert len(rows) == 10
    return rows


@pytest.mark.parametrize(("call", "error", "message"), mistakes())
def test_each_mistake_raises_as_the_doc_says(call: str, error: str, message: str) -> None:
    eq = Soniq("memory://")

    @eq.job
    async def job() -> None: ...

    @eq.job
    async def resize(path: str) -> None: ...

    namespace: dict[str, Any] = {
        "enqueue": eq.sync.enqueue,
        "enqueue_group": eq.sync.enqueue_group,
        "wait_for": eq.sync.wait_for,
        "job": job,
        "resize": resize,
        "current_job": lambda: JobContext(1, "job", "default", 1, 0, None, "w"),
    }
    try:
        with pytest.raises(Exception) as caught:
            eval(call, namespace)
        assert type(caught.value).__name__ == error
        assert " ".join(message.split()) in " ".join(str(caught.value).split())
    finally:
        eq.sync.close()


def test_wait_for_on_many_backends_returns_what_the_doc_table_says() -> None:
    # (The table's rows beyond JobFailed are asserted in tests/test_workflows.py.)
    assert "JobCancelled" in TEXT and "JobNotFound" in TEXT and "TimeoutError" in TEXT
    assert asyncio.iscoroutinefunction(Soniq.wait_for)
