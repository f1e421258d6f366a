"""The throwaway cluster the suite falls back to when no server answers."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.throwaway_pg import throwaway_cluster


@pytest.mark.timeout(120)
def test_throwaway_cluster_starts_answers_and_goes_away(tmp_path: Path) -> None:
    with throwaway_cluster(tmp_path) as url:
        port = psycopg.conninfo.conninfo_to_dict(url)["port"]
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            row = conn.execute("SELECT current_setting('port')").fetchone()
            assert row is not None
            assert row[0] == str(port)

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3).close()
    assert list(tmp_path.iterdir()) == []  # its files are gone too
