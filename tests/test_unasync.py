"""tools/unasync.py: what the generator does to an async source (the generated
driver files themselves are checked by `python tools/unasync.py --check` in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import unasync


def test_awaits_and_async_members_go_and_names_become_their_twins() -> None:
    source = '''
from soniq.drivers._common import async_only, async_owner


class PostgresAsyncOps:
    """Uses AsyncConnectionPool."""

    async def get(self) -> int:
        async with self.lock:
            return await self.fetch(async_owner())

    @async_only
    async def claim(self) -> None:
        await self.fetch(1)
'''
    out = unasync.generate(source, "doc", set())
    assert "class PostgresSyncOps:" in out and "Uses ConnectionPool." in out
    assert "def get(self) -> int:" in out and "with self.lock:" in out
    assert "return self.fetch(sync_owner())" in out
    body = out.split("\n", 1)[1]  # below the "generated from the async source" header
    assert "await" not in body and "async" not in body and "claim" not in body


def test_f_strings_are_renamed_as_one_piece_and_nothing_after_them_moves() -> None:
    source = 'n = 1\nx = f"pool {n}: AsyncConnectionPool {AsyncConnectionPool!r}"\ny = 2\n'
    out = unasync.generate(source, "doc", set())
    assert 'x = f"pool {n}: ConnectionPool {ConnectionPool!r}"\ny = 2\n' in out


def test_a_ruff_that_fails_fails_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unasync.sys, "executable", "/nonexistent/python")
    with pytest.raises((SystemExit, OSError)):
        unasync.generate("x = 1\n", "doc", set())
