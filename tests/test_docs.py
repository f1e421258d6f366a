"""The documentation site: every Python block of docs/ and README.md either runs in a
test (here, or in the test of its page) or says why it does not, and the API
reference lists every public name."""

from __future__ import annotations

import logging
import os
import re
import runpy
import shlex
from pathlib import Path
from typing import Any

import pytest

import soniq
import soniq.testing
from soniq.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(
    r"(?:<!-- not run: (?P<reason>[^>]+?) -->\n)?```(?P<kind>python|console)\n(?P<code>.*?)```",
    re.S,
)

#: Pages whose blocks a test of their own runs (that test reads the page).
OWN_TESTS = {
    "flow-control.md": "test_flow_docs.py",
    "operations.md": "test_operations_docs.py",
    "workflows.md": "test_workflow_docs.py",
    "metrics.md": "test_metrics_docs.py",
    "testing.md": "test_testing.py",
    "periodic.md": "test_schedules.py",
    "worker.md": "test_behaviour.py",
    "dashboard.md": "test_dashboard.py",
    "django.md": "test_django_docs.py",
    "flask.md": "test_flask.py",
    "fastapi.md": "test_fastapi.py",
}
#: Pages whose blocks run here, in order, in one namespace.
RUN_HERE = ("tutorial.md", "scripts.md", "pgbouncer.md")


def _pages() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


def _blocks(page: Path, kind: str = "python") -> list[tuple[str | None, str]]:
    found = BLOCK.finditer(page.read_text())
    return [(m["reason"], m["code"]) for m in found if m["kind"] == kind]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_python_and_console_block_runs_or_says_why_not(page: Path) -> None:
    blocks = _blocks(page) + _blocks(page, "console")
    if not blocks:
        return
    if page.name in OWN_TESTS:
        test = ROOT / "tests" / OWN_TESTS[page.name]
        assert test.is_file(), f"{page.name}: its test {test.name} is missing"
        assert page.name in test.read_text(), f"{test.name} does not read {page.name}"
        return
    if page.name in RUN_HERE:
        return
    unmarked = [code.splitlines()[0] for reason, code in blocks if not reason]
    assert not unmarked, (
        f"{page.name}: blocks that no test runs and that do not say why "
        f"(<!-- not run: reason --> before the block): {unmarked}"
    )


def _run(page: str, namespace: dict[str, Any]) -> None:
    path = DOCS / page
    for reason, code in _blocks(path):
        if reason is None:
            exec(compile(code, str(path), "exec"), namespace)


def _run_commands(page: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Each ``$ soniq ...`` line of the page's console blocks not marked: what it
    printed (each must exit 0)."""
    printed = []
    for reason, code in _blocks(DOCS / page, "console"):
        for line in code.splitlines():
            if reason is None and line.startswith("$ "):
                argv = shlex.split(line[2:])
                assert argv[0] == "soniq", line
                assert main(argv[1:]) == 0, line
                printed.append(capsys.readouterr().out)
    return printed


def test_the_tutorial_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the default database (soniq.db in the working directory), as a reader
    who pastes each block in turn into one module."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    _run("tutorial.md", {"__name__": "jobs"})
    assert (tmp_path / "soniq.db").is_file()
    jobs, job = _run_commands("tutorial.md", capsys)
    assert "jobs.greet" in jobs and "jobs.flaky" in jobs
    assert "Hello, Ada!" in job


def test_the_scripts_guide_runs_as_written(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    namespace: dict[str, Any] = {"__name__": "myapp.jobs", "os": os}
    _run("scripts.md", namespace)
    eq = soniq.Soniq(fresh_database)
    try:  # the job of the committed transaction is there, and ran
        jobs = eq.sync.list_jobs(name="myapp.jobs.build_report")
        assert len(jobs) == 2 and {j.status.value for j in jobs} == {"done"}
    finally:
        eq.sync.close()


def test_the_pgbouncer_page_runs_as_written() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_pgbouncer"}
    _run("pgbouncer.md", namespace)  # a Soniq does no I/O until used
    assert namespace["eq"].backend.prepared_statements is False


def _public(module: Any) -> set[str]:
    return {f"{module.__name__}.{n}" for n in module.__all__ if not n.startswith("__")}


def test_the_reference_lists_every_public_name() -> None:
    import soniq.contrib.fastapi
    import soniq.contrib.flask
    import soniq.contrib.otel
    import soniq.contrib.prometheus
    import soniq.contrib.starlette

    listed = set(re.findall(r"^::: (\S+)$", (DOCS / "reference.md").read_text(), re.M))
    public = _public(soniq) | _public(soniq.testing)
    for module in (
        soniq.contrib.prometheus,
        soniq.contrib.otel,
        soniq.contrib.flask,
        soniq.contrib.starlette,
    ):
        public |= _public(module)
    # soniq.contrib.fastapi re-exports the starlette module's names beside its own.
    public |= _public(soniq.contrib.fastapi) - {
        f"soniq.contrib.fastapi.{n}" for n in soniq.contrib.starlette.__all__
    }
    assert not public - listed


def test_the_demo_of_the_readme_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nox -s demo` runs examples/demo.py: no server, a worker, a retried job."""
    monkeypatch.chdir(tmp_path)
    soniq_log = logging.getLogger("soniq")
    level = soniq_log.level
    try:
        runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    finally:
        soniq_log.setLevel(level)  # the demo quiets Soniq's log: not for the next tests
    out = capsys.readouterr().out
    assert "flaky job: done after 2 attempts" in out and "Summary: 5001 jobs" in out
