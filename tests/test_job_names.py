"""A job's default name is the one a worker finds it under (issue 13, item 8): in a
script run as ``python app.py`` that is ``app.<function>``, because ``soniq worker
app:eq`` imports the script as ``app``. Only a job with no importable name (inside a
function, typed at a REPL, ``python -c``) must be named by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    import sys
    from soniq import Soniq

    eq = Soniq("sqlite:///jobs.db")

    @eq.job
    def hello(who: str) -> str:
        return f"hello {who}"

    if __name__ == "__main__":
        eq.sync.ensure_initialized()
        job_id = eq.sync.enqueue(hello, who="world")
        print(eq.sync.get_job(job_id).name)
    """
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_a_script_names_its_jobs_as_the_worker_imports_them(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    enqueued = _run([sys.executable, "app.py"], tmp_path)
    assert enqueued.returncode == 0, enqueued.stderr
    assert enqueued.stdout.strip() == "app.hello"

    worker = _run([sys.executable, "-m", "soniq", "worker", "app:eq", "--burst"], tmp_path)
    assert worker.returncode == 0, worker.stderr
    check = _run(
        [
            sys.executable,
            "-c",
            "from app import eq; j = eq.sync.get_job(1); print(j.status.value, j.result)",
        ],
        tmp_path,
    )
    assert check.stdout.split() == ["done", "hello", "world"], check.stderr


@pytest.mark.slow
def test_python_dash_m_names_jobs_by_the_module(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "app.py").write_text(APP)
    enqueued = _run([sys.executable, "-m", "pkg.app"], tmp_path)
    assert enqueued.returncode == 0, enqueued.stderr
    assert enqueued.stdout.strip() == "pkg.app.hello"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "where"),
    [
        # No file: python -c (a REPL is the same case).
        (
            "from soniq import Soniq\neq = Soniq('memory://')\n@eq.job\ndef f(): pass\n",
            "in __main__ with no importable name",
        ),
        # A script, but the function is inside another one.
        (
            "from soniq import Soniq\neq = Soniq('memory://')\n"
            "def outer():\n    @eq.job\n    def inner(): pass\nouter()\n",
            "inside a function",
        ),
    ],
)
def test_no_importable_name_is_refused_with_the_fix(tmp_path: Path, code: str, where: str) -> None:
    if "outer" in code:
        (tmp_path / "script.py").write_text(code)
        done = _run([sys.executable, "script.py"], tmp_path)
    else:
        done = _run([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 1
    assert f"is defined {where}" in done.stderr
    assert "@eq.job(name='...')" in done.stderr
