"""``soniq check`` and ``eq.check_backlog``: the jobs waiting in the database that the
code at hand would fail, named before a deploy, on every backend."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from soniq import BacklogProblem, Soniq
from soniq.cli import main
from tests.test_conformance import Face, face

__all__ = ["face"]  # a fixture, used by name


async def _enqueue_backlog(face: Face) -> dict[str, int]:
    """Jobs of the old code, waiting: some fit the new code (check_app), some not."""
    ids = {}
    ids["fits"] = await face.enqueue("check.send", to="a", subject="s")
    await face.enqueue("check.send", to="b", subject="s", body="x", delay=600)  # fits too
    ids["missing"] = await face.enqueue("check.send", to="c", delay=60)  # scheduled
    await face.enqueue("check.send", to="d")
    ids["unexpected"] = await face.enqueue("check.send", to="e", subject="s", cc="f")
    ids["unknown"] = await face.enqueue("check.old_job", n=1)
    ids["waiting"] = await face.enqueue("check.old_job", n=2, depends_on=[ids["fits"]])
    await face.enqueue("check.ping", anything=1)  # **extra takes any argument
    gone = await face.enqueue("check.gone")  # cancelled: not waiting to run
    await face.cancel(gone)
    return ids


def send(to: str, subject: str, body: str = "") -> None: ...


async def ping(**extra: object) -> None: ...


async def test_check_backlog_names_what_the_code_would_fail(face: Face) -> None:
    eq = face.eq
    ids = await _enqueue_backlog(face)
    # The new code (as tests/check_app.py), registered on this database's Soniq.
    eq.job(name="check.send")(send)
    eq.job(name="check.ping")(ping)
    problems = eq.sync.check_backlog() if face.sync else await eq.check_backlog()
    assert problems == [
        BacklogProblem(
            "check.old_job",
            ("n",),
            2,
            ids["unknown"],
            "no job of this name in the code (a worker would not claim it)",
        ),
        BacklogProblem(
            "check.send",
            ("cc", "subject", "to"),
            1,
            ids["unexpected"],
            "unexpected argument(s) cc; it accepts body, subject, to",
        ),
        BacklogProblem(
            "check.send", ("to",), 2, ids["missing"], "missing required argument(s) subject"
        ),
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_soniq_check_exits_1_naming_each_problem_and_0_when_all_fit(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("database_url")
        monkeypatch.setenv("SONIQ_CHECK_SCHEMA", request.getfixturevalue("schema"))
    monkeypatch.setenv("SONIQ_CHECK_DATABASE_URL", url)
    sys.modules.pop("tests.check_app", None)
    import tests.check_app as code

    old = Soniq(url, schema=os.environ.get("SONIQ_CHECK_SCHEMA", "public"))
    try:
        old.sync.ensure_initialized()
        missing = old.sync.enqueue("check.send", to="c")
        old.sync.enqueue("check.send", to="a", subject="s")
    finally:
        old.sync.close()

    assert main(["check", "tests.check_app:eq"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "soniq check: 1 kind(s) of waiting job would fail with this code:",
        f"  check.send (1 job(s), oldest {missing}) with arguments (to): "
        "missing required argument(s) subject",
    ]
    assert main(["check", "tests.check_app:eq", "--json"]) == 1
    [shown] = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["arguments"], shown["jobs"]) == ("check.send", ["to"], 1)

    code.eq.sync.cancel_job(missing)
    code.eq.sync.close()
    assert main(["check", "tests.check_app:eq"]) == 0
    assert capsys.readouterr().out == "soniq check: every job waiting to run fits the code\n"
    with pytest.raises(SystemExit, match="soniq check: expected module:attribute"):
        main(["check", "tests.check_app"])
