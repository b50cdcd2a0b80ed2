"""JSON Schema ``format`` checkers for Chinese government identifiers.

Service schemas name these formats; ``make_format_checker()`` registers them next to
jsonschema's own Draft 2020-12 checkers. As JSON Schema requires, a format only
constrains strings: the hooks accept any non-string instance.

``uscc``
    Unified social credit code, GB 32100-2015. 18 characters from the 31-character
    alphabet ``0-9`` plus ``A-Y`` without I, O, Z, S, V; a character's value is its
    index in that alphabet. Positions 3-8 are the registering region's GB/T 2260 code
    (only checked to be digits). The 18th character encodes
    ``31 - (Σ value_i × 3^(i-1) mod 31)`` for i = 1..17, with 31 written as ``0``.
    The registration-authority and organisation-code parts are not checked further.

``cn-resident-id``
    Citizen identity number, GB 11643-1999 (18 characters; 15-digit first-generation
    numbers are rejected). A 6-digit address code whose first two digits are a
    province-level GB/T 2260 code, an 8-digit birth date ``YYYYMMDD`` (a real calendar
    date, year 1800 or later, not after today), a 3-digit sequence number and an
    ISO 7064 MOD 11-2 check character. The standard writes the check value 10 as an
    upper-case ``X``; a lower-case ``x`` is rejected so that one person has one
    spelling and exact-match lookups downstream stay reliable.

``gb2260``
    Six-digit GB/T 2260 administrative division code: a province-level prefix from
    ``data/gb2260_provinces.json``, a prefecture part ``00``-``90`` (``00`` is the
    province itself, and then the county part must be ``00`` too) and a county part
    ``00``-``99``. ``100000`` stands for the national level, as used in this project.
    This is a structural check; the table does not list every prefecture and county.

``service-item-code`` and ``case-number``
    Government service item codes (事项编码) and case numbers (办件编号) have no single
    national syntax, so they are regular expressions, overridable per deployment and
    matched against the whole string (see ``DEFAULT_PATTERNS``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from importlib.resources import files
from types import MappingProxyType
from typing import Final

from jsonschema import Draft202012Validator, FormatChecker

__all__ = [
    "DEFAULT_PATTERNS",
    "is_gb2260",
    "is_resident_id",
    "is_uscc",
    "make_format_checker",
    "province_name",
    "resident_id_check_char",
    "uscc_check_char",
]

DEFAULT_PATTERNS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # A basic code such as 330117001000, an implementation code that prefixes the
        # implementing body's USCC (11330000002482448J3330117001000), optionally followed
        # by a few hyphenated sub-item segments.
        "service-item-code": r"^[0-9A-Z]{6,48}(?:-[0-9A-Z]{1,20}){0,4}$",
        # Letters, digits and inner hyphens; local systems differ too much for more.
        "case-number": r"^[0-9A-Za-z][0-9A-Za-z-]{6,62}[0-9A-Za-z]$",
    }
)

_NATIONAL_CODE: Final = "100000"

_PROVINCES: Final[Mapping[str, str]] = MappingProxyType(
    {
        str(code): str(name)
        for code, name in json.loads(
            files("gateway").joinpath("data/gb2260_provinces.json").read_text(encoding="utf-8")
        ).items()
    }
)
# "10" is not a province: it only appears as the whole national code 100000.
_PROVINCE_PREFIXES: Final = frozenset(code[:2] for code in _PROVINCES if code != _NATIONAL_CODE)

_USCC_ALPHABET: Final = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VALUES: Final[Mapping[str, int]] = {c: i for i, c in enumerate(_USCC_ALPHABET)}
_USCC_WEIGHTS: Final = tuple(pow(3, i, 31) for i in range(17))

_RID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_RID_CHECK_CHARS: Final = "10X98765432"
_RID_MIN_YEAR: Final = 1800
# Numbers are issued on Beijing time; a server running on UTC must not reject a child
# born "today" in China during the eight hours when UTC is still on the previous day.
_CHINA_TZ: Final = timezone(timedelta(hours=8), "CST")


def _is_digits(s: str) -> bool:
    # str.isdigit alone accepts non-ASCII digits such as "١" or "²".
    return s.isascii() and s.isdigit()


def _uscc_check_value(first17: str) -> int:
    total = sum(_USCC_VALUES[c] * w for c, w in zip(first17, _USCC_WEIGHTS, strict=True))
    return (31 - total % 31) % 31


def uscc_check_char(first17: str) -> str:
    """Return the check character for the first 17 characters of a USCC."""
    if len(first17) != 17 or not all(c in _USCC_VALUES for c in first17):
        raise ValueError(f"not 17 unified social credit code characters: {first17!r}")
    return _USCC_ALPHABET[_uscc_check_value(first17)]


def is_uscc(s: str) -> bool:
    """Tell whether ``s`` is a unified social credit code with a correct check character."""
    return (
        len(s) == 18
        and all(c in _USCC_VALUES for c in s)
        and _is_digits(s[2:8])
        and s[17] == _USCC_ALPHABET[_uscc_check_value(s[:17])]
    )


def _rid_check_char(first17: str) -> str:
    total = sum(int(c) * w for c, w in zip(first17, _RID_WEIGHTS, strict=True))
    return _RID_CHECK_CHARS[total % 11]


def resident_id_check_char(first17: str) -> str:
    """Return the ISO 7064 MOD 11-2 check character for 17 digits of a resident ID."""
    if len(first17) != 17 or not _is_digits(first17):
        raise ValueError(f"not 17 ASCII digits: {first17!r}")
    return _rid_check_char(first17)


def is_resident_id(s: str, *, today: date | None = None) -> bool:
    """Tell whether ``s`` is a valid 18-character resident identity number.

    ``today`` bounds the birth date; it defaults to the current date in China.
    """
    if len(s) != 18 or not _is_digits(s[:17]) or s[:2] not in _PROVINCE_PREFIXES:
        return False
    try:
        born = date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if today is None:
        today = datetime.now(_CHINA_TZ).date()
    return born.year >= _RID_MIN_YEAR and born <= today and s[17] == _rid_check_char(s[:17])


def is_gb2260(s: str) -> bool:
    """Tell whether ``s`` is a structurally valid six-digit GB/T 2260 division code."""
    if s == _NATIONAL_CODE:
        return True
    if len(s) != 6 or not _is_digits(s) or s[:2] not in _PROVINCE_PREFIXES:
        return False
    prefecture, county = s[2:4], s[4:6]
    return int(prefecture) <= 90 and (prefecture != "00" or county == "00")


def province_name(code: str) -> str | None:
    """Return the province-level name for a valid GB/T 2260 code, else ``None``."""
    if not is_gb2260(code):
        return None
    return _PROVINCES[code if code == _NATIONAL_CODE else code[:2] + "0000"]


def _strings_only(predicate: Callable[[str], bool]) -> Callable[[object], bool]:
    def check(instance: object) -> bool:
        return not isinstance(instance, str) or predicate(instance)

    return check


def _resident_id(s: str) -> bool:
    return is_resident_id(s)


def _pattern_check(name: str, pattern: str) -> Callable[[object], bool]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"format {name!r}: bad pattern {pattern!r}: {exc}") from exc
    return _strings_only(lambda s: compiled.fullmatch(s) is not None)


_IDENTIFIER_CHECKS: Final[Mapping[str, Callable[[object], bool]]] = MappingProxyType(
    {
        "uscc": _strings_only(is_uscc),
        "cn-resident-id": _strings_only(_resident_id),
        "gb2260": _strings_only(is_gb2260),
    }
)


def make_format_checker(patterns: Mapping[str, str] | None = None) -> FormatChecker:
    """Build a checker with jsonschema's Draft 2020-12 formats plus the ones above.

    ``patterns`` overrides entries of ``DEFAULT_PATTERNS``; an unknown name or a
    pattern that does not compile raises ``ValueError``.
    """
    merged = dict(DEFAULT_PATTERNS)
    if patterns is not None:
        unknown = sorted(set(patterns) - set(DEFAULT_PATTERNS))
        if unknown:
            raise ValueError(f"unknown pattern formats: {', '.join(unknown)}")
        merged.update(patterns)

    base: FormatChecker = Draft202012Validator.FORMAT_CHECKER
    checker = FormatChecker(formats=())
    checker.checkers.update(base.checkers)
    for name, check in _IDENTIFIER_CHECKS.items():
        checker.checks(name)(check)
    for name, pattern in merged.items():
        checker.checks(name)(_pattern_check(name, pattern))
    return checker
