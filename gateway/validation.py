"""JSON Schema (Draft 2020-12) validation of exchanged documents, compiled once per schema.

Violations are reported as ``{pointer, message}`` pairs. Messages describe the rule that
failed and never echo the offending value: documents carry personal data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, ValidationError

from gateway.errors import FieldError, SchemaInvalid
from gateway.formats import make_format_checker

__all__ = ["DocumentValidator", "describe", "pointer_of"]


def pointer_of(error: ValidationError | SchemaError) -> str:
    """RFC 6901 JSON Pointer to the offending value."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in error.absolute_path)


def describe(error: ValidationError) -> str:
    """What rule failed, without the instance value (it may be personal data)."""
    rule = error.validator
    expected: Any = error.validator_value
    schema: Any = error.schema
    if rule == "required":
        instance = error.instance if isinstance(error.instance, Mapping) else {}
        missing = [name for name in expected if name not in instance]
        return f"missing required property {', '.join(map(repr, missing))}"
    if rule == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return f"unexpected property {', '.join(map(repr, extra))}"
    if rule == "type":
        return f"must be of type {expected}"
    if rule == "format":
        return f"is not a valid {expected}"
    if rule == "enum":
        return f"must be one of {', '.join(map(repr, expected))}"
    if rule == "const":
        return f"must equal {expected!r}"
    if rule == "pattern":
        return f"does not match the pattern {expected}"
    limits = {
        "minLength": "must be at least {} characters long",
        "maxLength": "must be at most {} characters long",
        "minimum": "must be ≥ {}",
        "maximum": "must be ≤ {}",
        "exclusiveMinimum": "must be > {}",
        "exclusiveMaximum": "must be < {}",
        "minItems": "must have at least {} items",
        "maxItems": "must have at most {} items",
        "minProperties": "must have at least {} properties",
        "maxProperties": "must have at most {} properties",
        "multipleOf": "must be a multiple of {}",
    }
    if rule in limits:
        return limits[str(rule)].format(expected)
    if rule == "uniqueItems":
        return "items must be unique"
    if rule in ("oneOf", "anyOf"):
        return f"does not match {'exactly one' if rule == 'oneOf' else 'any'} of the allowed forms"
    if rule == "not":
        return "matches a form that is not allowed"
    return f"fails the {rule!r} rule"


class DocumentValidator:
    """One compiled schema (request, response or callback) of one service."""

    def __init__(
        self,
        schema: Mapping[str, Any] | bool,
        *,
        max_errors: int = 20,
        patterns: Mapping[str, str] | None = None,
    ) -> None:
        jsonschema.Draft202012Validator.check_schema(schema)
        self._validator = jsonschema.Draft202012Validator(
            schema, format_checker=make_format_checker(patterns)
        )
        self._max_errors = max_errors

    def errors(self, document: Any) -> list[FieldError]:
        found: list[FieldError] = []
        for err in self._validator.iter_errors(document):
            # Report the leaves of oneOf/anyOf only when there is a single best branch.
            found.append(FieldError(pointer_of(err), describe(err)))
            if len(found) >= self._max_errors:
                break
        found.sort(key=lambda e: e.pointer)
        return found

    def validate(self, document: Any, what: str = "request") -> None:
        errors = self.errors(document)
        if errors:
            n = len(errors)
            capped = " (first ones shown)" if n >= self._max_errors else ""
            raise SchemaInvalid(f"the {what} has {n} schema violation(s){capped}", errors)
