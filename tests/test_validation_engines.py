"""jsonschema-rs (the fast path) and jsonschema (the reference) agree on the same documents."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import make_format_checker
from gateway.validation import DocumentValidator
from tests.conftest import examples

SCHEMAS = sorted((Path(__file__).parent.parent / "schemas" / "services").glob("*/*.json"))
BAD_VALUES: list[Any] = [None, 0, -1, 1.5, "", "x" * 300, [], {}, True, "91350100M000100Y44"]


def _reference(schema: Any) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=make_format_checker())


def _mutations(doc: Any, depth: int = 0) -> Iterator[Any]:
    """The document with one value replaced or one key dropped, everywhere it can be."""
    if depth > 4:
        return
    if isinstance(doc, dict):
        for key in list(doc):
            dropped = copy.deepcopy(doc)
            del dropped[key]
            yield dropped
            for bad in BAD_VALUES:
                yield {**copy.deepcopy(doc), key: bad}
            for sub in _mutations(doc[key], depth + 1):
                yield {**copy.deepcopy(doc), key: sub}
        yield {**copy.deepcopy(doc), "unexpected": 1}
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            for sub in _mutations(item, depth + 1):
                yield [*doc[:i], sub, *doc[i + 1 :]]


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_engines_agree_on_examples_and_their_mutations(path: Path) -> None:
    """Every example, and every one-step mutation of it, gets the same verdict from both."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    fast = DocumentValidator(schema)
    reference = _reference(schema)
    examples = schema.get("examples", [])
    assert examples, f"{path} has no examples"
    checked = 0
    for example in examples:
        assert reference.is_valid(example), f"{path}: an example is invalid"
        for doc in [example, *_mutations(example)]:
            assert fast.is_valid(doc) == reference.is_valid(doc), (path.name, doc)
            assert (fast.errors(doc) == []) == reference.is_valid(doc)
            checked += 1
    assert checked > 20


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=examples(300), deadline=None)
@given(doc=json_values, index=st.integers(min_value=0, max_value=len(SCHEMAS) - 1))
def test_engines_agree_on_arbitrary_json(doc: Any, index: int) -> None:
    """Random JSON values (almost all invalid) get the same verdict from both engines."""
    schema = json.loads(SCHEMAS[index].read_text(encoding="utf-8"))
    assert DocumentValidator(schema).is_valid(doc) == _reference(schema).is_valid(doc)
