"""Generate Soniq's blocking modules from their async sources, on the syntax tree.

The async file is the source of truth (psycopg's ``tools/async_to_sync.py`` is the
model). The tool parses it and edits the text at the places the tree points to, so
comments, ``# type: ignore`` markers and layout survive:

- ``async def``/``async with``/``async for`` lose ``async``; ``await x`` becomes ``x``;
- names, attributes and imported names are renamed by :data:`RENAMES` (a rename that
  matches nothing in any file fails the run, so the table cannot rot);
- a member decorated ``@async_only`` (``soniq.drivers._common``) is dropped: the
  worker's operations exist on the async side only, and the generated files carry
  nothing that nothing calls;
- ``if is_async(): A else: B`` keeps B alone (and drops A).

``python tools/unasync.py --check`` exits 1 when a generated file differs from what it
would generate; CI runs it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (async source, sync target, docstring of the target)
FILES = [
    (
        "soniq/drivers/postgres_async.py",
        "soniq/drivers/postgres_sync.py",
        "The job operations on PostgreSQL for blocking drivers (psycopg 3 sync).",
    ),
    (
        "soniq/drivers/psycopg_async.py",
        "soniq/drivers/psycopg_sync.py",
        "The psycopg 3 blocking driver, with ``psycopg_pool.ConnectionPool``: what\n"
        "``eq.sync`` uses to enqueue, inspect and migrate.",
    ),
]

#: Names (variables, attributes, imported names, module paths) and their blocking twins.
RENAMES = {
    "AsyncIterator": "Iterator",
    "asynccontextmanager": "contextmanager",
    "AbstractAsyncContextManager": "AbstractContextManager",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnection": "Connection",
    "AsyncCursor": "Cursor",
    "PsycopgAsyncDriver": "PsycopgSyncDriver",
    "PostgresAsyncOps": "PostgresSyncOps",
    "soniq.drivers.postgres_async": "soniq.drivers.postgres_sync",
    "async_owner": "sync_owner",
    "AsyncInsertLine": "SyncInsertLine",
}

_Edit = tuple[int, int, str]  # (start offset, end offset, replacement)
_WORDS = re.compile(
    r"(?<!\w)(" + "|".join(sorted(map(re.escape, RENAMES), key=len, reverse=True)) + r")\b"
)


class _Finder(ast.NodeVisitor):
    """Collects the text edits that turn the async module into its blocking twin."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.edits: list[_Edit] = []
        self.used: set[str] = set()

    def offset(self, line: int, col: int) -> int:
        # ast columns count UTF-8 bytes; the sources are ASCII where it matters.
        return self.starts[line - 1] + col

    def drop_lines(self, first: int, last: int) -> None:
        self.edits.append((self.starts[first - 1], self.starts[last], ""))

    def remove_keyword(self, node: ast.AST, keyword: str) -> None:
        start = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        if not self.source.startswith(keyword, start):
            raise SystemExit(f"unasync: expected {keyword!r} at line {node.lineno}")  # type: ignore[attr-defined]
        self.edits.append((start, start + len(keyword), ""))

    def rename(self, node: ast.AST, old: str) -> None:
        """``old`` ends where ``node`` ends: replace it with its twin."""
        end = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        self.edits.append((end - len(old), end, RENAMES[old]))
        self.used.add(old)

    def _members(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            self.visit(child)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if any(_is_name(d, "async_only") for d in node.decorator_list):
            first = min(d.lineno for d in node.decorator_list)
            self.drop_lines(first, node.end_lineno or node.lineno)
            return
        if isinstance(node, ast.AsyncFunctionDef):
            self.remove_keyword(node, "async ")
        self._members(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if any(_is_name(d, "async_only") for d in node.decorator_list):
            first = min(d.lineno for d in node.decorator_list)
            self.drop_lines(first, node.end_lineno or node.lineno)
            return
        if node.name in RENAMES:
            line = self.lines[node.lineno - 1]
            start = self.offset(node.lineno, line.index(f"class {node.name}") + len("class "))
            self.edits.append((start, start + len(node.name), RENAMES[node.name]))
            self.used.add(node.name)
        self._members(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        """Docstrings and messages name the twin too (whole words only)."""
        if isinstance(node.value, str):
            self._rename_words(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        """An f-string is renamed as one piece of text, its replacement fields too:
        before Python 3.12 the positions of its inner nodes are not reliable."""
        self._rename_words(node)

    def _rename_words(self, node: ast.expr) -> None:
        start = self.offset(node.lineno, node.col_offset)
        end = self.offset(node.end_lineno or node.lineno, node.end_col_offset or 0)
        text = self.source[start:end]
        renamed = _WORDS.sub(lambda m: RENAMES[m[0]], text)
        if renamed != text:
            self.used.update(_WORDS.findall(text))
            self.edits.append((start, end, renamed))

    def visit_AsyncWith(self, node: ast.AsyncWith) -> None:
        self.remove_keyword(node, "async ")
        self._members(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        self.remove_keyword(node, "async ")
        self._members(node)

    def visit_Await(self, node: ast.Await) -> None:
        self.remove_keyword(node, "await ")
        self._members(node)

    def visit_If(self, node: ast.If) -> None:
        if not (isinstance(node.test, ast.Call) and _is_name(node.test.func, "is_async")):
            self._members(node)
            return
        # Keep the else branch, dedented to the if's level; drop the rest.
        end = node.end_lineno or node.lineno
        if not node.orelse:
            self.drop_lines(node.lineno, end)
            return
        first_else = node.orelse[0].lineno
        kept = "".join(self.lines[first_else - 1 : end])
        indent = node.col_offset
        inner = node.orelse[0].col_offset
        dedented = "".join(
            line[inner - indent :] if line.strip() else line for line in kept.splitlines(True)
        )
        self.edits.append((self.starts[node.lineno - 1], self.starts[end], dedented))
        for child in node.orelse:
            self.visit(child)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in RENAMES:
            self.rename(node, node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.visit(node.value)
        if node.attr in RENAMES:
            self.rename(node, node.attr)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name in RENAMES:
                self.rename(alias, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module in RENAMES:
            line = self.lines[node.lineno - 1]
            start = self.offset(node.lineno, line.index(node.module))
            self.edits.append((start, start + len(node.module), RENAMES[node.module]))
            self.used.add(node.module)
        for alias in node.names:
            if alias.name in RENAMES:
                self.rename(alias, alias.name)


def _is_name(node: ast.expr, name: str) -> bool:
    return (isinstance(node, ast.Name) and node.id == name) or (
        isinstance(node, ast.Attribute) and node.attr == name
    )


def generate(source: str, docstring: str, used: set[str]) -> str:
    """The blocking twin of ``source`` (formatted with ruff, as the sources are)."""
    tree = ast.parse(source)
    finder = _Finder(source)
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        finder.drop_lines(body[0].lineno, body[0].end_lineno or body[0].lineno)
        body = body[1:]
    for node in body:
        finder.visit(node)
    text = source
    for start, end, replacement in sorted(finder.edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    used |= finder.used
    header = "# Generated by tools/unasync.py from the async source: DO NOT EDIT.\n"
    return _formatted(f'{header}"""{docstring}\n"""\n{text}')


def _formatted(text: str) -> str:
    """The text as ``ruff check --fix`` (imports) and ``ruff format`` leave it."""
    for args in (["check", "--fix-only", "--select", "I,F401", "-q"], ["format", "-q"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "--stdin-filename", "generated.py", "-"],
            input=text,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0 or not done.stdout:
            raise SystemExit(f"unasync: ruff {args[0]} failed: {done.stderr.strip()}")
        text = done.stdout
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args()
    stale = False
    used: set[str] = set()
    for source, target, docstring in FILES:
        wanted = generate((ROOT / source).read_text(), docstring, used)
        path = ROOT / target
        current = path.read_text() if path.exists() else ""
        if current == wanted:
            continue
        if args.check:
            stale = True
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True), wanted.splitlines(True), target, "generated"
                )
            )
        else:
            path.write_text(wanted)
            print(f"unasync: wrote {target}")
    unused = sorted(set(RENAMES) - used)
    if unused:
        raise SystemExit(f"unasync: renames {unused} matched nothing; remove them")
    if stale:
        print("unasync: generated files are stale; run `python tools/unasync.py`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
