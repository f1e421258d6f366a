"""Job bodies that misbehave, for ``tests/test_hostile_jobs.py``. A worker must turn
each into one recorded outcome with a readable ``last_error`` and keep running.

:func:`register` adds them to any Soniq as ``hostile.<function name>``; the module's
own ``eq`` is for worker subprocesses (``soniq worker tests.hostile_app:eq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from soniq import Soniq

URL = os.environ.get("SONIQ_HOSTILE_APP_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SONIQ_HOSTILE_APP_SCHEMA", "public")

#: Set to let the stuck sync jobs' threads return.
release_stuck = threading.Event()


class UnprintableError(Exception):
    """Its str() and repr() raise."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this error is broken")

    def __repr__(self) -> str:
        raise RuntimeError("repr() of this error is broken")


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr() of this value is broken")


async def async_unprintable() -> None:
    raise UnprintableError


def sync_unprintable() -> None:
    raise UnprintableError


async def async_exit() -> None:
    raise SystemExit(3)


def sync_exit() -> None:
    raise SystemExit(3)


async def async_interrupt() -> None:
    raise KeyboardInterrupt


async def async_raises_cancelled() -> None:
    raise asyncio.CancelledError


async def enormous_error() -> None:
    raise ValueError("x" * 5_000_000)


async def returns_object() -> object:
    return Unprintable()


def sync_returns_set() -> object:
    return {1, 2, 3}


async def returns_deep() -> object:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    return value


async def returns_nan() -> float:
    return float("nan")


async def returns_huge() -> str:
    return "y" * 2_000_000


async def never_returns() -> None:
    """Swallows every cancellation: only its timeout can end its run."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)


def sync_stuck() -> None:
    release_stuck.wait(60)


async def ok(n: int) -> int:
    return n


#: Every hostile body, with the status and the start of ``last_error`` it must end in.
EXPECTED: dict[str, tuple[str, str]] = {
    "async_unprintable": ("failed", "UnprintableError: <str() failed: RuntimeError>"),
    "sync_unprintable": ("failed", "UnprintableError: <str() failed: RuntimeError>"),
    "async_exit": ("failed", "SystemExit: 3"),
    "sync_exit": ("failed", "SystemExit: 3"),
    "async_interrupt": ("failed", "KeyboardInterrupt"),
    "async_raises_cancelled": ("failed", "CancelledError"),
    "enormous_error": ("failed", "ValueError: xxxx"),
    "returns_object": ("done", "ResultNotStored: the job returned a tests.hostile_app.Unprintable"),
    "sync_returns_set": ("done", "ResultNotStored: the job returned a builtins.set"),
    "returns_deep": ("done", "ResultNotStored: the job returned a builtins.list"),
    "returns_nan": ("done", "ResultNotStored: the job returned a builtins.float"),
    "returns_huge": ("done", "ResultNotStored: the job returned a builtins.str"),
    "never_returns": ("failed", "JobTimeout: job ran past its timeout of 0.2s"),
}

_TIMEOUTS = {"never_returns": 0.2, "sync_stuck": 0.2}


def register(eq: Soniq) -> None:
    """Register every body of this module on ``eq`` as ``hostile.<name>``, without
    retries (so one run, one outcome)."""
    bodies: list[Callable[..., Any]] = [globals()[name] for name in EXPECTED]
    for func in [*bodies, sync_stuck, ok]:
        eq.job(
            name=f"hostile.{func.__name__}",
            max_retries=0,
            timeout=_TIMEOUTS.get(func.__name__),
        )(func)


eq = Soniq(URL, schema=SCHEMA)
register(eq)
