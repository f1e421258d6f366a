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
from typing import Any

from soniq import Soniq
from soniq.dashboard._web import AuthHook, app, parse_basic_auth

__all__ = ["LOOPBACK_NAMES", "AuthHook", "app", "is_loopback", "parse_basic_auth", "serve"]

#: The ``Host`` names a dashboard served on a loopback address accepts by default.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve :func:`app` of ``eq`` (``options``: its own, ``actions``,
    ``basic_auth``...) with uvicorn until SIGINT or SIGTERM, then close ``eq``.
    Binds 127.0.0.1 by default: only this machine can reach it, and on a loopback
    address only requests naming it (:data:`LOOPBACK_NAMES`) are answered unless
    ``allowed_hosts`` says otherwise."""
    import uvicorn

    if is_loopback(host) and options.get("allowed_hosts") is None:
        options["allowed_hosts"] = LOOPBACK_NAMES
    dashboard = app(eq, **options)
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
