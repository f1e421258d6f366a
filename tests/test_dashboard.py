"""The web dashboard over HTTP (``soniq.dashboard.app``), on PostgreSQL and SQLite:
every page renders (an empty database too), user data is escaped, paging is keyset,
each action changes the database, and the guards hold: read-only mode, CSRF tokens,
the auth hook, basic auth. ``tests/test_dashboard_browser.py`` clicks through the
same pages in a real browser."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.requests import Request

import soniq.dashboard
from soniq import JobStatus, Soniq
from tests.conftest import ROOT, Process, new_soniq
from tests.throwaway_pg import free_port

pytestmark = pytest.mark.timeout(90)

#: What a job's arguments and its error hold: the page must show them as text.
ARG_XSS = '<script>alert("args")</script>'
ERROR_XSS = "<script>alert('error')</script>"


def register(eq: Soniq) -> tuple[Any, Any]:
    """The test's jobs on ``eq``: ``dash.ok`` returns its text, ``dash.boom`` fails
    at once with an error that quotes its text. Registered once per ``eq``."""
    known = getattr(eq, "_dashboard_test_jobs", None)
    if known is not None:
        return known  # type: ignore[no-any-return]

    @eq.job(name="dash.ok")
    def ok(text: str) -> str:
        return text.upper()

    @eq.job(name="dash.boom", max_retries=0)
    def boom(text: str) -> None:
        raise ValueError(f"{ERROR_XSS} for {text}")

    eq._dashboard_test_jobs = (ok, boom)  # type: ignore[attr-defined]
    return ok, boom


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client of ``app`` in this event loop (no server, no lifespan: the
    dashboard opens ``eq`` on its first page)."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", **kwargs
    )


def csrf_token(html: str) -> str:
    """The CSRF token of a page's action forms."""
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert found, "the page has no action form"
    return found.group(1)


def row_ids(html: str) -> list[int]:
    """The job ids of the jobs table, in order."""
    return [int(i) for i in re.findall(r'<tr data-id="(\d+)"', html)]


@pytest.fixture(params=["asyncpg", "sqlite"])
async def eq(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Soniq]:
    """A migrated Soniq on PostgreSQL (this test's schema) or a SQLite file."""
    app = new_soniq(request.param, request, tmp_path)
    await app.ensure_initialized()
    yield app
    await app.close()


async def finished_jobs(eq: Soniq) -> tuple[int, int]:
    """One done job and one failed job (run by a burst worker): their ids."""
    ok, boom = register(eq)
    done = await eq.enqueue(ok, text="fine")
    failed = await eq.enqueue(boom, text=ARG_XSS)
    await eq.run_worker(burst=True, burst_wait=0)
    return done, failed


# -- pages ----------------------------------------------------------------------------


