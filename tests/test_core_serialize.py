"""Arguments to JSON: what PostgreSQL's jsonb cannot hold is refused, naming it."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soniq.core import serialize
from soniq.core.errors import SerializationError


@pytest.mark.parametrize(
    ("args", "named", "hint"),
    [
        ({"ratio": math.nan}, "'ratio'", "finite"),
        ({"ratio": math.inf}, "'ratio'", "finite"),
        ({"note": "a\x00b"}, "'note'", "NUL"),
        ({"tags": {1: "x"}}, "'tags'", "non-string key"),
        ({"when": dt.datetime(2026, 1, 1)}, "'when'", "datetime.datetime"),
        ({"deep": {"list": [1, {"x": math.nan}]}}, "deep['list'][1]['x']", "finite"),
        ({"deep": {"k\x00": 1}}, "(key)", "NUL"),
        ({"obj": object()}, "'obj'", "builtins.object"),
        ({"raw": b"bytes"}, "'raw'", "not JSON"),
    ],
)
def test_bad_arguments_are_named(args: dict[str, object], named: str, hint: str) -> None:
    with pytest.raises(SerializationError) as info:
        serialize.check_arguments(args, job="billing.send")
    message = str(info.value)
    assert named in message and hint in message and "billing.send" in message


def test_batch_errors_name_the_index() -> None:
    with pytest.raises(SerializationError, match=r"index 2"):
        serialize.check_batch([{"a": 1}, {"a": 2}, {"a": math.nan}], job="j")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda s: "\x00" not in s),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text().filter(lambda s: "\x00" not in s), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(min_size=1).filter(lambda s: "\x00" not in s), json_values))
def test_valid_arguments_round_trip(args: dict[str, object]) -> None:
    serialize.check_arguments(args, job="j")
    assert serialize.loads(serialize.dumps(args)) == args


def test_dumps_refuses_nan_even_unchecked() -> None:
    with pytest.raises(ValueError):
        serialize.dumps({"x": math.nan})
    assert json.loads(serialize.dumps({"é": "ü"})) == {"é": "ü"}
