"""HTML form fields from JSON Schemas, and form values back into JSON.

An adapter type's ``config_schema`` becomes one field per top-level property: the label is
the property name, the help its ``description``, the value its ``default``; an ``enum``
becomes a select, a boolean a checkbox, a number a number input, and anything structured
(objects, arrays, ``oneOf``) a JSON text area. So a plugin's adapter type gets its form
for free. The browser is never asked to validate: the admin API's own validation decides,
and its errors come back onto their fields (``errors_by_field``).

A property the schema marks ``writeOnly`` (or one holding such values, as the ``http``
adapter's ``headers``) is shown as its placeholder, ``set · <fingerprint>``
(gateway/config/secrets.py); left as shown it keeps the stored secret, and a refused form comes
back with placeholders where secrets were typed (``resubmitted``), never the secrets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config.secrets import schema_secret_pointers
from gateway.errors import FieldError

__all__ = [
    "CONFIG_PREFIX",
    "Field",
    "FormErrors",
    "config_fields",
    "config_from_form",
    "errors_by_field",
    "field_of",
    "holds_secrets",
    "resubmitted",
]

WRITE_ONLY_HELP = (
    "Write-only: a secret shows as \u201cset \u00b7 fingerprint\u201d; leave it to keep the "
    "stored value, or type a new one."
)

CONFIG_PREFIX = "config."
Control = Literal["text", "number", "integer", "checkbox", "boolean", "select", "json"]
FormErrors = dict[str, list[str]]  # input name → messages ("" for the form as a whole)


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    label: str  # the property name, as the schema spells it
    name: str  # the input's name: config.<property>
    control: Control
    help: str | None = None
    required: bool = False
    value: str = ""
    checked: bool = False
    options: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    write_only: bool = False  # holds secrets: shown as placeholders

    @property
    def id(self) -> str:
        return "f-" + self.name.replace(".", "-")


def _control(prop: Mapping[str, Any]) -> Control:
    if "enum" in prop:
        return "select"
    kind = prop.get("type")
    if kind == "boolean":
        # With a default a checkbox says it all; without one, "not set" is a third answer.
        return "checkbox" if "default" in prop else "boolean"
    if kind == "integer":
        return "integer"
    if kind == "number":
        return "number"
    if kind == "string":
        return "text"
    return "json"


def _shown(control: Control, value: Any) -> str:
    if value is None:
        return ""
    if control == "json" or (control == "select" and not isinstance(value, str)):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return str(value)


def config_fields(
    schema: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
    errors: Mapping[str, list[str]] | None = None,
    *,
    submitted: Mapping[str, str] | None = None,
    prefix: str = CONFIG_PREFIX,
    skip: frozenset[str] = frozenset(),
) -> list[Field]:
    """One field per property of ``schema`` (but ``skip``), showing ``submitted`` (a form
    sent back, shown as typed), else ``values`` (the current config), else each
    property's default."""
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    fields = []
    for key, prop in props.items():
        if not isinstance(prop, Mapping) or key in skip:
            continue
        control = _control(prop)
        value = values[key] if values is not None and key in values else prop.get("default")
        if values is not None and key not in values and control != "checkbox":
            value = None  # submitted blank: stays blank rather than refilled
        options: tuple[str, ...] = ()
        if control == "select":
            options = tuple(_shown("select", v) for v in prop["enum"])
            if key not in required and "default" not in prop:
                options = ("", *options)
        elif control == "boolean":
            options = ("", "true", "false")
            value = "" if value is None else "true" if value else "false"
        name = prefix + key
        shown = "" if control == "checkbox" else _shown(control, value)
        checked = control == "checkbox" and value is True
        if submitted is not None:
            shown = "" if control == "checkbox" else submitted.get(name, "")
            checked = control == "checkbox" and submitted.get(name) == "true"
        secret = holds_secrets(prop)
        help_text = prop.get("description") or prop.get("title")
        if secret:
            help_text = f"{help_text} {WRITE_ONLY_HELP}" if help_text else WRITE_ONLY_HELP
        fields.append(
            Field(
                label=key,
                name=name,
                control=control,
                help=help_text,
                write_only=secret,
                required=key in required,
                value=shown,
                checked=checked,
                options=options,
                errors=tuple((errors or {}).get(name, ())),
            )
        )
    return fields


def holds_secrets(prop: Mapping[str, Any]) -> bool:
    """Whether a property is write-only or holds write-only values."""
    return bool(schema_secret_pointers(prop))


def resubmitted(
    schema: Mapping[str, Any],
    form: Mapping[str, str],
    shown_config: Mapping[str, Any],
    *,
    prefix: str = CONFIG_PREFIX,
) -> dict[str, str]:
    """A refused form as it goes back onto the page: each field that holds secrets shows
    ``shown_config``'s value (secrets as placeholders), never what was typed into it."""
    out = dict(form)
    for key, prop in schema.get("properties", {}).items():
        if isinstance(prop, Mapping) and holds_secrets(prop):
            value = shown_config.get(key)
            out[prefix + key] = "" if value is None else _shown(_control(prop), value)
    return out


def config_from_form(
    schema: Mapping[str, Any],
    form: Mapping[str, str],
    *,
    prefix: str = CONFIG_PREFIX,
    skip: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], FormErrors]:
    """The config a submitted form describes, and what could not even be read (a number
    that is not one, JSON that does not parse). Blank fields are left out, so that the
    adapter's defaults apply."""
    config: dict[str, Any] = {}
    errors: FormErrors = {}
    for key, prop in schema.get("properties", {}).items():
        if not isinstance(prop, Mapping) or key in skip:
            continue
        name = prefix + key
        control = _control(prop)
        if control == "checkbox":
            config[key] = form.get(name) == "true"
            continue
        raw = form.get(name, "").strip()
        if raw == "":
            continue
        if control == "boolean":
            config[key] = raw == "true"
            continue
        try:
            config[key] = _parse(control, prop, raw)
        except ValueError as exc:
            errors[name] = [str(exc)]
    return config, errors


def _parse(control: Control, prop: Mapping[str, Any], raw: str) -> Any:
    if control == "text":
        return raw
    if control == "select":
        for option in prop["enum"]:
            if _shown("select", option) == raw:
                return option
        return raw  # not one of them: the schema check says so, on this field
    if control == "integer":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if control == "number":
        try:
            number = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return int(number) if number.is_integer() and "." not in raw else number
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc.msg} at line {exc.lineno})") from None


def field_of(pointer: str, fields: Iterable[str]) -> str:
    """The input a JSON Pointer into the request body belongs to: the longest input name
    whose path is a prefix of the pointer ("" when none is)."""
    path = pointer.strip("/").replace("/", ".")
    best = ""
    for name in fields:
        if (path == name or path.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def errors_by_field(
    errors: Iterable[FieldError], fields: Iterable[str], default: str = ""
) -> FormErrors:
    """The admin API's field errors grouped by the input each points into (``default`` for
    the rest). A message about a part of a field says which part (``/keys/0: …``)."""
    names = list(fields)
    out: FormErrors = {}
    for error in errors:
        name = field_of(error.pointer, names)
        rest = error.pointer[len(name) + 1 :] if name else error.pointer
        message = f"{rest}: {error.message}" if rest.strip("/") else error.message
        out.setdefault(name or default, []).append(message)
    return out
