"""Small helpers shared by the PostgreSQL drivers: who owns a pool, URL handling, and
turning driver errors into Soniq's."""

from __future__ import annotations

import asyncio
import copy
import math
import os
import re
import select
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from soniq.core.errors import ConfigurationError, DatabaseUnavailable, SchemaNotReadyError

_Member = TypeVar("_Member")
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def async_owner() -> tuple[int, asyncio.AbstractEventLoop]:
    """What an async pool is bound to: this process (since the last fork) and the
    running loop. A pool made under another owner must be replaced, not used."""
    return _fork_generation, asyncio.get_running_loop()


def sync_owner() -> tuple[int, None]:
    """What a sync pool is bound to: this process, since the last fork."""
    return _fork_generation, None


_SCHEME = re.compile(r"^(postgres|postgresql)(\+(asyncpg|psycopg|psycopg_async|psycopg2))?$")


def split_postgres_url(url: str) -> tuple[str, str | None]:
    """``postgresql+asyncpg://...`` -> (``postgresql://...``, ``"asyncpg"``).

    A malformed URL is a :class:`ConfigurationError` whose message shows the URL with
    its password replaced by ``***`` (see :func:`redact_url`)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            "database_url must look like postgresql://user@host:5432/dbname, got "
            f"{redact_url(url)!r}"
        )
    scheme, rest = url.split("://", 1)
    match = _SCHEME.match(scheme)
    if not match:
        raise ConfigurationError(
            f"database_url {redact_url(url)!r} has scheme {scheme!r}; use postgresql:// "
            "(optionally postgresql+asyncpg:// or postgresql+psycopg://)"
        )
    try:
        urlsplit("postgresql://" + rest).port  # noqa: B018  (parsing the port validates it)
        parsed = True
    except ValueError:
        parsed = False
    if not parsed:
        # urllib's own message quotes the bad "port", which can be a piece of an
        # unencoded password (postgresql://user:pa/ss@host/db): say it in our words,
        # outside the except block so that its error is not even the __context__.
        raise ConfigurationError(
            f"database_url {redact_url(url)!r} is malformed: its host:port part does not "
            "parse (one host, a numeric port; percent-encode special characters in the "
            "user name and password, e.g. / as %2F and @ as %40)"
        )
    if _BAD_ESCAPE.search(rest):
        # libpq refuses these (asyncpg lets them through) quoting the text around
        # them, which can be the password: refused here, for every driver, in our words.
        raise ConfigurationError(
            f"database_url {redact_url(url)!r} is malformed: a space or a % that does not "
            "start a percent-escape; write a space as %20 and % itself as %25"
        )
    driver = match[3]
    if driver == "psycopg_async":
        driver = "psycopg"
    return "postgresql://" + rest, driver


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|\s")


# Secrets in a URL or conninfo string: the password of the user-info part (the text
# between the first ":" after the scheme and the last "@") and password= parameters.
_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:(//)?")
_PASSWORD_PARAM = re.compile(r"(?i)((?:^|[?&\s])password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")
REDACTED = "***"


def _userinfo_password(url: str) -> tuple[int, int] | None:
    """Where the password of ``url``'s user-info part is (start, end), if it has one.
    Works on malformed URLs too (no ``//``, an unencoded ``/`` or ``@`` in it)."""
    at = url.rfind("@")
    if at == -1:
        return None
    head = url[:at]
    start = 0
    match = _SCHEME_PREFIX.match(head)
    if match and ":" in head[match.end() :]:
        start = match.end()
    elif match and match[1]:
        return None  # scheme://user@host: no password
    colon = head.find(":", start)
    if colon == -1:
        return None
    return colon + 1, at


def redact_url(url: object) -> str:
    """``url`` (a URL or conninfo string, well-formed or not) with its password shown
    as ``***``: what a message, log line or repr may show of a database URL."""
    text = url if isinstance(url, str) else repr(url)
    text = _PASSWORD_PARAM.sub(lambda m: m[1] + REDACTED, text)
    span = _userinfo_password(text)
    if span is not None:
        text = text[: span[0]] + REDACTED + text[span[1] :]
    return text


def url_secrets(url: object) -> list[str]:
    """The passwords written in ``url`` (raw and percent-decoded), longest first."""
    if not isinstance(url, str):
        return []
    found = [m[2].strip("'") for m in _PASSWORD_PARAM.finditer(url)]
    span = _userinfo_password(url)
    if span is not None:
        found.append(url[span[0] : span[1]])
    secrets = {s for f in found for s in (f, unquote(f)) if s}
    return sorted(secrets, key=len, reverse=True)


def scrub(text: str, url: object) -> str:
    """``text`` with every password of ``url`` replaced by ``***``: for messages that
    come from code that may have echoed the URL (a driver's error, a parser's)."""
    for secret in url_secrets(url):
        text = text.replace(secret, REDACTED)
    return text


class Target:
    """Where a PostgreSQL URL points: host, port and database (never the password),
    read from the URL with libpq's defaults (``PGHOST``, ``PGPORT``, ``PGDATABASE``,
    then localhost, 5432 and the user name). Parsed once, when a driver is made, so
    that an error costs no parsing."""

    def __init__(self, dsn: str, *, connect_timeout: float, acquire_timeout: float) -> None:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)

        def param(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        self.host: str = parts.hostname or param("host") or os.environ.get("PGHOST") or "localhost"
        port = parts.port or param("port") or os.environ.get("PGPORT") or 5432
        try:
            self.port: int = int(port)
        except ValueError:
            self.port = 5432
        user = unquote(parts.username) if parts.username else param("user")
        self.database: str | None = (
            unquote(parts.path.lstrip("/"))
            or param("dbname")
            or os.environ.get("PGDATABASE")
            or user
            or os.environ.get("PGUSER")
        )
        self.connect_timeout = connect_timeout
        self.acquire_timeout = acquire_timeout
        self._dsn = dsn

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} (database {self.database!r})"

    def unavailable(self, exc: BaseException, *, timed_out: str = "") -> DatabaseUnavailable:
        """The :class:`DatabaseUnavailable` for ``exc``, a failure to open or check out
        a connection (raise it ``from exc``). ``timed_out`` says what a bare
        ``TimeoutError`` means where it is caught (default: the connect timeout)."""
        import psycopg

        if isinstance(exc, psycopg.errors.ConnectionTimeout):  # libpq's rounded timeout
            reason = (
                f"no answer within connect_timeout={libpq_connect_timeout(self.connect_timeout)} s"
            )
        elif isinstance(exc, TimeoutError) and not str(exc):
            reason = timed_out or f"no answer within connect_timeout={self.connect_timeout:g} s"
        else:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            reason = scrub(reason, self._dsn)
        return DatabaseUnavailable(
            f"PostgreSQL at {self} is unavailable: {reason}",
            host=self.host,
            port=self.port,
            database=self.database,
        )

    def misconfigured(self, exc: BaseException) -> ConfigurationError:
        """The :class:`ConfigurationError` for a URL the driver refused (raise it
        ``from None``: the driver's own message may quote the password)."""
        return ConfigurationError(
            f"database_url refused by the driver: {scrub(str(exc), self._dsn)}"
        )

    def acquire_timed_out(self) -> str:
        """What a timeout of a pool checkout means."""
        return f"no connection free within acquire_timeout={self.acquire_timeout:g} s"


