"""Waiting for a condition, bounded in time: for tests, and for the tools that share
their helpers (so no pytest here)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30, what: str = "the condition"
) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; fail the
    test after ``timeout`` seconds, naming ``what`` it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
