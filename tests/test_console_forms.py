"""Form fields generated from JSON Schemas, and form values read back into JSON."""

from __future__ import annotations

from typing import Any

import jsonschema

from adapters.http import HttpAdapter
from gateway.admin.console.forms import (
    config_fields,
    config_from_form,
    errors_by_field,
    field_of,
    resubmitted,
)
from gateway.errors import FieldError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url", "mode"],
    "properties": {
        "url": {"type": "string", "description": "Where to send."},
        "mode": {"enum": ["fast", "safe"], "default": "safe"},
        "level": {"enum": [1, 2]},
        "retries": {"type": "integer", "default": 3},
        "timeout_s": {"type": "number"},
        "verbose": {"type": "boolean", "default": False},
        "strict": {"type": "boolean"},
        "headers": {"type": "object"},
    },
}


def test_fields_take_labels_help_defaults_and_controls_from_the_schema() -> None:
    """Property name → label, description → help, default → value, enum → select."""
    fields = {f.label: f for f in config_fields(SCHEMA)}
    assert list(fields) == list(SCHEMA["properties"])
    assert fields["url"].help == "Where to send."
    assert fields["url"].required
    assert fields["url"].name == "config.url"
    assert fields["url"].id == "f-config-url"
    assert (fields["mode"].control, fields["mode"].options, fields["mode"].value) == (
        "select",
        ("fast", "safe"),
        "safe",
    )
    assert fields["level"].options == ("", "1", "2")  # optional, no default: "not set" first
    assert (fields["retries"].control, fields["retries"].value) == ("integer", "3")
    assert fields["timeout_s"].control == "number"
    assert (fields["verbose"].control, fields["verbose"].checked) == ("checkbox", False)
    assert fields["strict"].control == "boolean"
    assert fields["strict"].options == (
        "",
        "true",
        "false",
    )
    assert fields["headers"].control == "json"


def test_current_values_and_submitted_text_are_shown_back() -> None:
    """An edit form shows the current config; a rejected form shows what was typed."""
    current = {"url": "http://a", "headers": {"X": "1"}, "verbose": True, "strict": False}
    fields = {f.label: f for f in config_fields(SCHEMA, current)}
    assert fields["url"].value == "http://a"
    assert fields["headers"].value == '{\n  "X": "1"\n}'
    assert fields["verbose"].checked
    assert fields["strict"].value == "false"
    assert fields["retries"].value == ""  # not in the config: left blank, not refilled
    typed = {"config.url": "ftp://x", "config.retries": "three"}
    errors = {"config.url": ["does not match"]}
    shown = {f.label: f for f in config_fields(SCHEMA, None, errors, submitted=typed)}
    assert shown["url"].value == "ftp://x"
    assert shown["url"].errors == ("does not match",)
    assert shown["retries"].value == "three"
    assert not shown["verbose"].checked


def test_form_values_become_typed_json_and_blanks_are_left_out() -> None:
    """Numbers, enums and JSON are parsed; blank fields are omitted so defaults apply."""
    form = {
        "config.url": " http://x ",
        "config.mode": "fast",
        "config.level": "2",
        "config.retries": "",
        "config.timeout_s": "2.5",
        "config.verbose": "true",
        "config.strict": "false",
        "config.headers": '{"A": "b"}',
    }
    config, errors = config_from_form(SCHEMA, form)
    assert errors == {}
    assert config == {
        "url": "http://x",
        "mode": "fast",
        "level": 2,
        "timeout_s": 2.5,
        "verbose": True,
        "strict": False,
        "headers": {"A": "b"},
    }
    assert config_from_form(SCHEMA, {})[0] == {"verbose": False}  # an unchecked box is false


def test_unreadable_values_are_errors_on_their_own_fields() -> None:
    """Text in a number field, broken JSON, infinity: each named on its field."""
    form = {
        "config.retries": "1.5",
        "config.timeout_s": "inf",
        "config.headers": "{nope",
        "config.level": "7",
    }
    config, errors = config_from_form(SCHEMA, form)
    assert set(errors) == {"config.retries", "config.timeout_s", "config.headers"}
    assert errors["config.headers"][0].startswith("is not JSON")
    assert config == {"level": "7", "verbose": False}  # not an option: the schema says so


def test_every_installed_adapter_types_form_round_trips_its_defaults() -> None:
    """A form generated from a real config_schema reads back into a config that schema
    accepts (given its required fields)."""
    schema = HttpAdapter.config_schema
    fields = config_fields(schema)
    form = {f.name: ("true" if f.checked else f.value) for f in fields}
    form["config.url"] = "http://127.0.0.1:9/{service}"
    config, errors = config_from_form(schema, form)
    assert errors == {}
    jsonschema.Draft202012Validator(schema).validate(config)
    assert config == {"url": "http://127.0.0.1:9/{service}", "forward_user": True}


def test_api_errors_land_on_the_field_their_pointer_names() -> None:
    """The longest input whose path prefixes the pointer takes the error; the rest go to
    the default (the whole form, or one JSON text area)."""
    names = ["name", "type", "config.url", "config.verify_response"]
    assert field_of("/config/url", names) == "config.url"
    assert field_of("/config/verify_response/keys/0", names) == "config.verify_response"
    assert field_of("/config/urls", names) == ""
    errors = [
        FieldError("/config/url", "does not match"),
        FieldError("/config/verify_response/keys", "too short"),
        FieldError("", "the change would make the configuration invalid"),
    ]
    assert errors_by_field(errors, names) == {
        "config.url": ["does not match"],
        "config.verify_response": ["/keys: too short"],
        "": ["the change would make the configuration invalid"],
    }
    assert errors_by_field([FieldError("/kty", "required")], [], default="jwk") == {
        "jwk": ["/kty: required"]
    }


def test_a_write_only_field_says_so_and_a_refused_form_never_shows_what_was_typed() -> None:
    """A writeOnly field is marked and explained; a refused form never shows a typed secret."""
    schema = {
        "type": "object",
        "properties": {
            "password": {"type": "string", "writeOnly": True},
            "url": {"type": "string"},
        },
    }
    fields = {f.label: f for f in config_fields(schema, {"password": "set · 1a2b3c4d"})}
    assert fields["password"].write_only
    assert fields["password"].value == "set · 1a2b3c4d"
    assert fields["password"].help is not None
    assert "Write-only" in fields["password"].help
    assert not fields["url"].write_only
    http = {f.label: f for f in config_fields(HttpAdapter.config_schema)}
    assert http["headers"].write_only
    form = {"config.password": "hunter2", "config.url": "http://x/"}
    back = resubmitted(schema, form, {"password": "set · 00000000"})
    assert back == {"config.password": "set · 00000000", "config.url": "http://x/"}
    assert resubmitted(schema, form, {})["config.password"] == ""
