"""A web dashboard for Soniq: queues, charts, jobs, workers, and (when enabled) the
operator's actions, as an ASGI app (Starlette and Jinja2; ``pip install
'soniq[dashboard]'``).

``app(eq)`` is the ASGI application, to serve or to mount in FastAPI, Starlette or
Django; ``serve(eq)`` runs it with uvicorn on 127.0.0.1:8080, as ``soniq dashboard
module:eq`` does. See docs/dashboard.md.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
from typing import TYPE_CHECKING

from soniq import Soniq
from soniq.dashboard._web import AuthHook, build, parse_basic_auth

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["AuthHook", "app", "is_loopback", "parse_basic_auth", "serve"]


def app(
    eq: Soniq,
    *,
    actions: bool = False,
    auth: AuthHook | None = None,
    basic_auth: str | None = None,
    secret: str | bytes | None = None,
    refresh: float = 5.0,
    title: str = "Soniq",
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

    Served as the root application, its lifespan opens ``eq`` and closes it at
    shutdown. Mounted inside another app, the host's lifespan should open and close
    ``eq`` (the dashboard's first page opens it if not). It never migrates: run
    ``soniq migrate`` first.
    """
    return build(
        eq,
        actions=actions,
        auth=auth,
        basic_auth=basic_auth,
        secret=secret,
        refresh=refresh,
        title=title,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    eq: Soniq,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    actions: bool = False,
    basic_auth: str | None = None,
    auth: AuthHook | None = None,
    log_level: str = "info",
) -> None:
    """Serve :func:`app` of ``eq`` with uvicorn until SIGINT or SIGTERM, then close
    ``eq``. Binds 127.0.0.1 by default: only this machine can reach it."""
    import uvicorn

    dashboard = app(eq, actions=actions, basic_auth=basic_auth, auth=auth)
    config = uvicorn.Config(
        dashboard,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again
    # once its handlers are gone: with these, that ends this call instead of the
    # process (KeyboardInterrupt, or death by SIGTERM).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM, raised again by uvicorn after its graceful shutdown."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped
