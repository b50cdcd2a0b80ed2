"""Personal data out of sight: one masking function, and stored exchanges as operators see them.

``mask_personal`` is the one function that finds personal data in text: every view calls
it, directly or through the builders here (the admin API, the console, ``gateway log
show``, dead letters, problem details, JSON and text log lines, trace spans). It masks

- resident identity numbers (GB 11643) of 18 characters (region code and last four kept,
  ``110105********002X``, whatever the check character) and the old 15 digits (region
  code and last three kept, ``330106******123``): a region code whose first digit is not
  0, then a birth date (``YYYYMMDD`` from 1800, or ``YYMMDD``) that has a month 01-12 and
  a day 01-31, so snowflake ids and order numbers are not taken for people;
- mainland mobile numbers, 11 digits from ``13`` to ``19``, written whole or as 3-4-4
  groups split by a space, ``-`` or ``.``, with or without ``+86``, ``0086`` or ``86``
  (prefix, first three and last four digits kept: ``+86 136 **** 5555``);

wherever they stand: alone, inside free text (a letter or a CJK character may touch
them, and so may a ``\\uXXXX``/``\\xXX`` escape of JSON or ``repr`` text), and, in
documents, as JSON numbers. They are not masked when they are part of a longer number, an
amount (a ``.`` and a digit on either side) or an identifier that is not personal data:
a UUID or a token of 16 or more hex digits with a letter (trace and span ids, digests),
skipped whole. Unified social credit codes (GB 32100) are public business identifiers and
stay visible (one that is all digits and reads as an ID, a region code and a date, is
masked: privacy wins the tie).

The operator's view of a stored message is built here once (``message_view``, and
``dead_letter_view`` for a dead letter) and shown as it is by the admin API, the console,
``gateway log show`` and ``gateway dead-letters list``. Three rules apply to it:
``Gw-User`` (and any credential header) is replaced by ``***``; ``mask_personal`` runs
over bodies (strings, keys and numbers), headers and the ``error`` an upstream may have
written; and each field a service lists under ``sensitive`` (JSON Pointers, RFC 6901,
where a ``*`` segment stands for every member or item) is replaced by ``***``. Messages
in transit and in the store are never changed, and evidence (``gateway audit export``,
``gateway audit verify``) keeps the real bytes; only views are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "MASK",
    "MIN_PERSONAL",
    "mask_document",
    "mask_headers",
    "mask_personal",
    "mask_pointers",
    "mask_value",
    "masked_body",
    "masked_error",
]

MASK = "***"
_SECRET_HEADERS = frozenset({"gw-user", "authorization", "cookie", "proxy-authorization"})

_DATE = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"  # MMDD, loosely
_PERSONAL = re.compile(
    rf"""
    (?=[0-9+])  # first, so that the scan skips other characters fast
    # Not inside a longer number or after a decimal point; but right after an escape.
    (?:(?<=\\u[0-9A-Fa-f]{{4}})|(?<=\\x[0-9A-Fa-f]{{2}})|(?<![0-9])(?<![0-9]\.))
    (?:
        (?P<id18>[1-9][0-9]{{5}}(?:18|19|20)[0-9]{{2}}{_DATE}[0-9]{{3}}[0-9Xx])
      | (?P<id15>[1-9][0-9]{{5}}[0-9]{{2}}{_DATE}[0-9]{{3}})
      | (?:(?:\+|00)?86)?1[3-9][0-9](?:[\ .-][0-9]{{4}}(?P<sep>[\ .-])|[0-9]{{4}})[0-9]{{4}}
    )
    (?![0-9])(?!\.[0-9])
    """,
    re.VERBOSE,
)
# Identifiers that are not personal data, though digits in them may look like it: a
# UUID, or a token of 16 or more hex digits with a letter (trace ids, digests).
_IDENTIFIER = re.compile(
    r"(?<![0-9A-Za-z])"
    r"(?:[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    r"|(?=[0-9]*[A-Fa-f])[0-9A-Fa-f]{16,})"
    r"(?![0-9A-Za-z])"
)
_HEX_OR_DASH = frozenset("0123456789abcdefABCDEF-")
# The shortest text that can hold personal data (a mobile number).
MIN_PERSONAL = 11


def _in_identifier(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` lies inside a UUID or a hex identifier."""
    lo, hi = start, end
    while lo and text[lo - 1] in _HEX_OR_DASH:
        lo -= 1
    while hi < len(text) and text[hi] in _HEX_OR_DASH:
        hi += 1
    if hi - lo < 16:
        return False
    base = max(lo - 1, 0)  # one character beyond each end, for the boundaries
    return any(
        base + m.start() <= start and end <= base + m.end()
        for m in _IDENTIFIER.finditer(text[base : hi + 1])
    )


