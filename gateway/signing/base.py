"""Signature bases (RFC 9421 §2.5): the messages as the signer and verifier see them.

The protocol covers a small, fixed kind of component; for those the base is built here
directly, anything else goes to ``http-message-signatures`` (the reference), through
the views at the end of this module.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import http_sf
from http_message_signatures import HTTPSignatureComponentResolver

from gateway.errors import SignatureInvalid
from gateway.signing.fields import (
    STRING_RE,
    Headers,
    fast_bytes_member,
    parse_dictionary,
    single_value,
)

__all__ = [
    "OPTIONAL_REQUEST_HEADERS",
    "REQUEST_COMPONENTS",
    "RESPONSE_COMPONENTS",
    "RequestView",
    "ResponseView",
    "Unsupported",
    "as_library_message",
    "component_item",
    "fast_base",
    "request_components",
]

# Components every exchange request must cover; optional headers are added when present.
REQUEST_COMPONENTS = (
    "@method",
    "@target-uri",
    "content-digest",
    "content-type",
    "gw-client",
    "gw-message-id",
)
OPTIONAL_REQUEST_HEADERS = ("gw-target", "gw-user", "gw-issue", "gw-correlation-id", "gw-via")
RESPONSE_COMPONENTS = ("@status", "content-digest", "content-type", "gw-message-id")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What RFC 9421 needs of a request: method, absolute URL, header field lines."""

    method: str
    url: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class ResponseView:
    """A response and the request it answers (for components marked ``;req``)."""

    status_code: int
    headers: Headers
    request: RequestView


# Fast signature bases -----------------------------------------------------------------
#
# The protocol covers a small, fixed kind of component: a few derived components, plain
# header fields, and (in answers) the request's own signature by label. For those the
# base is built here directly; anything else goes to the library, which stays the
# reference (tests compare both on the same messages). Profiling showed the library's
# general machinery costing about three times the Ed25519 operations themselves.


class Unsupported(Exception):
    """A component the fast path does not build; the library will."""


@dataclass(frozen=True, slots=True)
class _NoHeaders:
    def items(self) -> Iterable[tuple[str, str]]:
        return ()


@functools.lru_cache(maxsize=4096)
def _url_components(url: str) -> Mapping[str, str]:
    """Derived components of a URL, normalised exactly as the library does."""
    resolver = HTTPSignatureComponentResolver(_LibRequest("GET", url, _NoHeaders()))
    return {
        "@target-uri": resolver.get_target_uri(),
        "@authority": resolver.get_authority(),
        "@path": resolver.get_path(),
        "@scheme": resolver.get_scheme(),
        "@query": resolver.get_query(),
    }


def _field(headers: Headers, name: str) -> str:
    lines = headers.getall(name, [])
    if not lines:
        raise SignatureInvalid(f"the covered header {name} is missing")
    value = ", ".join(line.strip(" \t") for line in lines)
    if not value.replace("\t", " ").isprintable():
        raise SignatureInvalid(f"the covered header {name} holds control characters")
    return value


def _signature_member(headers: Headers, label: str) -> str:
    raw = single_value(headers, "Signature")
    fast = fast_bytes_member(raw) if raw else None
    if fast is not None and fast[0] == label:
        return fast[2]
    parsed = parse_dictionary(raw) if raw else {}
    if label not in parsed:
        raise SignatureInvalid(f"the request has no signature {label!r} to bind to")
    member: str = http_sf.ser({"m": parsed[label]})
    return member[2:]


def fast_base(
    message: RequestView | ResponseView,
    items: Sequence[tuple[str, Mapping[str, Any]]],
    params: Mapping[str, Any],
    serialized: str = "",
) -> tuple[bytes, str]:
    """The signature base and the serialized ``@signature-params`` of ``items`` (given as
    ``serialized`` when the caller has it already)."""
    request = message.request if isinstance(message, ResponseView) else message
    lines: list[str] = []
    seen: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    for name, item_params in items:
        identity = (name, tuple(sorted(item_params.items())))
        if identity in seen or name != name.lower():
            raise Unsupported  # the library produces the precise error
        seen.add(identity)
        if item_params:
            if (
                name != "signature"
                or set(item_params) != {"req", "key"}
                or item_params["req"] is not True
                or not isinstance(message, ResponseView)
            ):
                raise Unsupported
            label = str(item_params["key"])
            lines.append(
                f'"signature";req;key="{label}": {_signature_member(request.headers, label)}'
            )
            continue
        if name == "@status":
            if not isinstance(message, ResponseView):
                raise SignatureInvalid("@status covered in a request")
            value = str(message.status_code)
        elif name == "@method":
            if isinstance(message, ResponseView):
                raise Unsupported
            value = message.method
        elif name.startswith("@"):
            if isinstance(message, ResponseView) or name not in _URL_COMPONENTS:
                raise Unsupported
            value = _url_components(message.url)[name]
        else:
            value = _field(message.headers, name)
        lines.append(f'"{name}": {value}')
    params_text = serialized or _serialize_params(items, params)
    lines.append(f'"@signature-params": {params_text}')
    base = "\n".join(lines)
    if not base.isascii():
        raise SignatureInvalid("the signature base holds non-ASCII characters")
    return base.encode("ascii"), params_text


