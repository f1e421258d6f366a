"""docs/operations.md, checked: its Python example runs on ``memory://``, an SQLite
file and PostgreSQL, and every command of its console block parses and runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from soniq.cli import main
from tests.test_flow_docs import database

__all__ = ["database"]  # a fixture, used by name

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
TEXT = DOC.read_text()
[EXAMPLE] = re.findall(r"```python\n(.*?)```", TEXT, re.S)
[CONSOLE] = re.findall(r"```console\n(.*?)```", TEXT, re.S)


def test_the_example_runs(database: str) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_ops", "DATABASE_URL": database}
    exec(compile(EXAMPLE, str(DOC), "exec"), namespace)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_every_command_of_the_console_block_runs(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [shlex.split(line[2:]) for line in CONSOLE.splitlines() if line.startswith("$ ")]
    assert len(commands) == 13
    for argv in commands:
        assert argv[0] == "soniq"
        if "--watch" in argv:  # until Ctrl-C: here, once
            argv.remove("--watch")
            argv.remove("5")
        status = main([*argv[1:], "--database-url", database])
        out = capsys.readouterr()
        # The jobs named do not exist in an empty database: "left as it was" (1) is
        # the answer of retry and cancel there, and of job without --wait.
        quiet = ("jobs", "queues", "purge", "workers", "stats")
        expected = {0} if argv[1] in quiet else {0, 1, 124}
        assert status in expected, (argv, out)
        assert "Traceback" not in out.err, (argv, out.err)