def _masked(m: re.Match[str]) -> str:
    text, (start, end) = m.string, m.span()
    found = m.group(0)
    # Inside an identifier only if a hex digit or a dash touches it (seldom: checked then).
    touches = (start and text[start - 1] in _HEX_OR_DASH) or (
        end < len(text) and text[end] in _HEX_OR_DASH
    )
    if touches and _in_identifier(text, start, end):
        return found
    if m.group("id18") is not None:
        return f"{found[:6]}********{found[14:]}"
    if m.group("id15") is not None:
        return f"{found[:6]}******{found[12:]}"
    tail = 4 + len(m.group("sep") or "")  # a mobile number: its middle four digits go
    return f"{found[: -4 - tail]}****{found[-tail:]}"


# Full-width digits, plus and hyphen (U+FF10-FF19, U+FF0B, U+FF0D), as Chinese input
# methods type them: one code point each, so offsets are kept when read as ASCII.
_FULL_WIDTH = str.maketrans({**{0xFF10 + d: str(d) for d in range(10)}, 0xFF0B: "+", 0xFF0D: "-"})


def mask_personal(text: str) -> str:
    """``text`` with every resident ID and mobile number in it masked (see the module);
    full-width digits count as digits (a masked match is then shown in ASCII digits)."""
    if len(text) < MIN_PERSONAL:
        return text
    masked = _PERSONAL.sub(_masked, text)
    if text.isascii():
        return masked
    narrow = text.translate(_FULL_WIDTH)
    if narrow == text:
        return masked
    renarrowed = _PERSONAL.sub(_masked, narrow)
    return masked if renarrowed == narrow else renarrowed


def _mask_int(value: int) -> int | str:
    # An ID or a mobile number sent as a JSON number is shown as its masked string.
    if -(10**10) < value < 10**10:
        return value
    text = str(value)
    masked = mask_personal(text)
    return value if masked == text else masked


def mask_value(node: Any) -> Any:
    """A parsed JSON value (or a log record's extra) with ``mask_personal`` applied to
    every string, every key and every integer; other values as they are."""
    if isinstance(node, str):
        return mask_personal(node)
    if isinstance(node, dict):
        return {mask_personal(str(k)): mask_value(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [mask_value(v) for v in node]
    if type(node) is int:  # not bool
        return _mask_int(node)
    if type(node) is float and node.is_integer() and abs(node) >= 1e10:
        return _mask_int(int(node))  # 13812345678.0, 1.3812345678E10: the same number
    return node


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _mask_at(node: Any, tokens: Sequence[str]) -> Any:
    """``node`` with the values at ``tokens`` masked (a new container where it changes)."""
    if not tokens:
        return MASK
    head, rest = tokens[0], tokens[1:]
    if isinstance(node, dict):
        names = list(node) if head == "*" else [head] if head in node else []
        if not names:
            return node
        changed = dict(node)
        for name in names:
            changed[name] = _mask_at(node[name], rest)
        return changed
    if isinstance(node, list):
        if head == "*":
            return [_mask_at(item, rest) for item in node]
        if head.isdigit() and int(head) < len(node) and (head == "0" or head[0] != "0"):
            changed_list = list(node)
            changed_list[int(head)] = _mask_at(node[int(head)], rest)
            return changed_list
    return node


def mask_pointers(document: Any, pointers: Iterable[str]) -> Any:
    """A copy of ``document`` with the value at each pointer replaced by ``***``; a
    pointer that does not resolve changes nothing."""
    for pointer in pointers:
        document = _mask_at(document, _tokens(pointer))
    return document


def mask_document(document: Any, pointers: Iterable[str] = ()) -> Any:
    """A parsed document for display: sensitive fields, resident IDs and mobile numbers
    (as strings, keys or numbers) masked."""
    return mask_value(mask_pointers(document, pointers))


def masked_body(data: bytes | None, pointers: Sequence[str] = ()) -> Any:
    """A stored body for display: the masked document when it is JSON, else masked text."""
    if data is None:
        return None
    text = data.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return mask_personal(text)
    return mask_document(document, pointers)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers for display: ``Gw-User`` and credentials hidden, personal data masked."""
    return {
        k: MASK if k.lower() in _SECRET_HEADERS else mask_personal(v) for k, v in headers.items()
    }


def masked_error(error: str | None) -> str | None:
    """An ``error`` for display: free text, often an upstream's own words about the
    applicant, with personal data masked."""
    return mask_personal(error) if error else error
