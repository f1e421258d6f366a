"""The fault matrix (``nox -s reliability``): real worker processes, a PostgreSQL
cluster of its own that the tests restart and crash, a fault-injecting proxy, a
stateful model check and a soak.

Every test here carries the ``reliability`` marker, except those of ``FAST_FILES``
(the bad-input matrix: quick, no processes, so it stays in the default run too). A
run that did not ask for them deselects the marked tests: they run when a path given
to pytest is in this directory (``pytest tests/reliability``, which is what
``nox -s reliability`` does), when ``-m`` names the marker, or with
``SONIQ_RELIABILITY=1``. So ``nox -s tests`` and a plain ``pytest`` stay quick.

Figures (jobs, kills, reruns, times) are collected with :func:`report` and printed at
the end of the run under "reliability figures"; ``SONIQ_RELIABILITY_FIGURES=path.json``
also writes them there. ``SONIQ_SOAK_JOBS`` sizes the soak (100,000 by default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.reliability.pgcluster import Cluster, cluster

FIGURES: dict[str, dict[str, Any]] = {}


def report(test: str, **figures: Any) -> None:
    """Record figures of one test, printed in the terminal summary."""
    FIGURES.setdefault(test, {}).update(figures)
    print(f"[reliability] {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reliability: the fault matrix (real processes, restarts, faults, soak); "
        "run by `nox -s reliability`, not by `nox -s tests`",
    )


HERE = Path(__file__).resolve().parent
#: Files here that are quick and need no process or cluster of their own: not marked,
#: so the default run keeps them.
FAST_FILES = frozenset({"test_bad_input_matrix.py"})


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get("SONIQ_RELIABILITY") == "1":
        return True
    if "reliability" in (config.option.markexpr or ""):
        return True
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = []
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if HERE in path.parents and path.name not in FAST_FILES:
            item.add_marker(pytest.mark.reliability)
            marked.append(item)
    if marked and not _asked_for(config):
        config.hook.pytest_deselected(items=marked)
        keep = {id(item) for item in marked}
        items[:] = [item for item in items if id(item) not in keep]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, figures in FIGURES.items():
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("SONIQ_RELIABILITY_FIGURES")
    if path:
        Path(path).write_text(json.dumps(FIGURES, indent=2, default=str) + "\n")


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of the run's own, which tests may stop, restart and crash (never the
    shared server of ``SONIQ_TEST_DATABASE_URL``)."""
    with cluster(tmp_path_factory.mktemp("pgf")) as made:
        yield made


@pytest.fixture
def cluster_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database on the run's own cluster; the server is running again after
    the test whatever the test did to it."""
    pg_cluster.ensure_running()
    name = f"rel_{os.urandom(4).hex()}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_cluster.url.rsplit("/", 1)[0] + f"/{name}"
    pg_cluster.ensure_running()
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
