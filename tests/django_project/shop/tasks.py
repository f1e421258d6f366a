"""A ``tasks`` module that no test imports: autodiscovery must find it."""

from __future__ import annotations

from soniq.contrib.django import eq


@eq.job(name="shop.autodiscovered")
def autodiscovered() -> str:
    return "found"
