"""docs/metrics.md, checked: its Python examples (middleware, Prometheus,
OpenTelemetry) run on ``memory://``, an SQLite file and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_flow_docs import database

__all__ = ["database"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_there_are_three_examples() -> None:
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("index", range(3), ids=["middleware", "prometheus", "otel"])
def test_the_example_runs(database: str, index: int) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_metrics_{index}", "DATABASE_URL": database}
    exec(compile(EXAMPLES[index], str(DOC), "exec"), namespace)
