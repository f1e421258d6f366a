"""Job arguments <-> JSON.

Arguments are stored as ``jsonb``. PostgreSQL refuses things that Python's ``json``
module happily writes (``NaN``/``Infinity``, the NUL character, a lone UTF-16
surrogate), and ``json`` turns non-string dict keys into strings without a word. Each
of those would either abort the caller's business transaction or silently change the
job's input, so they are refused here, in Python, before any SQL is sent, with an error
that names the argument. So are the values past the documented maximums of
:mod:`soniq.core.limits`: nesting depth, integer size, JSON size.

The fast path serialises a whole batch with one C-level ``json.dumps`` call and looks
for trouble only when the output or the value types say there may be some. The checks
walk each value once, without building anything on success (the path to a bad value
is put together only when there is one), and recurse at most
:data:`~soniq.core.limits.MAX_NESTING_DEPTH` levels, so even a value that contains
itself gives a named error, never a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from soniq.core import limits
from soniq.core.errors import SerializationError

# ensure_ascii: the text parameter must survive any client_encoding of a caller's
# connection (a LATIN1 one cannot encode "☕"); jsonb stores the same value either way.
# It also makes the length of the text its size in bytes.
_encoder = json.JSONEncoder(allow_nan=False, ensure_ascii=True, separators=(",", ":"))
_dumps = _encoder.encode
_encode_str = json.encoder.encode_basestring_ascii
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_BOUND = 10**limits.MAX_INT_DIGITS
_SMALL_INT = 2**64
# The longest JSON of a float ("-2.2250738585072014e-308") or of an int64, plus the
# separators around it: what one scalar costs at most in the size estimate.
_SCALAR_CHARS = 30
# An escaped character is at most 6 characters (\u001f) in ASCII text, 12 (a
# surrogate pair) in other text.
_ASCII_ESCAPE = 6
_OTHER_ESCAPE = 12


def dumps(value: Any) -> str:
    """Serialise ``value`` (already checked) to compact JSON text."""
    text = _dumps(value)
    # Python writes floats from 1e16 up as "1e+16"; PostgreSQL's jsonb keeps such a
    # number as the integer 10000000000000000, which would come back as an int. Such
    # floats are written with a fraction instead ("10000000000000000.0"). The scan for
    # "e+" is one C-level search; only a hit (a big float, or "e+" inside a string)
    # takes the slower exact writer.
    if "e+" not in text:
        return text
    return "".join(_write(value, []))


def find_surrogate(text: str) -> re.Match[str] | None:
    """The first UTF-16 surrogate code point in ``text`` (not a character: PostgreSQL
    refuses it, and a pair of them would come back as another character), or None."""
    return None if text.isascii() else _SURROGATE.search(text)


def loads(text: str | None) -> Any:
    """Parse JSON text read back from the database (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


def loads_each(texts: Sequence[str]) -> list[Any]:
    """Parse many JSON texts (each one value) with one parser call: a claim's rows."""
    return json.loads("[" + ",".join(texts) + "]") if texts else []


def check_arguments(args: Mapping[str, Any], *, job: str) -> int:
    """Raise :class:`SerializationError` naming the first argument of ``args`` that
    cannot be stored as JSON exactly as given; else return an upper bound of the
    length of its JSON text (see :func:`check_payload` for the size limits)."""
    ascii_chars = other_chars = 0
    scalars = 2
    for name, value in args.items():
        kind = type(name)
        if kind is not str or not name.isascii() or "\x00" in name:
            problem = _key_problem(name)
            if problem is not None:
                raise SerializationError(f"job {job!r}: argument name {name!r} {problem}")
            other_chars += len(name)
        else:
            ascii_chars += len(name)
        kind = type(value)
        if kind is str:
            if value.isascii() and "\x00" not in value:
                ascii_chars += len(value)
                scalars += 1
                continue
        elif kind is int:
            if -_SMALL_INT < value < _SMALL_INT:
                scalars += 1
                continue
        elif kind is float:
            if math.isfinite(value):
                scalars += 1
                continue
        elif value is None or kind is bool:
            scalars += 1
            continue
        walk = _Walk()
        found = walk.visit(value, 1)
        if found is not None:
            raise SerializationError(f"job {job!r}: {found.describe(name)}")
        ascii_chars += walk.ascii_chars
        other_chars += walk.other_chars
        scalars += walk.scalars
    return ascii_chars * _ASCII_ESCAPE + other_chars * _OTHER_ESCAPE + scalars * _SCALAR_CHARS


def check_batch(batch: Iterable[Mapping[str, Any]], *, job: str) -> list[int]:
    """:func:`check_arguments` for each job of a batch, naming the job's index; the
    size bound of each job."""
    sizes = []
    for index, args in enumerate(batch):
        try:
            sizes.append(check_arguments(args, job=job))
        except SerializationError as exc:
            raise SerializationError(f"{exc} (in the job at index {index})") from None
    return sizes


def check_payload(batch: Sequence[Mapping[str, Any]], *, job: str) -> None:
    """Everything :func:`check_batch` checks, and the size limits of one enqueue call:
    :data:`~soniq.core.limits.MAX_ARGS_JSON_CHARS` per job and
    :data:`~soniq.core.limits.MAX_BATCH_JSON_CHARS` per call. The exact size is
    measured only when the cheap upper bound says a limit may be passed."""
    if len(batch) == 1:
        if check_arguments(batch[0], job=job) > limits.MAX_ARGS_JSON_CHARS:
            _check_size(batch[0], job, None)
        return
    sizes = check_batch(batch, job=job)
    measured = [False] * len(sizes)
    for index, size in enumerate(sizes):
        if size > limits.MAX_ARGS_JSON_CHARS:
            sizes[index] = _check_size(batch[index], job, index)
            measured[index] = True
    if sum(sizes) <= limits.MAX_BATCH_JSON_CHARS:
        return
    # Measure the jobs whose size is still a bound; the commas between jobs count too.
    exact = len(batch) + sum(
        size if known else len(_dumps(args))
        for args, size, known in zip(batch, sizes, measured, strict=True)
    )
    if exact > limits.MAX_BATCH_JSON_CHARS:
        each = max(1, limits.MAX_BATCH_JSON_CHARS * len(batch) // exact)
        raise SerializationError(
            f"job {job!r}: the arguments of the {len(batch):,} jobs of this enqueue_many "
            f"are {exact:,} characters of JSON, over the {limits.MAX_BATCH_JSON_CHARS:,} "
            "of one call (soniq.core.limits.MAX_BATCH_JSON_CHARS); split the batch into "
            f"calls of about {each:,} jobs"
        )


def _check_size(args: Mapping[str, Any], job: str, index: int | None) -> int:
    """The exact JSON length of one job's (checked) arguments; raise when it is over
    :data:`~soniq.core.limits.MAX_ARGS_JSON_CHARS`, naming the largest argument."""
    size = len(_dumps(args))
    if size <= limits.MAX_ARGS_JSON_CHARS:
        return size
    largest = max(args, key=lambda name: len(_dumps(args[name])))
    where = "" if index is None else f" (in the job at index {index})"
    raise SerializationError(
        f"job {job!r}: its arguments are {size:,} characters of JSON, over the "
        f"{limits.MAX_ARGS_JSON_CHARS:,} of one job "
        f"(soniq.core.limits.MAX_ARGS_JSON_CHARS); the largest is argument {largest!r} "
        f"({len(_dumps(args[largest])):,}). Store large data elsewhere (a table, a file, "
        f"object storage) and pass its id{where}"
    )


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return (
            f"is a {type(key).__name__}, not a str; JSON object keys are strings, so it "
            "would come back changed: use string keys"
        )
    return _text_problem(key)


def _non_string_key(key: object) -> str:
    return (
        f"has a non-string key {key!r}; JSON object keys are strings, so it would come "
        "back changed: use string keys"
    )


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is, or None."""
    if "\x00" in text:
        return (
            "contains a NUL character (\\u0000), which PostgreSQL cannot store in text "
            "or jsonb; remove it or encode the value"
        )
    found = find_surrogate(text)
    if found is not None:
        return (
            f"contains the UTF-16 surrogate {found.group()!r} at index {found.start()}, "
            "which is not a character: PostgreSQL refuses it and JSON would turn a "
            "pair into another character; decode the text properly (e.g. "
            "bytes.decode('utf-8') without errors='surrogateescape') or pass bytes "
            "as base64"
        )
    return None


class _Problem:
    """What is wrong, and the path to it (built from the inside out on the way back)."""

    __slots__ = ("reason", "steps")

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.steps: list[str] = []

    def describe(self, name: str) -> str:
        steps = self.steps[::-1]
        if len(steps) > 10:  # a deep value: its start and its end say enough
            steps = [*steps[:5], f"...({len(steps) - 8} more)...", *steps[-3:]]
        path = name + "".join(steps)
        return f"argument {path!r} {self.reason}"


class _Walk:
    """One walk over a value: the first problem, and what its JSON may cost."""

    __slots__ = ("ascii_chars", "other_chars", "scalars")

    def __init__(self) -> None:
        self.ascii_chars = 0
        self.other_chars = 0
        self.scalars = 0

    def visit(self, value: Any, depth: int) -> _Problem | None:
        if isinstance(value, str):
            self.scalars += 1
            if value.isascii() and "\x00" not in value:
                self.ascii_chars += len(value)
                return None
            problem = _text_problem(value)
            if problem is not None:
                return _Problem(problem)
            self.other_chars += len(value)
            return None
        if isinstance(value, bool) or value is None:
            self.scalars += 1
            return None
        if isinstance(value, int):
            if -_INT_BOUND < value < _INT_BOUND:
                self.scalars += 1 + value.bit_length() // 64
                return None
            return _Problem(
                f"is an integer of about {int(value.bit_length() * math.log10(2)) + 1:,} "
                f"digits, more than the {limits.MAX_INT_DIGITS} that every Python "
                "process can read back (soniq.core.limits.MAX_INT_DIGITS); pass it as "
                "a string"
            )
        if isinstance(value, float):
            self.scalars += 1
            if math.isfinite(value):
                return None
            return _Problem(
                f"is {value!r}, which JSON cannot represent; pass a finite number or None"
            )
        if isinstance(value, (dict, list, tuple)):
            if depth > limits.MAX_NESTING_DEPTH:
                return _Problem(
                    f"nests lists and dicts more than {limits.MAX_NESTING_DEPTH} levels "
                    "deep (soniq.core.limits.MAX_NESTING_DEPTH), or contains itself; "
                    "flatten it"
                )
            self.scalars += 1
            if isinstance(value, dict):
                return self._visit_dict(value, depth)
            for index, item in enumerate(value):
                found = self.visit(item, depth + 1)
                if found is not None:
                    found.steps.append(f"[{index}]")
                    return found
            return None
        if isinstance(value, Mapping):
            return _Problem(
                f"is a {_type_name(value)}, a mapping that JSON does not write; pass dict(value)"
            )
        return _Problem(
            f"is a {_type_name(value)}, which is not JSON; pass str, int, float, bool, "
            "None, list or dict (for example an id instead of an object)"
        )

    def _visit_dict(self, value: dict[Any, Any], depth: int) -> _Problem | None:
        for key, item in value.items():
            if not isinstance(key, str):
                return _Problem(_non_string_key(key))
            self.scalars += 1
            if key.isascii() and "\x00" not in key:
                self.ascii_chars += len(key)
            else:
                problem = _text_problem(key)
                if problem is not None:
                    bad_key = _Problem(problem)
                    bad_key.steps.append(f"[{key!r}] (key)")
                    return bad_key
                self.other_chars += len(key)
            found = self.visit(item, depth + 1)
            if found is not None:
                found.steps.append(f"[{key!r}]")
                return found
        return None


def _type_name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _write(value: Any, out: list[str]) -> list[str]:
    """Append the JSON of ``value`` to ``out`` as :data:`_encoder` would, except that a
    float written with an exponent "e+" is written in full with a fraction."""
    if isinstance(value, str):
        out.append(_encode_str(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        text = _dumps(value)  # refuses NaN and infinities as dumps does
        out.append(float.__format__(value, ".1f") if "e+" in text else text)
    elif isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(_encode_str(key if isinstance(key, str) else _dumps(key).strip('"')))
            out.append(":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        _dumps(value)  # raises the TypeError json raises for it
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return out
