"""The dashboard's ASGI application: pages, actions and their guards.

Every page reads Soniq's public async API on the ``eq`` it was given; nothing here
writes SQL. Actions are POST forms, refused unless the app was built with
``actions=True``, and each needs the CSRF token of its page (a random cookie, and in
the form that cookie's HMAC under the app's secret: a double submit that another site
can neither read nor forge).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import inspect
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from soniq import Job, JobStatus, Soniq, SoniqError, parse_duration
from soniq.dashboard._charts import Series, bar_chart
from soniq.drivers._common import is_connection_error

log = logging.getLogger("soniq.dashboard")

#: ``auth=``: called with each request; True lets it through, False answers 403.
AuthHook = Callable[[Request], "bool | Awaitable[bool]"]

#: The cookie that holds the CSRF secret of a browser.
CSRF_COOKIE = "soniq_csrf"
#: The form field that carries its HMAC.
CSRF_FIELD = "csrf_token"
#: The largest action form read (bytes); larger is refused with 413.
MAX_FORM = 16 * 1024
#: The rows a page of jobs may hold (``?limit=``).
MAX_PAGE = 500
DEFAULT_PAGE = 50
#: The windows the overview's charts offer, in minutes.
WINDOWS = (15, 60, 360, 1440)
#: The statuses the purge form offers (one checkbox each, ``status_<name>``).
PURGEABLE = ("done", "failed", "cancelled")
_TEMPLATES = Path(__file__).with_name("templates")

#: What a redirect after an action says, by code (the page never echoes free text
#: from the query string).
NOTICES = {
    "retried": "Job {id} was put back in line.",
    "not-retried": "Job {id} was left as it was: it is not failed nor cancelled, or "
    "another active job holds its dedupe key.",
    "cancelled": "Job {id} was cancelled.",
    "cancel-requested": "Job {id} is running: its worker was asked to stop it.",
    "not-cancelled": "Job {id} was left as it was: it has already ended.",
    "paused": "Queue paused: workers take none of its jobs until it is resumed.",
    "already-paused": "The queue was paused already.",
    "resumed": "Queue resumed.",
    "already-resumed": "The queue was not paused.",
    "purged": "Deleted {n} finished job(s).",
}


class _Refused(Exception):
    """A request the dashboard answers with an error page (status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_basic_auth(credentials: str) -> tuple[str, str]:
    """``user:password`` as a pair; ValueError when either part is empty."""
    user, colon, password = credentials.partition(":")
    if not colon or not user or not password:
        raise ValueError("basic auth credentials must be user:password, both non-empty")
    return user, password


def _ago(seconds: float | None) -> str:
    """A duration as a person reads it: ``4 s``, ``3 min``, ``2 h 5 min``, ``3 d``."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def _pretty(value: Any) -> str:
    """A JSON value as indented text (the template escapes it)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _database_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unavailable: Soniq's own errors, or a
    connection lost mid-request as the drivers classify it (the worker's test). A 503
    page, not a 500; any other error is a bug, and stays one."""
    return isinstance(exc, SoniqError) or is_connection_error(exc)


class Dashboard:
    """The state of one dashboard app: the Soniq it reads, its options, its secret."""

    def __init__(
        self,
        eq: Soniq,
        *,
        actions: bool,
        auth: AuthHook | None,
        basic_auth: str | None,
        secret: str | bytes | None,
        refresh: float,
        title: str,
        allowed_hosts: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(eq, Soniq):
            raise TypeError(f"soniq.dashboard.app() takes a soniq.Soniq, got {type(eq).__name__}")
        if auth is not None and not callable(auth):
            raise TypeError("auth must be a callable that takes the request and returns a bool")
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh < 0:
            raise ValueError(f"refresh must be seconds >= 0 (0: no auto-refresh), got {refresh!r}")
        self.eq = eq
        self.actions = actions
        self.auth = auth
        self.basic_auth = (
            None
            if basic_auth is None
            else tuple(part.encode() for part in parse_basic_auth(basic_auth))
        )
        if secret is None:
            secret = secrets.token_bytes(32)
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.refresh = float(refresh)
        self.title = title
        self.allowed_hosts = (
            None
            if allowed_hosts is None
            else frozenset(h.lower().strip("[]") for h in allowed_hosts)
        )
        self._ready = False
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["ago"] = _ago
        self.templates.filters["pretty"] = _pretty
        self.templates.filters["time"] = _time

    # -- the database ----------------------------------------------------------------

    async def ready(self) -> Soniq:
        """``eq``, its pool open and its schema checked (once; never migrated: the
        dashboard runs no DDL)."""
        if not self._ready:
            await self.eq.ensure_initialized(migrate=False)
            self._ready = True
        return self.eq

    async def close(self) -> None:
        await self.eq.close()
        self._ready = False

    # -- guards ----------------------------------------------------------------------

    def _basic_auth_ok(self, request: Request) -> bool:
        assert self.basic_auth is not None
        user, password = self.basic_auth
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        given_user, given_password = b"", b""
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            given_user, _, given_password = decoded.partition(b":")
        # Both compared, in constant time, whatever the first says.
        user_ok = hmac.compare_digest(given_user, user)
        password_ok = hmac.compare_digest(given_password, password)
        return user_ok & password_ok

    async def check_access(self, request: Request) -> Response | None:
        """None when the request may go on; else the 400, 401 or 403 to answer."""
        # A page of another site whose name was rebound to this address reaches it
        # with that site's Host header: refused, it can neither read nor act.
        host = (request.url.hostname or "").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return Response("Host not allowed\n", status_code=400, media_type="text/plain")
        if self.basic_auth is not None and not self._basic_auth_ok(request):
            return Response(
                "Authentication required\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Soniq dashboard", charset="UTF-8"'},
                media_type="text/plain",
            )
        if self.auth is not None:
            allowed = self.auth(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if allowed is not True:
                return Response("Forbidden\n", status_code=403, media_type="text/plain")
        return None

    def csrf_for(self, cookie: str) -> str:
        """The form token that goes with the CSRF cookie ``cookie``."""
        return hmac.new(self.secret, cookie.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _csrf_cookie(request: Request) -> str | None:
        value = request.cookies.get(CSRF_COOKIE)
        if value and 20 <= len(value) <= 100 and value.isascii():
            return value
        return None

    def _csrf_ok(self, request: Request, form: Mapping[str, str]) -> bool:
        cookie = self._csrf_cookie(request)
        given = form.get(CSRF_FIELD, "")
        if cookie is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_for(cookie).encode())

    # -- responses -------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """The page ``template`` with ``context``, its CSRF cookie and security headers."""
        cookie = self._csrf_cookie(request)
        new_cookie = cookie is None
        if cookie is None:
            cookie = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(16)
        base = request.scope.get("root_path", "").rstrip("/")
        context.setdefault("page", "")
        html = self.templates.get_template(template).render(
            base=base,
            title=self.title,
            actions=self.actions,
            refresh=self.refresh,
            csrf_field=CSRF_FIELD,
            csrf_token=self.csrf_for(cookie),
            nonce=nonce,
            notice=self._notice(request),
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        self._secure(response, nonce)
        if new_cookie:
            response.set_cookie(
                CSRF_COOKIE,
                cookie,
                path=base or "/",
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
            )
        return response

    @staticmethod
    def _secure(response: Response, nonce: str | None = None) -> None:
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        style = f"'nonce-{nonce}'" if nonce else "'none'"
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src {script}; style-src {style}; img-src 'self' data:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"

    @staticmethod
    def _notice(request: Request) -> str | None:
        code = request.query_params.get("notice")
        if code not in NOTICES:
            return None
        values = {}
        for key in ("id", "n"):
            raw = request.query_params.get(key, "")
            values[key] = f"{int(raw):,}" if raw.isdigit() else "?"
        return NOTICES[code].format(**values)

    def redirect(self, request: Request, path: str, **query: object) -> RedirectResponse:
        """303 to ``path`` of this dashboard (a GET), with ``query``."""
        base = request.scope.get("root_path", "").rstrip("/")
        shown = {k: str(v) for k, v in query.items() if v is not None}
        url = base + path + ("?" + urlencode(shown) if shown else "")
        response = RedirectResponse(url, status_code=303)
        self._secure(response)
        return response

    # -- routing ---------------------------------------------------------------------

    def page(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        """A GET endpoint: guarded, and its errors shown as pages."""

        async def endpoint(request: Request) -> Response:
            denied = await self.check_access(request)
            if denied is not None:
                return denied
            return await self._shown(request, handler(request))

        return endpoint

    def action(
        self, handler: Callable[[Request, dict[str, str]], Awaitable[Response]]
    ) -> Callable[..., Any]:
        """A POST endpoint: guarded, refused in read-only mode, and CSRF-checked."""

        async def act(request: Request) -> Response:
            if not self.actions:
                raise _Refused(
                    403,
                    "This dashboard is read-only: actions are enabled with "
                    "app(eq, actions=True) or soniq dashboard --actions.",
                )
            form = await _read_form(request)
            if not self._csrf_ok(request, form):
                raise _Refused(
                    403,
                    "The form's CSRF token is missing or wrong. Reload the page and try again.",
                )
            return await handler(request, form)

        return self.page(act)

    async def _shown(self, request: Request, answer: Awaitable[Response]) -> Response:
        """``answer``, or the page of what kept it from being given: a refusal, or a
        database that is unavailable (503)."""
        try:
            return await answer
        except _Refused as exc:
            return self.render(request, "error.html", exc.status, message=exc.message)
        except Exception as exc:
            if not _database_trouble(exc):
                raise
            return self._unavailable(request, exc)

    def _unavailable(self, request: Request, exc: Exception) -> Response:
        # Soniq's messages name host, port and database, never a password; a
        # driver's text may carry server details (row values): its class only.
        shown = (
            f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SoniqError)
            else f"the connection to the database was lost ({type(exc).__name__}); reload"
        )
        log.warning("dashboard: %s", shown)
        return self.render(request, "error.html", 503, message=shown)


async def _read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the last value of each field), at most :data:`MAX_FORM`
    bytes; any other body reads as an empty form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise _Refused(413, "The form is too large.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(400, "The form is not UTF-8.") from None
    return {key: values[-1] for key, values in parse_qs(text).items()}


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _Refused(400, f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise _Refused(400, f"{name} must be from {low:,} to {high:,}, got {value:,}")
    return value


THROUGHPUT = (Series("done", "done", "done"),)
FAILURES = (Series("failed", "failed", "failed"), Series("cancelled", "cancelled", "cancelled"))


def app(
    eq: Soniq,
    *,
    actions: bool = False,
    auth: AuthHook | None = None,
    basic_auth: str | None = None,
    secret: str | bytes | None = None,
    refresh: float = 5.0,
    title: str = "Soniq",
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard of ``eq`` (a :class:`soniq.Soniq`) as an ASGI application.

    - ``actions``: show and accept the actions (retry, cancel, pause, resume, purge).
      Off by default: the dashboard is read-only and refuses every POST with 403.
    - ``auth``: called with each request (a ``starlette.requests.Request``); returns a
      bool, or an awaitable of one. Anything but True answers 403.
    - ``basic_auth``: ``"user:password"``; a request without them answers 401 (the
      browser asks for them). Compared in constant time.
    - ``secret``: the key that signs the CSRF tokens of action forms (default:
      ``$SONIQ_DASHBOARD_SECRET``, else random per process; give one when several
      processes serve the dashboard behind one address).
    - ``refresh``: seconds between reloads of a page whose auto-refresh box is ticked
      (0: no auto-refresh).
    - ``allowed_hosts``: the host names requests may carry in their ``Host`` header
      (others answer 400), against DNS rebinding: a page of another site whose name
      is made to point at this address. ``serve`` on a loopback address gives the
      loopback names by default; None (the default here): any host, for an app
      mounted behind a host that checks them itself.

    Served as the root application, its lifespan opens ``eq`` and closes it at
    shutdown. Mounted inside another app, the host's lifespan should open and close
    ``eq`` (the dashboard's first page opens it if not). It never migrates: run
    ``soniq migrate`` first.
    """
    board = Dashboard(
        eq,
        actions=actions,
        auth=auth,
        basic_auth=basic_auth,
        secret=secret if secret is not None else os.environ.get("SONIQ_DASHBOARD_SECRET"),
        refresh=refresh,
        title=title,
        allowed_hosts=allowed_hosts,
    )

    async def overview(request: Request) -> Response:
        soniq = await board.ready()
        minutes = _int_param(request, "minutes", 60, 1, 1440)
        assert minutes is not None
        queues = await soniq.queue_stats()
        queue = request.query_params.get("queue") or None
        try:
            stats = await soniq.stats(minutes=minutes, queue=queue)
        except (ValueError, TypeError) as exc:
            raise _Refused(400, str(exc)) from None
        workers = await soniq.list_workers()
        slots = sum(w.concurrency for w in workers)
        busy = sum(len(w.running) for w in workers)
        return board.render(
            request,
            "overview.html",
            queues=queues,
            queue=queue,
            stats=stats,
            minutes=minutes,
            windows=WINDOWS,
            throughput=bar_chart(stats.buckets, THROUGHPUT),
            failures=bar_chart(stats.buckets, FAILURES),
            workers=workers,
            slots=slots,
            busy=busy,
            totals={
                field: sum(getattr(q, field) for q in queues)
                for field in ("queued", "scheduled", "running", "waiting", "failed", "cancelled")
            },
            page="overview",
        )

    async def jobs(request: Request) -> Response:
        soniq = await board.ready()
        status = request.query_params.get("status") or None
        queue = request.query_params.get("queue") or None
        name = request.query_params.get("name") or None
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        assert limit is not None
        before_id = _int_param(request, "before_id", None, 1, 2**63 - 1)
        try:
            found = await soniq.list_jobs(
                status=status, queue=queue, name=name, limit=limit + 1, before_id=before_id
            )
        except (ValueError, TypeError) as exc:
            raise _Refused(400, str(exc)) from None
        page, more = found[:limit], len(found) > limit
        filters = {"status": status, "queue": queue, "name": name}
        kept = {k: v for k, v in filters.items() if v}
        if limit != DEFAULT_PAGE:
            kept["limit"] = str(limit)
        next_url = "?" + urlencode({**kept, "before_id": page[-1].id}) if more else None
        first_url = "?" + urlencode(kept) if before_id is not None else None
        now = dt.datetime.now(dt.timezone.utc)
        return board.render(
            request,
            "jobs.html",
            jobs=page,
            filters=filters,
            statuses=[s.value for s in JobStatus],
            limit=limit,
            max_page=MAX_PAGE,
            next_url=next_url,
            first_url=first_url,
            now=now,
            when=_when,
            page="jobs",
        )

    async def job(request: Request) -> Response:
        soniq = await board.ready()
        job_id = _path_id(request)
        found = await soniq.get_job(job_id)
        if found is None:
            raise _Refused(404, f"No job has id {job_id}.")
        now = dt.datetime.now(dt.timezone.utc)
        return board.render(
            request,
            "job.html",
            job=found,
            timeline=_timeline(found, now),
            now=now,
            can_retry=found.status in (JobStatus.FAILED, JobStatus.CANCELLED),
            can_cancel=found.status in (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING)
            and not found.cancel_requested,
            page="jobs",
        )

    async def workers(request: Request) -> Response:
        soniq = await board.ready()
        return board.render(
            request,
            "workers.html",
            workers=await soniq.list_workers(),
            now=dt.datetime.now(dt.timezone.utc),
            page="workers",
        )

    async def retry(request: Request, form: dict[str, str]) -> Response:
        soniq = await board.ready()
        job_id = _path_id(request)
        done = await soniq.retry_job(job_id)
        return board.redirect(
            request, f"/jobs/{job_id}", notice="retried" if done else "not-retried", id=job_id
        )

    async def cancel(request: Request, form: dict[str, str]) -> Response:
        soniq = await board.ready()
        job_id = _path_id(request)
        done = await soniq.cancel_job(job_id)
        notice = "not-cancelled"
        if done:
            after = await soniq.get_job(job_id)
            running = after is not None and after.status is JobStatus.RUNNING
            notice = "cancel-requested" if running else "cancelled"
        return board.redirect(request, f"/jobs/{job_id}", notice=notice, id=job_id)

    async def pause(request: Request, form: dict[str, str]) -> Response:
        return await _queue_action(request, form, pausing=True)

    async def resume(request: Request, form: dict[str, str]) -> Response:
        return await _queue_action(request, form, pausing=False)

    async def _queue_action(request: Request, form: dict[str, str], *, pausing: bool) -> Response:
        soniq = await board.ready()
        queue = form.get("queue", "")
        try:
            if pausing:
                notice = "paused" if await soniq.pause_queue(queue) else "already-paused"
            else:
                notice = "resumed" if await soniq.resume_queue(queue) else "already-resumed"
        except (ValueError, TypeError) as exc:
            raise _Refused(400, str(exc)) from None
        return board.redirect(request, "/", notice=notice)

    async def purge(request: Request, form: dict[str, str]) -> Response:
        soniq = await board.ready()
        try:
            older_than = parse_duration(form.get("older_than", ""))
            statuses = [s for s in PURGEABLE if form.get(f"status_{s}")] or None
            count = await soniq.purge_jobs(older_than=older_than, status=statuses)
        except (ValueError, TypeError) as exc:
            raise _Refused(400, str(exc)) from None
        return board.redirect(request, "/", notice="purged", n=count)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Served as the root app (``soniq dashboard``, ``uvicorn``), the dashboard owns
        # eq: opened here, closed at shutdown. Mounted in another app, this does not
        # run: the host's lifespan opens and closes eq (the first page opens it too).
        try:
            await board.ready()
        except SoniqError as exc:
            log.warning("dashboard: %s (the pages will say so until it answers)", exc)
        try:
            yield
        finally:
            await board.close()

    routes = [
        Route("/", board.page(overview), methods=["GET"], name="overview"),
        Route("/jobs", board.page(jobs), methods=["GET"], name="jobs"),
        Route("/jobs/{job_id}", board.page(job), methods=["GET"], name="job"),
        Route("/workers", board.page(workers), methods=["GET"], name="workers"),
        Route("/jobs/{job_id}/retry", board.action(retry), methods=["POST"], name="retry"),
        Route("/jobs/{job_id}/cancel", board.action(cancel), methods=["POST"], name="cancel"),
        Route("/queues/pause", board.action(pause), methods=["POST"], name="pause"),
        Route("/queues/resume", board.action(resume), methods=["POST"], name="resume"),
        Route("/purge", board.action(purge), methods=["POST"], name="purge"),
    ]
    starlette = Starlette(routes=routes, lifespan=lifespan)
    starlette.state.dashboard = board
    return starlette


def _path_id(request: Request) -> int:
    raw = request.path_params["job_id"]
    if not (isinstance(raw, str) and raw.isdigit() and 0 < int(raw) < 2**63):
        raise _Refused(404, f"No job has id {raw!r}.")
    return int(raw)


def _when(job: Job) -> tuple[str, dt.datetime]:
    """What the jobs table shows in its time column: the job's latest moment."""
    if job.finished_at is not None:
        return "ended", job.finished_at
    if job.started_at is not None:
        return "started", job.started_at
    if job.status is JobStatus.QUEUED and job.run_at > dt.datetime.now(dt.timezone.utc):
        return "due", job.run_at
    return "created", job.created_at


def _timeline(job: Job, now: dt.datetime) -> list[tuple[str, dt.datetime, str]]:
    """The moments of a job's life, in order, each with what happened then."""
    moments = [("created", job.created_at, "enqueued")]
    if job.run_at > job.created_at + dt.timedelta(seconds=1) or job.status is JobStatus.QUEUED:
        future = job.run_at > now
        moments.append(("due", job.run_at, "due to run" if future else "became due"))
    if job.started_at is not None:
        waited = job.started_at - max(job.created_at, job.run_at)
        moments.append(
            (
                "started",
                job.started_at,
                f"claimed by a worker (ready for {_ago(waited.total_seconds())})",
            )
        )
    if job.finished_at is not None:
        ran = ""
        if job.started_at is not None:
            ran = f" (ran {_ago((job.finished_at - job.started_at).total_seconds())})"
        moments.append(("ended", job.finished_at, f"{job.status.value}{ran}"))
    return sorted(moments, key=lambda m: m[1])
