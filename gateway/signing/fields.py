"""Structured fields (RFC 8941) as signatures use them: ``Signature-Input`` and ``Signature``.

The fields every request carries are read by fast, exact readers (one regular expression
each); any other text goes to http-sf, the reference parser.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import http_sf
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import SignatureInvalid, SignatureMissing

__all__ = [
    "STRING_RE",
    "Headers",
    "SignatureInput",
    "fast_bytes_member",
    "fast_signature_input",
    "parse_dictionary",
    "parse_signature_input",
    "single_value",
]

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def parse_dictionary(value: str) -> Any:
    """An RFC 8941 dictionary: ``{name: (value, params)}`` (typed loosely by http-sf)."""
    return http_sf.parse(value.encode("ascii"), tltype="dictionary")


# Fast structured fields ------------------------------------------------------------------
#
# The fields every request carries come in one canonical shape: one dictionary member,
# no optional spaces, strings without escapes, integers, base64 byte sequences. Those are
# read here with one regular expression each (http-sf's general parser cost ~40 µs per
# request); any other text, valid or not, goes to http-sf, which stays the reference.
# tests/test_signing_fastpath.py checks both give the same result on generated fields.

_KEY = r"[a-z*][a-z0-9_.*-]*"
_STRING = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
# An integer without leading zeros, or a string: written so, the text is also the
# canonical serialization, so a verifier can take @signature-params as it came.
_VALUE = rf"0|-?[1-9][0-9]{{0,14}}|{_STRING}"
_PARAM_RE = re.compile(rf";({_KEY})(?:=({_VALUE}))?")
_INPUT_RE = re.compile(
    rf"({_KEY})=\(((?:{_STRING})(?: {_STRING})*)?\)((?:;{_KEY}(?:=(?:{_VALUE}))?)*)"
)
_BYTES_RE = re.compile(rf"({_KEY})=:([A-Za-z0-9+/]*={{0,2}}):")
STRING_RE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_STRING_ITEM_RE = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"')


def fast_bytes_member(value: str) -> tuple[str, bytes, str] | None:
    """``label=:base64:`` in canonical form: (label, bytes, the member's text), else None."""
    m = _BYTES_RE.fullmatch(value)
    if m is None:
        return None
    try:
        decoded = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded).decode("ascii") != m.group(2):
        return None  # not canonical: http-sf decides what it means
    return m.group(1), decoded, f":{m.group(2)}:"


def fast_signature_input(value: str) -> tuple[str, list[str], dict[str, Any]] | None:
    """``label=("a" "b");k=v...``: (label, component names, parameters), else None.

    Accepted text is canonical: what follows ``label=`` is the member serialized."""
    m = _INPUT_RE.fullmatch(value)
    if m is None:
        return None
    names = _STRING_ITEM_RE.findall(m.group(2)) if m.group(2) else []
    params: dict[str, Any] = {}
    for key, raw in _PARAM_RE.findall(m.group(3)):
        if key in params:
            return None  # a repeated parameter: the last wins, and the text is not canonical
        if not raw:
            params[key] = True
        elif raw[0] == '"':
            params[key] = raw[1:-1]
        else:
            params[key] = int(raw)
    return m.group(1), names, params


@dataclass(frozen=True, slots=True, kw_only=True)
class SignatureInput:
    """One parsed ``Signature-Input`` member."""

    label: str
    components: tuple[str, ...]  # bare names of covered components without parameters
    params: Mapping[str, Any]
    items: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # every component, with parameters
    signature: bytes = b""
    serialized: str = ""  # the member's canonical text after ``label=``, when known

    @property
    def keyid(self) -> str:
        return str(self.params["keyid"])


def single_value(headers: Headers, name: str) -> str | None:
    values = headers.getall(name, [])
    if not values:
        return None
    return ", ".join(values)


def parse_signature_input(headers: Headers) -> SignatureInput:
    """The first signature of a message, with its covered components and parameters.

    Raises ``SignatureMissing`` when the message carries no signature, and
    ``SignatureInvalid`` when the fields are malformed or lack ``keyid``/``created``.
    """
    raw_input = single_value(headers, "Signature-Input")
    raw_sig = single_value(headers, "Signature")
    if raw_input is None and raw_sig is None:
        raise SignatureMissing("the request carries no Signature-Input and Signature")
    if raw_input is None or raw_sig is None:
        missing = "Signature-Input" if raw_input is None else "Signature"
        raise SignatureMissing(f"the {missing} field is missing")
    fast_input = fast_signature_input(raw_input)
    fast_sig = fast_bytes_member(raw_sig)
    if fast_input is not None and fast_sig is not None and fast_input[0] == fast_sig[0]:
        label, names, params = fast_input
        if not isinstance(params.get("keyid"), str):
            raise SignatureInvalid("the signature has no keyid parameter")
        if type(params.get("created")) is not int:
            raise SignatureInvalid("the signature has no integer created parameter")
        return SignatureInput(
            label=label,
            components=tuple(names),
            params=params,
            items=tuple((name, {}) for name in names),
            signature=fast_sig[1],
            serialized=raw_input[len(label) + 1 :],
        )
    try:
        inputs = parse_dictionary(raw_input)
        signatures = parse_dictionary(raw_sig)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise SignatureInvalid("Signature-Input or Signature is not a valid dictionary") from exc
    if not isinstance(inputs, dict) or not isinstance(signatures, dict) or not inputs:
        raise SignatureInvalid("Signature-Input holds no signature")
    label, (members, params) = next(iter(inputs.items()))
    if label not in signatures:
        raise SignatureInvalid(f"Signature has no member {label!r}")
    if not isinstance(members, list):
        raise SignatureInvalid(f"Signature-Input member {label!r} is not an inner list")
    components: list[str] = []
    for value, item_params in members:
        if not isinstance(value, str):
            raise SignatureInvalid("covered component names must be strings")
        if not item_params:
            components.append(value)
    if "keyid" not in params or not isinstance(params["keyid"], str):
        raise SignatureInvalid("the signature has no keyid parameter")
    if type(params.get("created")) is not int:
        raise SignatureInvalid("the signature has no integer created parameter")
    signature = signatures[label][0] if isinstance(signatures[label], tuple) else None
    if not isinstance(signature, bytes):
        raise SignatureInvalid(f"Signature member {label!r} is not a byte sequence")
    return SignatureInput(
        label=label,
        components=tuple(components),
        params=dict(params),
        items=tuple((str(v), dict(p)) for v, p in members),
        signature=signature,
    )
