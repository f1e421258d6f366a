"""``soniq.contrib.flask`` on real PostgreSQL: SoniqFlask built from ``app.config`` or
wrapping a Soniq, jobs run inside an app context (sync jobs in their thread, async
jobs in their task, a fresh ``g`` each, teardown told the job's error), the ``flask
soniq`` commands, and the example app of ``examples/flask_app`` end to end (a request
that enqueues, one that fails after enqueueing, ``flask soniq worker --burst``)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask, current_app, g

from soniq import ConfigurationError, JobStatus, Soniq
from soniq.contrib.flask import SoniqFlask
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)

EXAMPLE = ROOT / "examples" / "flask_app"
FLASK = Path(sys.executable).parent / "flask"


# -- configuration --------------------------------------------------------------------


def test_the_soniq_is_built_from_app_config(database_url: str, schema: str) -> None:
    app = Flask("configured")
    app.config.update(
        SONIQ_DATABASE_URL=database_url,
        SONIQ_DRIVER="psycopg",
        SONIQ_SCHEMA=schema,
        SONIQ_POOL_SIZE=3,
        SONIQ_CONNECT_TIMEOUT=2,
        SONIQ_ACQUIRE_TIMEOUT=4,
    )
    ext = SoniqFlask(app)
    eq = app.extensions["soniq"]
    assert isinstance(eq, Soniq)
    assert ext.eq is eq
    assert f"schema={schema!r}" in repr(eq) and "driver='psycopg'" in repr(eq)
    cfg = eq._config
    assert (cfg.pool_size, cfg.connect_timeout, cfg.acquire_timeout) == (3, 2.0, 4.0)
    # And it works: migrate, enqueue, read back.
    eq.sync.ensure_initialized()
    try:

        @eq.job(name="configured.noop")
        def noop() -> None:
            pass

        job_id = eq.sync.enqueue(noop)
        job = eq.sync.get_job(job_id)
        assert job is not None and job.status is JobStatus.QUEUED
    finally:
        eq.sync.close()


def test_a_bad_config_value_is_a_configuration_error_naming_it() -> None:
    app = Flask("bad")
    app.config.update(SONIQ_DATABASE_URL="postgresql://localhost/x", SONIQ_POOL_SIZE=0)
    with pytest.raises(ConfigurationError, match="pool_size"):
        SoniqFlask(app)
    assert "soniq" not in app.extensions


def test_app_factory_with_a_soniq_made_at_import_time(sync_eq: Soniq) -> None:
    ext = SoniqFlask(eq=sync_eq)  # before any app exists
    assert ext.eq is sync_eq
    first, second = Flask("first"), Flask("second")
    ext.init_app(first)
    ext.init_app(second)
    assert first.extensions["soniq"] is sync_eq and second.extensions["soniq"] is sync_eq
    assert ext.eq is sync_eq
    with pytest.raises(RuntimeError, match="already set up"):
        ext.init_app(first)
    # SONIQ_* keys would be ignored beside eq=: refused, naming them.
    configured = Flask("configured")
    configured.config["SONIQ_SCHEMA"] = "elsewhere"
    with pytest.raises(ConfigurationError, match="SONIQ_SCHEMA"):
        ext.init_app(configured)
    with pytest.raises(TypeError, match=r"soniq\.Soniq"):
        SoniqFlask(eq="postgresql://localhost/x")  # type: ignore[arg-type]


def test_eq_of_an_extension_without_eq_is_the_current_apps(database_url: str) -> None:
    ext = SoniqFlask()
    with pytest.raises(RuntimeError, match="no Flask app"):
        _ = ext.eq
    apps = [Flask(f"app{i}") for i in range(2)]
    for i, app in enumerate(apps):
        app.config.update(SONIQ_DATABASE_URL=database_url, SONIQ_SCHEMA=f"s{i}")
        ext.init_app(app)
    assert apps[0].extensions["soniq"] is not apps[1].extensions["soniq"]
    with pytest.raises(RuntimeError, match="several apps"):
        _ = ext.eq
    for app in apps:
        with app.app_context():
            assert ext.eq is app.extensions["soniq"]


# -- jobs run inside an app context ---------------------------------------------------


def test_jobs_run_inside_a_fresh_app_context_sync_and_async(sync_eq: Soniq) -> None:
    app = Flask("contexts")
    seen: list[tuple[str, Any, bool, str]] = []
    teardowns: list[BaseException | None] = []

    @app.teardown_appcontext
    def teardown(error: BaseException | None) -> None:
        teardowns.append(error)

    @sync_eq.job(name="ctx.sync_job", max_retries=0)
    def sync_job(n: int) -> None:
        seen.append(
            ("sync", current_app._get_current_object(), "n" in g, threading.current_thread().name)
        )
        g.n = n  # a later run must not see it
        if n < 0:
            raise ValueError("bad n")

    @sync_eq.job(name="ctx.async_job")
    async def async_job(n: int) -> None:
        seen.append(("async", current_app._get_current_object(), "n" in g, "loop"))
        g.n = n
        await asyncio.sleep(0)  # another job's context may run meanwhile
        assert g.n == n

    SoniqFlask(app, eq=sync_eq)
    for n in (1, 2):
        sync_eq.sync.enqueue(sync_job, n=n)
        sync_eq.sync.enqueue(async_job, n=n)
    failed = sync_eq.sync.enqueue(sync_job, n=-1)
    sync_eq.sync.run_worker(burst=True, concurrency=4)

    assert len(seen) == 5
    assert all(found is app for _, found, _, _ in seen)
    assert not any(had_n for _, _, had_n, _ in seen), "g leaked from one run to another"
    sync_threads = {thread for kind, _, _, thread in seen if kind == "sync"}
    assert threading.current_thread().name not in sync_threads  # they ran in threads
    # One teardown per run; the failed run's teardown saw its exception.
    assert len(teardowns) == 5
    errors = [e for e in teardowns if e is not None]
    assert len(errors) == 1 and str(errors[0]) == "bad n"
    job = sync_eq.sync.get_job(failed)
    assert job is not None and job.status is JobStatus.FAILED


def test_jobs_run_in_the_context_of_the_latest_app(sync_eq: Soniq) -> None:
    ran_in: list[str] = []

    @sync_eq.job(name="ctx.which_app")
    def which_app() -> None:
        ran_in.append(current_app.name)

    ext = SoniqFlask(eq=sync_eq)
    torn_down: list[str] = []
    for name in ("old", "new"):
        app = Flask(name)
        app.teardown_appcontext(lambda error, name=name: torn_down.append(name))
        ext.init_app(app)
    del app  # held by the Soniq alone, as by a worker that made it and forgot it
    sync_eq.sync.enqueue(which_app)
    sync_eq.sync.run_worker(burst=True)
    assert ran_in == ["new"]
    assert torn_down == ["new"]  # one context pushed: not one per init_app


# -- flask soniq ... -----------------------------------------------------------------


def test_flask_soniq_commands_use_the_apps_soniq(sync_eq: Soniq, schema: str) -> None:
    app = Flask("cli")
    ran: list[int] = []

    @sync_eq.job(name="cli.record", queue="cli")
    def record(n: int) -> None:
        ran.append(n)

    SoniqFlask(app, eq=sync_eq)
    runner = app.test_cli_runner()

    result = runner.invoke(args=["soniq", "migrate", "--sql"])
    assert result.exit_code == 0, result.output
    assert f'"{schema}".' in result.output and '"public".' not in result.output

    result = runner.invoke(args=["soniq", "migrate"])
    assert result.exit_code == 0, result.output
    assert f"schema {schema!r}" in result.output

    job_id = sync_eq.sync.enqueue(record, n=7)
    result = runner.invoke(args=["soniq", "jobs", "--json", "--queue", "cli"])
    assert result.exit_code == 0, result.output
    assert [j["id"] for j in json.loads(result.output)] == [job_id]

    # Positional arguments after the command's own (the app is added last).
    result = runner.invoke(args=["soniq", "queues", "pause", "cli"])
    assert result.exit_code == 0, result.output
    assert sync_eq.sync.paused_queues() == ["cli"]
    result = runner.invoke(args=["soniq", "queues", "resume", "cli"])
    assert result.exit_code == 0 and sync_eq.sync.paused_queues() == []

    result = runner.invoke(args=["soniq", "check"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(args=["soniq", "worker", "--burst", "--burst-wait", "0"])
    assert result.exit_code == 0, result.output
    assert ran == [7]
    job = sync_eq.sync.get_job(job_id)
    assert job is not None and job.status is JobStatus.DONE

    result = runner.invoke(args=["soniq", "job", str(job_id), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["status"] == "done"

    # soniq's own errors and exit statuses come through.
    result = runner.invoke(args=["soniq", "job", "999999"])
    assert result.exit_code == 1
    result = runner.invoke(args=["soniq", "jobs", "--limit", "many"])
    assert result.exit_code == 2

    result = runner.invoke(args=["soniq", "--help"])
    assert result.exit_code == 0
    for name in ("worker", "migrate", "jobs", "queues", "retry", "cancel", "purge", "check"):
        assert name in result.output


# -- the example app -----------------------------------------------------------------


def _flask(env: dict[str, str], *args: str) -> str:
    """``flask --app shop ARGS...`` in the example's directory; its output (must exit 0)."""
    done = subprocess.run(
        [str(FLASK), "--app", "shop", *args],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"flask {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def shop(fresh_database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's ``shop`` package, imported on ``fresh_database``."""
    monkeypatch.setenv(
        "DATABASE_URL", fresh_database.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
        del sys.modules[name]
    module = importlib.import_module("shop")
    yield module
    module.jobs.eq.sync.close()
    for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
        del sys.modules[name]


@pytest.mark.slow
def test_example_app_enqueues_with_the_order_and_its_worker_runs_it(
    shop: Any, fresh_database: str
) -> None:
    env = os.environ.copy()
    # The commands of its README: the shop's table, Soniq's tables.
    _flask(env, "init-db")
    assert "is at version" in _flask(env, "soniq", "migrate")

    app = shop.create_app()
    client = app.test_client()
    created = client.post("/orders", json={"email": "ada@example.com", "quantity": 2})
    assert created.status_code == 201, created.text
    order_id = created.json["order_id"]
    refused = client.post("/orders", json={"email": "bob@example.com", "quantity": 50})
    assert refused.status_code == 422

    with psycopg.connect(fresh_database, autocommit=True) as conn:
        orders = conn.execute("SELECT id, email FROM shop_orders ORDER BY id").fetchall()
        jobs = conn.execute("SELECT name, args, status FROM soniq_jobs ORDER BY id").fetchall()
    # The refused order rolled back, and its job with it.
    assert orders == [(order_id, "ada@example.com")]
    assert jobs == [("shop.jobs.send_confirmation", {"order_id": order_id}, "queued")]
    assert client.get(f"/orders/{order_id}").json["confirmed"] is False

    output = _flask(env, "soniq", "worker", "--burst", "--burst-wait", "0")
    assert client.get(f"/orders/{order_id}").json["confirmed"] is True, output
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert conn.execute("SELECT status FROM soniq_jobs").fetchall() == [("done",)]


@pytest.mark.slow
def test_example_app_with_drain_in_an_app_context_as_docs_flask_md_shows(
    shop: Any, fresh_database: str
) -> None:
    from soniq.testing import drain

    _flask(os.environ.copy(), "init-db")
    shop.jobs.eq.sync.ensure_initialized()
    app = shop.create_app()
    client = app.test_client()
    ada = {"email": "ada@example.com", "quantity": 2}
    order_id = client.post("/orders", json=ada).json["order_id"]
    refused = client.post("/orders", json={"email": "bob@example.com", "quantity": 50})
    assert refused.status_code == 422
    with app.app_context():
        assert drain(shop.jobs.eq.sync).done == 1
        order = shop.models.db.session.get(shop.models.Order, order_id)
        assert order is not None and order.confirmed


# -- what the package promises ---------------------------------------------------------

_PROBE = """
import sys
import soniq, soniq.cli, soniq.testing
web = {"flask", "fastapi", "starlette", "click"}
print(",".join(sorted({m.split(".")[0] for m in sys.modules} & web)) or "none")
"""


def test_import_soniq_loads_no_web_framework() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "none", out.stderr


def test_docs_flask_md_shows_the_example_as_it_is() -> None:
    from tests.test_fastapi import check_excerpts

    assert check_excerpts(ROOT / "docs" / "flask.md") >= 3