_URL_COMPONENTS = frozenset({"@target-uri", "@authority", "@path", "@scheme", "@query"})


def _sf_value(value: Any) -> str:
    """RFC 8941 bare item for the simple types signature parameters use."""
    if value is True:
        return ""  # boolean true is written as the bare key
    if type(value) is int:
        return f"={value}"
    if isinstance(value, str) and STRING_RE.fullmatch(value):
        return f'="{value}"'
    raise Unsupported  # anything rarer goes through http-sf


def _serialize_params(
    items: Sequence[tuple[str, Mapping[str, Any]]], params: Mapping[str, Any]
) -> str:
    """``@signature-params``: the inner list of components with its parameters (RFC 8941)."""
    try:
        parts = []
        for name, item_params in items:
            if not STRING_RE.fullmatch(name):
                raise Unsupported
            parts.append(
                f'"{name}"' + "".join(f";{k}{_sf_value(v)}" for k, v in item_params.items())
            )
        tail = "".join(f";{k}{_sf_value(v)}" for k, v in params.items())
        return "(" + " ".join(parts) + ")" + tail
    except Unsupported:
        inner: Any = ([(n, dict(p)) for n, p in items], dict(params))
        serialized: str = http_sf.ser({"s": inner})[2:]
        return serialized


class _LabelView:
    """A read-only header view that keeps only one signature label (others are ignored)."""

    def __init__(self, headers: Headers, label: str) -> None:
        self._headers = headers
        self._label = label

    def items(self) -> Iterable[tuple[str, str]]:
        for name, value in self._headers.items():
            lowered = name.lower()
            if lowered in ("signature-input", "signature"):
                parsed = parse_dictionary(value)
                if not isinstance(parsed, dict) or self._label not in parsed:
                    continue
                value = http_sf.ser({self._label: parsed[self._label]})
            yield name, value

    def __iter__(self) -> Any:
        return iter(dict.fromkeys(name for name, _ in self.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._headers


@dataclass(frozen=True, slots=True)
class _LibRequest:
    method: str
    url: str
    headers: Any


@dataclass(frozen=True, slots=True)
class _LibResponse:
    status_code: int
    headers: Any
    request: _LibRequest


def as_library_message(message: RequestView | ResponseView, label: str | None) -> Any:
    """The library's view of a message; with a label, only that signature is visible."""

    def view(headers: Headers) -> Any:
        return _LabelView(headers, label) if label is not None else headers

    if isinstance(message, ResponseView):
        req = message.request
        return _LibResponse(
            message.status_code,
            view(message.headers),
            _LibRequest(req.method, req.url, req.headers),
        )
    return _LibRequest(message.method, message.url, view(message.headers))


def component_item(component: str) -> tuple[str, dict[str, Any]]:
    """``name`` or a serialized item such as ``"signature";req;key="sig1"``."""
    if not component.startswith('"'):
        return component, {}
    name, params = _parsed_item(component)
    return name, dict(params)


@functools.lru_cache(maxsize=256)
def _parsed_item(component: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    parsed = http_sf.parse(component.encode("ascii"), tltype="item")
    if not isinstance(parsed, tuple) or not isinstance(parsed[0], str):
        raise Unsupported
    return parsed[0], tuple(parsed[1].items())


def request_components(headers: Headers) -> tuple[str, ...]:
    """The components an outbound request covers: the required ones plus those present."""
    extra = tuple(name for name in OPTIONAL_REQUEST_HEADERS if name in headers)
    return REQUEST_COMPONENTS + extra
