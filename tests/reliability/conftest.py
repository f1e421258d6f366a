"""The fault matrix (``nox -s reliability``): real worker processes, a PostgreSQL
cluster of its own that the tests restart and crash, a fault-injecting proxy, a
stateful model check and a soak. ``nox -s tests`` does not collect this directory.

Every test here carries the ``reliability`` marker. Figures (jobs, kills, reruns,
times) are collected with :func:`report` and printed at the end of the run under
"reliability figures"; ``SONIQ_RELIABILITY_FIGURES=path.json`` also writes them there.
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


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
