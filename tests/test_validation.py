"""Document validation: located field errors that never repeat the offending value."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from gateway.errors import FieldError, SchemaInvalid
from gateway.validation import DocumentValidator, describe, pointer_of
from tests.conftest import CREDIT_EXAMPLE, SCHEMAS

CREDIT_REQUEST: dict[str, Any] = json.loads(
    (SCHEMAS / "credit.query" / "request.json").read_text(encoding="utf-8")
)
# Personal data that must never reach an error message.
RESIDENT_ID = "11010519491231002X"


def _credit(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(CREDIT_EXAMPLE)
    doc.update(changes)
    return doc


def test_schema_example_is_valid() -> None:
    """The credit.query example passes its own request schema."""
    validator = DocumentValidator(CREDIT_REQUEST)
    assert validator.errors(CREDIT_EXAMPLE) == []
    validator.validate(CREDIT_EXAMPLE)


def test_missing_required_property_is_named_at_the_parent() -> None:
    """A missing property is reported at its parent's pointer, by name."""
    doc = _credit()
    del doc["purpose"]
    assert DocumentValidator(CREDIT_REQUEST).errors(doc) == [
        FieldError("", "missing required property 'purpose'")
    ]


def test_unexpected_property_is_named() -> None:
    """An extra property is named (names are not values) at the parent's pointer."""
    doc = _credit(nickname="x")
    assert DocumentValidator(CREDIT_REQUEST).errors(doc) == [
        FieldError("", "unexpected property 'nickname'")
    ]


def test_bad_format_enum_and_type_are_located() -> None:
    """Format, enum and type violations each carry the pointer of the offending value."""
    doc = _credit(uscc="91350100M000100Y44", scope=["basic", "gossip"], purpose=7)
    errors = DocumentValidator(CREDIT_REQUEST).errors(doc)
    assert errors == [
        FieldError("/purpose", "must be of type string"),
        FieldError(
            "/scope/1", "must be one of 'basic', 'rating', 'dishonest', 'penalties', 'licenses'"
        ),
        FieldError("/uscc", "is not a valid uscc"),
    ]
    assert all("91350100M000100Y44" not in e.message for e in errors)


