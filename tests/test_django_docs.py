"""docs/django.md, checked: each Python block is a verbatim excerpt of the example
project (``examples/django_app``, whose tests tests/test_django.py runs), or a
settings block run here, or says why it is not run; the names it gives (settings and
their defaults, the Tasks backend's path and features, the commands, the migrations)
are the code's."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import ROOT

pytest.importorskip("django")

DOC = ROOT / "docs" / "django.md"
BLOCK = re.compile(r"(?:(?P<marker><!-- [^>]+ -->)\n)?```python\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[str | None, str]]:
    return [(m["marker"], m["code"]) for m in BLOCK.finditer(DOC.read_text())]


def test_every_block_is_an_excerpt_runs_here_or_says_why_not() -> None:
    excerpts = run = 0
    for marker, code in blocks():
        if marker is None:
            namespace: dict[str, Any] = {}
            exec(compile(code, str(DOC), "exec"), namespace)
            run += 1
        elif marker.startswith("<!-- excerpt: "):
            path = ROOT / marker.removeprefix("<!-- excerpt: ").removesuffix(" -->")
            assert code in path.read_text(), f"not a part of {path}:\n{code}"
            excerpts += 1
        else:
            assert marker.startswith("<!-- not run: "), marker
    assert (excerpts, run) == (5, 2)


def test_the_settings_shown_are_the_defaults() -> None:
    from soniq.contrib.django.apps import TASKS_BACKEND
    from soniq.contrib.django.conf import DEFAULTS

    settings, tasks = [code for marker, code in blocks() if marker is None]
    namespace: dict[str, Any] = {}
    exec(settings, namespace)
    assert "soniq.contrib.django" in namespace["INSTALLED_APPS"]
    assert namespace["SONIQ"] == dict(DEFAULTS)
    exec(tasks, namespace)
    assert namespace["TASKS"]["default"]["BACKEND"] == TASKS_BACKEND


def test_the_commands_and_migrations_named_exist() -> None:
    from soniq.cli import commands as soniq_commands
    from soniq.core.sql.migrate import MIGRATIONS

    text = DOC.read_text()
    table = text[text.index("## Management commands") : text.index("## Migrations")]
    named = set(re.findall(r"`(?:manage\.py soniq )?(\w+)(?: [^`]*)?`", table))
    commands = set(soniq_commands())
    assert commands <= named, commands - named
    first, last = MIGRATIONS[0], MIGRATIONS[-1]
    assert f"soniq/{first.version:04d}_{first.name}" in text
    assert f"soniq/{last.version:04d}_{last.name}" in text


def test_the_tasks_features_shown_are_the_backends() -> None:
    source = (ROOT / "soniq" / "contrib" / "django" / "tasks.py").read_text()
    supported = set(re.findall(r"^    (supports_\w+) = True$", source, re.M))
    assert supported == {
        "supports_defer",
        "supports_async_task",
        "supports_get_result",
        "supports_priority",
    }
    text = DOC.read_text()
    assert all(f"`{flag}`" in text for flag in supported)


def test_the_versions_shown_are_the_ones_nox_runs() -> None:
    noxfile = (ROOT / "noxfile.py").read_text()
    pairs = re.findall(r'\("(3\.\d+)", "(\d\.\d)"\)', noxfile)
    assert pairs, "DJANGO_VERSIONS not found in noxfile.py"
    text = DOC.read_text()
    for python, django in pairs:
        assert re.search(
            rf"^\| {re.escape(django)}( \(LTS\))? \| {re.escape(python)} \|", text, re.M
        )


def test_the_example_readme_names_its_files() -> None:
    readme = (ROOT / "examples" / "django_app" / "README.md").read_text()
    for name in ("project/settings.py", "shop/jobs.py", "shop/views.py", "shop/tests.py"):
        assert name in readme and (ROOT / "examples" / "django_app" / name).is_file()