def libpq_connect_timeout(seconds: float) -> int:
    """``connect_timeout`` for libpq/psycopg, which takes whole seconds, at least 2
    (a fraction would be truncated to 0, which means no timeout at all)."""
    return max(2, math.ceil(seconds))


def schema_missing(schema: str, exc: BaseException) -> SchemaNotReadyError:
    """The error for a statement that found no Soniq table."""
    return SchemaNotReadyError(
        f"Soniq's tables are missing in schema {schema!r} ({exc}); create them with "
        "`soniq migrate --database-url URL` or `await eq.ensure_initialized()`"
    )


#: The connection errors of every driver imported so far (see
#: :func:`register_connection_errors`); OSError covers sockets and DatabaseUnavailable.
_connection_errors: tuple[type[BaseException], ...] = (OSError, DatabaseUnavailable)


def register_connection_errors(*classes: type[BaseException]) -> None:
    """Called by each driver module when it is imported: these of its errors mean the
    connection is gone or the server is (re)starting, so the same statement may pass
    on a new connection. Each driver module files its own as it is imported, so this
    module need not import a driver to classify an error."""
    global _connection_errors
    new = tuple(c for c in classes if c not in _connection_errors)
    _connection_errors = (*_connection_errors, *new)


def async_only(member: _Member) -> _Member:
    """Marks a member of an async driver module that only the worker uses (it runs on
    asyncio): ``tools/unasync.py`` leaves it out of the blocking twin, so the generated
    file carries nothing that nothing calls."""
    return member


def rolled_back(exc: BaseException) -> bool:
    """True when the server refused the statement and rolled it back (the error
    carries a SQLSTATE, as both drivers' server errors do, and not one of a lost
    connection or a server shutting down): nothing of it was committed, so running it
    again cannot commit anything twice. psycopg files a deadlock or a statement
    timeout under the same class as a lost connection; the SQLSTATE tells them apart."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and not state.startswith(("08", "57P"))


def is_connection_error(exc: BaseException) -> bool:
    """True for errors after which the same statement can succeed on a new connection
    (a dropped or terminated connection, a server restarting, a pool timeout, a busy
    SQLite database), as the drivers in use classify them. psycopg's class for these,
    ``OperationalError``, also holds server errors such as a deadlock or a statement
    timeout: :func:`rolled_back` tells those apart where it matters."""
    return isinstance(exc, _connection_errors)


def has_unread_input(fileno: int) -> bool:
    """True if an idle connection's socket has something to read: on a pooled
    connection nobody is reading, that is almost always the server's goodbye
    (terminated backend, restart), which a pool must find before handing it out."""
    readable, _, _ = select.select([fileno], [], [], 0)
    return bool(readable)


def own_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` with its traceback, cause and context (where it was raised),
    for one of several callers who share one failure: each may raise it in its own
    thread at once, and raising an exception rewrites its traceback."""
    try:
        clone = copy.copy(exc)
    except Exception:  # an exception class that cannot be rebuilt from its args
        return exc
    clone.__cause__ = exc.__cause__
    clone.__context__ = exc.__context__
    clone.__suppress_context__ = exc.__suppress_context__
    return clone.with_traceback(exc.__traceback__)


def interrupted(exc: BaseException) -> RuntimeError:
    """What the other callers of a group hear when the thread (or task) committing it
    for them is interrupted (KeyboardInterrupt, a signal handler's SystemExit, a
    cancellation): that one raises the interruption itself."""
    return RuntimeError(
        f"committing this write was interrupted ({type(exc).__name__}) before its "
        "outcome was known: it may or may not have been committed"
    )
