"""Job arguments <-> JSON.

Arguments are stored as ``jsonb``. PostgreSQL refuses two things that Python's ``json``
module happily writes (``NaN``/``Infinity`` and the NUL character), and ``json`` turns
non-string dict keys into strings without a word. Each of those would either abort the
caller's business transaction or silently change the job's input, so they are refused
here, in Python, before any SQL is sent, with an error that names the argument.

The fast path serialises a whole batch with one C-level ``json.dumps`` call and looks
for trouble only when the output or the value types say there may be some.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from soniq.core.errors import SerializationError

# ensure_ascii: the text parameter must survive any client_encoding of a caller's
# connection (a LATIN1 one cannot encode "☕"); jsonb stores the same value either way.
_encoder = json.JSONEncoder(allow_nan=False, ensure_ascii=True, separators=(",", ":"))
_dumps = _encoder.encode
_SCALARS = (str, int, float, bool, type(None))


def dumps(value: Any) -> str:
    """Serialise ``value`` (already checked) to compact JSON text."""
    return _dumps(value)


def loads(text: str | None) -> Any:
    """Parse JSON text read back from the database (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


def loads_each(texts: Sequence[str]) -> list[Any]:
    """Parse many JSON texts (each one value) with one parser call: a claim's rows."""
    return json.loads("[" + ",".join(texts) + "]") if texts else []


def check_arguments(args: Mapping[str, Any], *, job: str) -> None:
    """Raise :class:`SerializationError` naming the first argument of ``args`` that
    cannot be stored as JSON exactly as given."""
    for name, value in args.items():
        if type(value) in _SCALARS and not _suspicious_scalar(value):
            continue
        problem = _find_problem(value, name)
        if problem is not None:
            raise SerializationError(f"job {job!r}: {problem}")


def check_batch(batch: Iterable[Mapping[str, Any]], *, job: str) -> None:
    """:func:`check_arguments` for each job of a batch, naming the job's index."""
    for index, args in enumerate(batch):
        try:
            check_arguments(args, job=job)
        except SerializationError as exc:
            raise SerializationError(f"{exc} (in the job at index {index})") from None


def _suspicious_scalar(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\x00" in value
    return False


def _find_problem(value: Any, path: str) -> str | None:
    """Walk ``value`` and describe the first thing JSON/jsonb cannot hold, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        if "\x00" in value:
            return (
                f"argument {path!r} contains a NUL character (\\u0000), which "
                "PostgreSQL cannot store in jsonb; remove it or encode the value"
            )
        return None
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return (
                f"argument {path!r} is {value!r}, which JSON cannot represent; "
                "pass a finite number or None"
            )
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"argument {path!r} has a non-string key {key!r}; JSON object keys "
                    "are strings, so it would come back changed: use string keys"
                )
            problem = _find_problem(key, f"{path}[{key!r}] (key)") or _find_problem(
                item, f"{path}[{key!r}]"
            )
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = _find_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    return (
        f"argument {path!r} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which is not JSON; pass str, int, float, bool, None, list or dict "
        "(for example an id instead of an object)"
    )
