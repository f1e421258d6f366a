"""The code about to be deployed, for ``soniq check`` (tests/test_check.py): its
database comes from the environment the test sets."""

from __future__ import annotations

import os
from typing import Any

from soniq import Soniq

eq = Soniq(
    os.environ["SONIQ_CHECK_DATABASE_URL"], schema=os.environ.get("SONIQ_CHECK_SCHEMA", "public")
)


@eq.job(name="check.send")
def send(to: str, subject: str, body: str = "") -> None: ...


@eq.job(name="check.ping")
async def ping(**extra: Any) -> None: ...