async def test_every_page_renders_on_an_empty_database(eq: Soniq) -> None:
    async with client(soniq.dashboard.app(eq)) as http:
        overview = await http.get("/")
        assert overview.status_code == 200
        assert 'id="no-queues"' in overview.text and "No worker is running" in overview.text
        assert 'id="chart-throughput"' in overview.text and "<rect" not in overview.text
        jobs = await http.get("/jobs")
        assert jobs.status_code == 200 and 'id="no-jobs"' in jobs.text
        assert 'id="next-page"' not in jobs.text
        workers = await http.get("/workers")
        assert workers.status_code == 200 and 'id="no-workers"' in workers.text
        missing = await http.get("/jobs/1")
        assert missing.status_code == 404 and "No job has id 1." in missing.text
        assert (await http.get("/jobs/x")).status_code == 404
        assert (await http.get("/nowhere")).status_code == 404


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sqlite"])
async def test_pages_show_jobs_and_escape_their_arguments_and_errors(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    eq = new_soniq(kind, request, tmp_path)
    await eq.ensure_initialized()
    try:
        done, failed = await finished_jobs(eq)
        async with client(soniq.dashboard.app(eq)) as http:
            pages = {
                path: await http.get(path)
                for path in ("/", "/jobs", f"/jobs/{done}", f"/jobs/{failed}", "/workers")
            }
    finally:
        await eq.close()
    for path, page in pages.items():
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        # The one script of a page is the dashboard's own, with this response's nonce.
        assert page.text.count("<script") == 1, path
        nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"])
        assert nonce and f'<script nonce="{nonce.group(1)}">' in page.text
        assert "<script>alert" not in page.text, path
    detail = pages[f"/jobs/{failed}"].text
    assert "&lt;script&gt;alert(&#34;args&#34;)&lt;/script&gt;" in detail  # arguments
    assert "&lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;" in detail  # error
    assert 'id="job-traceback"' in detail and "ValueError" in detail
    assert 'id="job-status">failed<' in detail and "1 of 1" in detail
    assert "&lt;script&gt;alert(&#39;error&#39;)" in pages["/jobs"].text  # the error column
    assert "&#34;FINE&#34;" in pages[f"/jobs/{done}"].text  # the result
    timeline = pages[f"/jobs/{done}"].text.split('id="timeline"')[1].split("</ol>")[0]
    assert [m for m in ("created", "started", "ended") if f"<strong>{m}</strong>" in timeline] == [
        "created",
        "started",
        "ended",
    ]
    overview = pages["/"].text
    assert re.search(r"Throughput: 1 done", overview)
    assert re.search(r"Failures: 1 failed, 0 cancelled", overview)
    assert "1 done</title>" in overview and "1 failed, 0 cancelled</title>" in overview
    # Read-only by default: no form to act with.
    assert 'id="retry"' not in detail and 'method="post"' not in detail + overview


async def test_overview_shows_queue_depths_paused_queues_and_limits(eq: Soniq) -> None:
    ok, _ = register(eq)
    await eq.enqueue_many(ok, [{"text": str(n)} for n in range(3)], queue="mail")
    await eq.enqueue(ok, text="later", queue="mail", delay=3600)
    await eq.enqueue(ok, text="x", queue="reports")
    await eq.pause_queue("reports")
    await eq.set_queue_limits("mail", concurrency=2, rate_limit="10/s")
    async with client(soniq.dashboard.app(eq)) as http:
        page = (await http.get("/")).text
        one_queue = await http.get("/?queue=mail&minutes=15")
        bad_window = await http.get("/?minutes=0")
    rows = dict(re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', page, re.S))
    assert set(rows) == {"mail", "reports"}
    mail = re.findall(r'<td class="num">([^<]*)</td>', rows["mail"])
    assert mail[:3] == ["3", "1", "0"]  # ready, scheduled, running
    assert "2 at once" in rows["mail"] and "10/s" in rows["mail"]
    assert "badge paused" in rows["reports"] and "badge paused" not in rows["mail"]
    assert 'id="total-queued">4<' in page
    assert one_queue.status_code == 200 and '<option value="mail" selected>' in one_queue.text
    assert bad_window.status_code == 400


async def test_jobs_are_paged_by_keyset_and_filtered(eq: Soniq) -> None:
    ok, boom = register(eq)
    ids = await eq.enqueue_many(ok, [{"text": str(n)} for n in range(7)])
    failed = await eq.enqueue(boom, text="x", queue="other")
    await eq.run_worker(queues=["other"], burst=True, burst_wait=0)
    seen: list[int] = []
    async with client(soniq.dashboard.app(eq)) as http:
        url: str | None = "/jobs?status=queued&limit=3"
        pages = 0
        while url is not None:
            page = (await http.get(url)).text
            pages += 1
            seen += row_ids(page)
            found = re.search(r'href="([^"]+)" id="next-page"', page)
            url = found.group(1).replace("&amp;", "&") if found else None
            if url is not None:
                assert "status=queued" in url and "limit=3" in url  # filters kept
                assert f"before_id={seen[-1]}" in url
        assert pages == 3 and seen == sorted(ids, reverse=True)
        second = await http.get(f"/jobs?status=queued&limit=3&before_id={ids[4]}")
        assert row_ids(second.text) == [ids[3], ids[2], ids[1]]
        assert 'id="first-page"' in second.text
        assert row_ids((await http.get("/jobs?status=failed")).text) == [failed]
        assert row_ids((await http.get("/jobs?queue=other")).text) == [failed]
        assert row_ids((await http.get("/jobs?name=dash.boom")).text) == [failed]
        assert row_ids((await http.get("/jobs?name=dash.nothing")).text) == []
        for bad in ("status=bogus", "limit=0", "limit=501", "limit=x", "before_id=-1"):
            response = await http.get(f"/jobs?{bad}")
            assert response.status_code == 400, bad


# -- actions and their guards ---------------------------------------------------------


async def test_each_action_changes_the_database(eq: Soniq) -> None:
    done, failed = await finished_jobs(eq)
    ok, _ = register(eq)
    queued = await eq.enqueue(ok, text="wait", queue="mail")
    async with client(soniq.dashboard.app(eq, actions=True)) as http:
        page = await http.get(f"/jobs/{failed}")
        token = csrf_token(page.text)
        assert 'id="retry"' in page.text and 'id="cancel"' not in page.text

        retried = await http.post(f"/jobs/{failed}/retry", data={"csrf_token": token})
        assert retried.status_code == 303
        assert retried.headers["location"] == f"/jobs/{failed}?notice=retried&id={failed}"
        job = await eq.get_job(failed)
        assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 0
        shown = await http.get(retried.headers["location"])
        assert f"Job {failed} was put back in line." in shown.text
        again = await http.post(f"/jobs/{done}/retry", data={"csrf_token": token})
        assert "notice=not-retried" in again.headers["location"]

        cancel_page = await http.get(f"/jobs/{queued}")
        assert 'id="cancel"' in cancel_page.text
        cancelled = await http.post(f"/jobs/{queued}/cancel", data={"csrf_token": token})
        assert "notice=cancelled" in cancelled.headers["location"]
        job = await eq.get_job(queued)
        assert job is not None and job.status is JobStatus.CANCELLED
        again = await http.post(f"/jobs/{queued}/cancel", data={"csrf_token": token})
        assert "notice=not-cancelled" in again.headers["location"]

        paused = await http.post("/queues/pause", data={"csrf_token": token, "queue": "mail"})
        assert paused.headers["location"] == "/?notice=paused"
        assert await eq.paused_queues() == ["mail"]
        overview = (await http.get("/")).text
        assert 'action="/queues/resume"' in overview and "badge paused" in overview
        resumed = await http.post("/queues/resume", data={"csrf_token": token, "queue": "mail"})
        assert resumed.headers["location"] == "/?notice=resumed"
        assert await eq.paused_queues() == []
        bad_queue = await http.post("/queues/pause", data={"csrf_token": token, "queue": ""})
        assert bad_queue.status_code == 400

        # Purge: only what ended long enough ago, and only the statuses ticked.
        kept = await http.post(
            "/purge", data={"csrf_token": token, "older_than": "1h", "status_done": "1"}
        )
        assert kept.headers["location"] == "/?notice=purged&n=0"
        assert await eq.get_job(done) is not None
        purged = await http.post(
            "/purge", data={"csrf_token": token, "older_than": "0", "status_done": "1"}
        )
        assert purged.headers["location"] == "/?notice=purged&n=1"
        assert await eq.get_job(done) is None
        assert await eq.get_job(queued) is not None  # cancelled: not ticked
        shown = await http.get(purged.headers["location"])
        assert "Deleted 1 finished job(s)." in shown.text
        bad = await http.post("/purge", data={"csrf_token": token, "older_than": "soon"})
        assert bad.status_code == 400 and "expected a duration" in bad.text


async def test_a_running_job_is_asked_to_stop(eq: Soniq) -> None:
    ok, _ = register(eq)
    job_id = await eq.enqueue(ok, text="x")
    claimed = await _claim(eq)
    assert claimed == job_id
    async with client(soniq.dashboard.app(eq, actions=True)) as http:
        token = csrf_token((await http.get(f"/jobs/{job_id}")).text)
        response = await http.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
        assert "notice=cancel-requested" in response.headers["location"]
        page = await http.get(response.headers["location"])
        assert "its worker was asked to stop it" in page.text and 'id="cancel"' not in page.text
    job = await eq.get_job(job_id)
    assert job is not None and job.status is JobStatus.RUNNING and job.cancel_requested


async def _claim(eq: Soniq) -> int:
    """Mark the oldest queued job running, as a worker's claim does (through the
    backend: no public call claims a job without running it)."""
    [claimed] = await eq.backend.claim_jobs(1, "w-dashboard", None)
    return claimed.id


async def test_a_rebound_host_name_can_neither_read_nor_act(eq: Soniq) -> None:
    """DNS rebinding: another site's page, its name pointed at the dashboard's address,
    sends that site's Host. With allowed_hosts (serve's default on loopback), such a
    request reads nothing and gets no CSRF token; the names allowed work."""
    assert soniq.dashboard.LOOPBACK_NAMES == ("localhost", "127.0.0.1", "::1")
    board = soniq.dashboard.app(eq, actions=True, allowed_hosts=soniq.dashboard.LOOPBACK_NAMES)
    async with client(board) as http:
        for host in ("attacker.example:8080", "attacker.example", "testserver"):
            page = await http.get("/", headers={"Host": host})
            assert page.status_code == 400 and "csrf" not in page.text.lower(), host
            posted = await http.post("/queues/pause", data={"queue": "q"}, headers={"Host": host})
            assert posted.status_code == 400, host
        for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST"):
            assert (await http.get("/", headers={"Host": host})).status_code == 200, host
    assert not any(q.paused for q in await eq.queue_stats())


async def test_read_only_refuses_every_post(eq: Soniq) -> None:
    _, failed = await finished_jobs(eq)
    # A token and cookie as valid as can be: from an app with actions and the same key.
    async with client(soniq.dashboard.app(eq, actions=True, secret="k")) as http:
        token = csrf_token((await http.get(f"/jobs/{failed}")).text)
        cookies = dict(http.cookies)
    async with client(soniq.dashboard.app(eq, secret="k"), cookies=cookies) as http:
        page = await http.get(f"/jobs/{failed}")
        assert 'id="mode">read-only<' in page.text and 'method="post"' not in page.text
        for path, data in [
            (f"/jobs/{failed}/retry", {}),
            (f"/jobs/{failed}/cancel", {}),
            ("/queues/pause", {"queue": "default"}),
            ("/queues/resume", {"queue": "default"}),
            ("/purge", {"older_than": "0"}),
        ]:
            response = await http.post(path, data={"csrf_token": token, **data})
            assert response.status_code == 403, path
            assert "read-only" in response.text
        assert (await http.get(f"/jobs/{failed}/retry")).status_code == 405
    job = await eq.get_job(failed)
    assert job is not None and job.status is JobStatus.FAILED
    assert await eq.paused_queues() == []
    assert len(await eq.list_jobs()) == 2


async def test_posts_without_the_right_csrf_token_are_refused(eq: Soniq) -> None:
    _, failed = await finished_jobs(eq)
    app = soniq.dashboard.app(eq, actions=True, secret="s1")
    async with client(app) as http:
        page = await http.get(f"/jobs/{failed}")
        token = csrf_token(page.text)
        cookie = http.cookies["soniq_csrf"]
        assert "httponly" in page.headers["set-cookie"].lower()
        assert "samesite=lax" in page.headers["set-cookie"].lower()
        other = soniq.dashboard.app(eq, actions=True, secret="s2")
        async with client(other, cookies={"soniq_csrf": cookie}) as other_http:
            foreign = csrf_token((await other_http.get("/")).text)
        refused = [
            await http.post(f"/jobs/{failed}/retry"),  # no token
            await http.post(f"/jobs/{failed}/retry", data={"csrf_token": ""}),
            await http.post(f"/jobs/{failed}/retry", data={"csrf_token": "0" * 64}),
            await http.post(f"/jobs/{failed}/retry", data={"csrf_token": foreign}),
            await http.post(f"/jobs/{failed}/retry", json={"csrf_token": token}),
            await http.post("/purge", data={"csrf_token": token[:-1], "older_than": "0"}),
        ]
        http.cookies.clear()  # a forged form from another site: the token, no cookie
        refused.append(await http.post(f"/jobs/{failed}/retry", data={"csrf_token": token}))
        big = await http.post(
            "/purge", data={"csrf_token": token, "older_than": "0", "x": "y" * 20000}
        )
        assert big.status_code == 413
    for response in refused:
        assert response.status_code == 403
        assert "CSRF token is missing or wrong" in response.text
    job = await eq.get_job(failed)
    assert job is not None and job.status is JobStatus.FAILED
    assert len(await eq.list_jobs()) == 2


@pytest.mark.parametrize("style", ["sync", "async"])
async def test_the_auth_hook_decides_who_gets_in(eq: Soniq, style: str) -> None:
    seen: list[str] = []

    def decide(request: Request) -> bool:
        seen.append(request.url.path)
        return request.headers.get("x-user") == "admin"

    async def decide_async(request: Request) -> bool:
        return decide(request)

    hook = decide if style == "sync" else decide_async
    app = soniq.dashboard.app(eq, actions=True, auth=hook)
    async with client(app) as http:
        for path in ("/", "/jobs", "/workers", "/jobs/1"):
            assert (await http.get(path)).status_code == 403
        assert (await http.post("/queues/pause", data={"queue": "q"})).status_code == 403
        admitted = await http.get("/", headers={"x-user": "admin"})
        assert admitted.status_code == 200
    assert seen[:4] == ["/", "/jobs", "/workers", "/jobs/1"]
    assert await eq.paused_queues() == []


async def test_basic_auth_is_required_when_set(eq: Soniq) -> None:
    def basic(credentials: bytes) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(credentials).decode()}

    app = soniq.dashboard.app(eq, basic_auth="ops:s3cr:et")
    async with client(app) as http:
        for headers in (
            {},
            basic(b"ops:wrong"),
            basic(b"ops"),
            basic(b"other:s3cr:et"),
            {"authorization": "Basic !!!"},
            {"authorization": "Bearer ops:s3cr:et"},
        ):
            response = await http.get("/", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith('Basic realm="Soniq')
        assert (await http.get("/", headers=basic(b"ops:s3cr:et"))).status_code == 200
    for bad in ("nocolon", ":password", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            soniq.dashboard.app(eq, basic_auth=bad)


async def test_mounted_under_a_prefix_in_fastapi(eq: Soniq) -> None:
    from fastapi import FastAPI

    _, failed = await finished_jobs(eq)
    host = FastAPI()

    @host.get("/")
    def home() -> dict[str, str]:
        return {"app": "host"}

    host.mount("/admin/jobs", soniq.dashboard.app(eq, actions=True))
    async with client(host) as http:
        assert (await http.get("/")).json() == {"app": "host"}
        page = await http.get(f"/admin/jobs/jobs/{failed}")
        assert page.status_code == 200
        assert 'href="/admin/jobs/jobs"' in page.text and 'href="/admin/jobs/"' in page.text
        assert f'action="/admin/jobs/jobs/{failed}/retry"' in page.text
        assert "path=/admin/jobs" in page.headers["set-cookie"].lower()
        response = await http.post(
            f"/admin/jobs/jobs/{failed}/retry", data={"csrf_token": csrf_token(page.text)}
        )
        assert response.headers["location"].startswith(f"/admin/jobs/jobs/{failed}?")
    job = await eq.get_job(failed)
    assert job is not None and job.status is JobStatus.QUEUED


async def test_routed_beside_another_asgi_app_as_in_django_asgi_py(eq: Soniq) -> None:
    """The dispatcher of docs/dashboard.md's Django section (Django's app stood in
    for by a plain one)."""
    _, failed = await finished_jobs(eq)
    dashboard = soniq.dashboard.app(eq, actions=True)
    prefix = "/admin/jobs"

    async def django_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"django"})

    async def application(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == prefix or path.startswith(prefix + "/")):
            scope = dict(scope, root_path=scope.get("root_path", "") + prefix)
            await dashboard(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    async with client(application) as http:
        assert (await http.get("/shop/")).text == "django"
        page = await http.get(f"{prefix}/jobs/{failed}")
        assert page.status_code == 200 and f'action="{prefix}/jobs/{failed}/retry"' in page.text
        response = await http.post(
            f"{prefix}/jobs/{failed}/retry", data={"csrf_token": csrf_token(page.text)}
        )
        assert response.headers["location"].startswith(f"{prefix}/jobs/{failed}?")
        assert (await http.get(prefix + "/")).status_code == 200
        assert (await http.get(prefix)).status_code in (200, 307)
    job = await eq.get_job(failed)
    assert job is not None and job.status is JobStatus.QUEUED


DOC = ROOT / "docs" / "dashboard.md"


async def test_the_fastapi_and_starlette_examples_of_the_docs_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fastapi_block, starlette_block, django_block = re.findall(
        r"```python\n(.*?)```", DOC.read_text(), re.S
    )
    assert "def application(scope, receive, send)" in django_block  # tested above
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    await eq.ensure_initialized()
    await eq.close()
    jobs = types.ModuleType("myapp.jobs")
    jobs.eq = eq  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "myapp", types.ModuleType("myapp"))
    monkeypatch.setitem(sys.modules, "myapp.jobs", jobs)
    namespace: dict[str, Any] = {"__name__": "docs_dashboard"}
    exec(compile(fastapi_block, str(DOC), "exec"), namespace)
    fastapi_app = namespace["app"]
    exec(compile(starlette_block, str(DOC), "exec"), namespace)
    starlette_app = namespace["app"]

    def with_session(app: Any, role: str) -> Any:
        """``app`` behind what SessionMiddleware would give: a session with ``role``."""

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            await app({**scope, "session": {"role": role}}, receive, send)

        return asgi

    async with fastapi_app.router.lifespan_context(fastapi_app):
        async with client(with_session(fastapi_app, "staff")) as http:
            page = await http.get("/admin/jobs/")
            assert page.status_code == 200 and 'id="mode">actions enabled<' in page.text
        async with client(with_session(fastapi_app, "guest")) as http:
            assert (await http.get("/admin/jobs/")).status_code == 403
    async with starlette_app.router.lifespan_context(starlette_app), client(starlette_app) as http:
        page = await http.get("/admin/jobs/jobs")
        assert page.status_code == 200 and 'id="mode">read-only<' in page.text


async def test_the_lifespan_opens_and_closes_eq(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    await eq.ensure_initialized()
    await eq.close()
    app = soniq.dashboard.app(eq)
    board = app.state.dashboard
    async with app.router.lifespan_context(app):
        assert board._ready  # opened at startup, before any page
        async with client(app) as http:
            assert (await http.get("/")).status_code == 200
    assert not board._ready


async def test_an_unreachable_database_is_a_503_page() -> None:
    eq = Soniq(f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout=1)
    async with client(soniq.dashboard.app(eq)) as http:
        response = await http.get("/")
    await eq.close()
    assert response.status_code == 503
    assert "DatabaseUnavailable" in response.text and "127.0.0.1" in response.text


async def test_responses_carry_security_headers(eq: Soniq) -> None:
    async with client(soniq.dashboard.app(eq)) as http:
        response = await http.get("/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_helpers() -> None:
    assert soniq.dashboard.is_loopback("127.0.0.1") and soniq.dashboard.is_loopback("::1")
    assert soniq.dashboard.is_loopback("localhost") and soniq.dashboard.is_loopback("127.8.0.1")
    assert not soniq.dashboard.is_loopback("0.0.0.0") and not soniq.dashboard.is_loopback("::")
    assert not soniq.dashboard.is_loopback("example.com")
    from soniq import parse_duration
    from soniq.dashboard._charts import Series, bar_chart, nice_ceiling

    assert [nice_ceiling(n) for n in (0, 1, 3, 7, 10, 11, 101)] == [1, 1, 5, 10, 10, 20, 200]
    assert parse_duration("90s") == 90 and parse_duration("2h") == 7200
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1.5") == 1.5
    for bad in ("", "d", "-1", "inf", "7w"):
        with pytest.raises(ValueError):
            parse_duration(bad)

    class Bucket:
        def __init__(self, minute: int, done: int) -> None:
            self.start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(
                minutes=minute
            )
            self.done = done

    chart = bar_chart([Bucket(m, m % 3) for m in range(1440)], [Series("done", "done", "x")])
    assert len({bar.x for bar in chart.bars}) == 90  # a day in 90 bars of 16 minutes
    assert chart.total == sum(m % 3 for m in range(1440))
    assert all(bar.y >= chart.top and bar.height > 0 for bar in chart.bars)
    assert chart.times[0][1] == "00:00" and chart.times[-1][1] == "23:44 UTC"


def test_importing_soniq_loads_no_web_stack() -> None:
    probe = (
        "import sys, soniq, soniq.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'starlette', 'jinja2', 'uvicorn', 'httpx'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


# -- the command ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_soniq_dashboard_serves_until_interrupted(
    tmp_path: Path, soniq_processes: Any, signum: signal.Signals
) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    setup = Soniq(url)
    setup.sync.ensure_initialized()
    setup.sync.enqueue("dash.anything", queue="mail")
    setup.sync.close()
    port = free_port()
    server: Process = soniq_processes(
        "dashboard", "--database-url", url, "--port", str(port), "--actions"
    )
    server.wait_for_output("Uvicorn running on http://127.0.0.1:", timeout=30)
    assert "WARNING" not in server.output
    page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert page.status_code == 200 and 'data-queue="mail"' in page.text
    assert 'id="mode">actions enabled<' in page.text
    server.send_signal(signum)
    code, output = server.finish(timeout=30)
    assert code == 0, output
    assert "Finished server process" in output


@pytest.mark.slow
def test_soniq_dashboard_warns_and_checks_its_options(
    tmp_path: Path, soniq_processes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    monkeypatch.delenv("SONIQ_DASHBOARD_BASIC_AUTH", raising=False)
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind fails after the
    # warning, so nothing listens beyond loopback.
    process = soniq_processes("dashboard", "--database-url", url, "--host", "192.0.2.1")
    code, output = process.finish(timeout=30)
    assert "WARNING: listening on 192.0.2.1 without --basic-auth" in output
    assert code != 0
    bad = subprocess.run(
        [sys.executable, "-m", "soniq", "dashboard", "--database-url", url, "--basic-auth", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "user:password" in bad.stderr
    nothing = subprocess.run(
        [sys.executable, "-m", "soniq", "dashboard"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SONIQ_DATABASE_URL"},
    )
    assert nothing.returncode == 2 and "module:eq" in nothing.stderr


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_connection_lost_mid_session_is_a_503_page(
    driver: str, database_url: str, schema: str
) -> None:
    """The server cuts the pool's connections between two pages (a restart, a
    failover): the next page is the 503 page, not a bare 500."""
    eq = Soniq(database_url, schema=schema, driver=driver, pool_size=1)
    await eq.ensure_initialized()
    async with client(soniq.dashboard.app(eq)) as http:
        assert (await http.get("/")).status_code == 200
        with psycopg.connect(database_url, autocommit=True) as pg:
            pg.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        response = await http.get("/jobs")
    await eq.close()
    # asyncpg's pool hands out the dead connection: the 503 page, with its headers;
    # psycopg's checks it on checkout and replaces it: the page itself.
    assert response.status_code == (503 if driver == "asyncpg" else 200), response.text
    assert "content-security-policy" in response.headers