RULES: list[tuple[str, dict[str, Any], Any, str]] = [
    ("type", {"type": "integer"}, RESIDENT_ID, "must be of type integer"),
    ("format", {"format": "cn-resident-id"}, "11010519491231002Y", "is not a valid cn-resident-id"),
    ("enum", {"enum": ["a", "b"]}, RESIDENT_ID, "must be one of 'a', 'b'"),
    ("const", {"const": "fixed"}, RESIDENT_ID, "must equal 'fixed'"),
    ("pattern", {"pattern": "^[a-z]+$"}, RESIDENT_ID, "does not match the pattern ^[a-z]+$"),
    ("minLength", {"minLength": 30}, RESIDENT_ID, "must be at least 30 characters long"),
    ("maxLength", {"maxLength": 4}, RESIDENT_ID, "must be at most 4 characters long"),
    ("minimum", {"minimum": 10}, 3, "must be ≥ 10"),
    ("maximum", {"maximum": 10}, 110105194912310020, "must be ≤ 10"),
    ("exclusiveMinimum", {"exclusiveMinimum": 5}, 5, "must be > 5"),
    ("exclusiveMaximum", {"exclusiveMaximum": 5}, 5, "must be < 5"),
    ("multipleOf", {"multipleOf": 7}, 110105194912310020, "must be a multiple of 7"),
    ("minItems", {"minItems": 3}, [RESIDENT_ID], "must have at least 3 items"),
    ("maxItems", {"maxItems": 1}, [RESIDENT_ID, "x"], "must have at most 1 items"),
    ("uniqueItems", {"uniqueItems": True}, [RESIDENT_ID, RESIDENT_ID], "items must be unique"),
    ("minProperties", {"minProperties": 2}, {"id": RESIDENT_ID}, "must have at least 2 properties"),
    ("maxProperties", {"maxProperties": 0}, {"id": RESIDENT_ID}, "must have at most 0 properties"),
    (
        "oneOf",
        {"oneOf": [{"type": "string"}, {"minLength": 1}]},
        RESIDENT_ID,
        "does not match exactly one of the allowed forms",
    ),
    (
        "anyOf",
        {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        RESIDENT_ID,
        "does not match any of the allowed forms",
    ),
    ("not", {"not": {"type": "string"}}, RESIDENT_ID, "matches a form that is not allowed"),
    ("contains", {"contains": {"const": 1}}, [RESIDENT_ID], "fails the 'contains' rule"),
]


@pytest.mark.parametrize(
    ("schema", "instance", "message"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_each_rule_is_described_without_the_value(
    schema: dict[str, Any], instance: Any, message: str
) -> None:
    """Every rule's message says what is expected and never contains the instance."""
    validator = DocumentValidator({"type": "object", "properties": {"v": schema}})
    errors = validator.errors({"v": instance})
    assert errors == [FieldError("/v", message)]


def test_personal_data_never_reaches_a_message() -> None:
    """A resident ID violating many rules at once appears in none of the messages."""
    rules: list[dict[str, Any]] = [
        {"type": "integer"},
        {"enum": ["a"]},
        {"const": "b"},
        {"pattern": "^[a-z]+$"},
        {"maxLength": 3},
        {"format": "uscc"},
        {"not": {"type": "string"}},
        {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        {"propertyNames": {"maxLength": 1}},
    ]
    schema = {"type": "object", "properties": {f"p{i}": r for i, r in enumerate(rules)}}
    doc: dict[str, Any] = {f"p{i}": RESIDENT_ID for i in range(len(rules))}
    doc["p8"] = {RESIDENT_ID: RESIDENT_ID}
    errors = DocumentValidator(schema).errors(doc)
    assert len(errors) == len(rules)
    for error in errors:
        assert RESIDENT_ID not in error.message
        assert "19491231" not in error.message


def test_nested_pointer_escapes_tilde_and_slash() -> None:
    """Pointers follow RFC 6901: `~` becomes `~0`, `/` becomes `~1`, indexes are numbers."""
    schema = {
        "type": "object",
        "properties": {"a/b~c": {"type": "array", "items": {"type": "integer"}}},
    }
    errors = DocumentValidator(schema).errors({"a/b~c": [1, "two"]})
    assert errors == [FieldError("/a~1b~0c/1", "must be of type integer")]


def test_pointer_of_and_describe_work_on_raw_jsonschema_errors() -> None:
    """pointer_of/describe take a jsonschema ValidationError as it comes."""
    validator = jsonschema.Draft202012Validator(
        {"properties": {"list": {"items": {"maxLength": 2}}}}
    )
    (error,) = validator.iter_errors({"list": ["ok", RESIDENT_ID]})
    assert pointer_of(error) == "/list/1"
    assert describe(error) == "must be at most 2 characters long"
    assert RESIDENT_ID in error.message  # jsonschema's own message would leak it


def test_errors_are_capped_at_max_errors() -> None:
    """A document with many violations gives at most max_errors, and says so."""
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    doc = {f"field{i:02d}": RESIDENT_ID for i in range(30)}
    validator = DocumentValidator(schema, max_errors=5)
    errors = validator.errors(doc)
    assert len(errors) == 5
    assert [e.pointer for e in errors] == sorted(e.pointer for e in errors)
    with pytest.raises(SchemaInvalid) as caught:
        validator.validate(doc, what="response")
    assert len(caught.value.errors) == 5
    assert caught.value.detail == "the response has 5 schema violation(s) (first ones shown)"
    assert caught.value.status == 422
    assert caught.value.code == "schema_invalid"


def test_validate_counts_violations_below_the_cap() -> None:
    """Below the cap the detail counts every violation and does not claim truncation."""
    doc = _credit(scope=[], purpose="x")
    with pytest.raises(SchemaInvalid) as caught:
        DocumentValidator(CREDIT_REQUEST).validate(doc)
    assert caught.value.detail == "the request has 2 schema violation(s)"
    assert [e.as_dict() for e in caught.value.errors] == [
        {"pointer": "/purpose", "message": "must be at least 2 characters long"},
        {"pointer": "/scope", "message": "must have at least 1 items"},
    ]


def test_invalid_schema_is_refused_when_compiled() -> None:
    """A schema that is not Draft 2020-12 fails at construction, not per document."""
    with pytest.raises(jsonschema.SchemaError):
        DocumentValidator({"type": "no-such-type"})


def test_patterns_override_the_format_regexes() -> None:
    """A deployment's pattern for a named format replaces the default one."""
    schema = {"properties": {"case": {"type": "string", "format": "case-number"}}}
    default = DocumentValidator(schema)
    strict = DocumentValidator(schema, patterns={"case-number": r"^ZJ[0-9]{6}$"})
    assert default.errors({"case": "ABC-2026-000123"}) == []
    assert strict.errors({"case": "ABC-2026-000123"}) == [
        FieldError("/case", "is not a valid case-number")
    ]
    assert strict.errors({"case": "ZJ123456"}) == []


def test_two_missing_properties_give_two_distinct_errors() -> None:
    """Each missing property is reported once, by its own name."""
    validator = DocumentValidator({"type": "object", "required": ["a", "b"]})
    assert validator.errors({}) == [
        FieldError("", "missing required property 'a'"),
        FieldError("", "missing required property 'b'"),
    ]


def test_pattern_properties_are_not_reported_as_unexpected() -> None:
    """Only properties matched by neither properties nor patternProperties are unexpected."""
    schema = {
        "type": "object",
        "properties": {"a": {}},
        "patternProperties": {"^x-": {}},
        "additionalProperties": False,
    }
    errors = DocumentValidator(schema).errors({"a": 1, "x-extra": 2, "zz": 3})
    assert errors == [FieldError("", "unexpected property 'zz'")]


def test_false_subschema_has_a_meaningful_message() -> None:
    """A property forbidden by a `false` subschema is described in words, not 'None'."""
    schema = {"type": "object", "properties": {"legacy": False}}
    (error,) = DocumentValidator(schema).errors({"legacy": RESIDENT_ID})
    assert "None" not in error.message
    assert RESIDENT_ID not in error.message
