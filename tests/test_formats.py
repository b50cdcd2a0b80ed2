"""Tests for the identifier format checkers in gateway.formats."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError

from gateway.formats import (
    DEFAULT_PATTERNS,
    is_gb2260,
    is_resident_id,
    is_uscc,
    make_format_checker,
    province_name,
    resident_id_check_char,
    uscc_check_char,
)

TABLE = Path(__file__).parent.parent / "gateway" / "data" / "gb2260_provinces.json"
PROVINCE_PREFIXES = sorted(code[:2] for code in json.loads(TABLE.read_text("utf-8")))
PROVINCE_PREFIXES.remove("10")
TODAY = date(2024, 6, 15)
VALID_USCC = "91350100M000100Y43"


def rid(first17: str) -> str:
    """Complete 17 digits into a resident ID with the right check character."""
    return first17 + resident_id_check_char(first17)


def validator(patterns: dict[str, str] | None = None) -> Draft202012Validator:
    """Build a Draft 2020-12 validator over a document using every custom format."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            name: {"format": name}
            for name in ("uscc", "cn-resident-id", "gb2260", "service-item-code", "case-number")
        },
    }
    return Draft202012Validator(schema, format_checker=make_format_checker(patterns))


# --- table -----------------------------------------------------------------------------


def test_table_has_34_provinces_and_national_code() -> None:
    """The shipped table holds the 34 province-level codes plus 100000."""
    table: dict[str, str] = json.loads(TABLE.read_text("utf-8"))
    assert len(table) == 35
    assert table["100000"]
    assert table["110000"] == "北京市"
    assert table["820000"] == "澳门特别行政区"
    assert all(re.fullmatch(r"[1-8][0-9]0000", code) for code in table)


# --- USCC ------------------------------------------------------------------------------


def test_uscc_known_check_char() -> None:
    """91350100M000100Y4 has check character 3."""
    assert uscc_check_char("91350100M000100Y4") == "3"


def test_uscc_valid() -> None:
    """A code with the correct check character is valid."""
    assert is_uscc(VALID_USCC)


def test_uscc_check_value_31_is_zero() -> None:
    """A weighted sum divisible by 31 gives check character 0, not an out-of-range index."""
    assert uscc_check_char("0" * 17) == "0"
    assert is_uscc("0" * 18)


@pytest.mark.parametrize("wrong", [c for c in "0123456789ABCDEFGHJKLMNPQRTUWXY" if c != "3"])
def test_uscc_wrong_check_char(wrong: str) -> None:
    """Any check character other than the computed one is rejected."""
    assert not is_uscc(VALID_USCC[:17] + wrong)


@pytest.mark.parametrize("letter", list("IOZSV"))
def test_uscc_forbidden_letters(letter: str) -> None:
    """I, O, Z, S and V are outside the alphabet, in the body and as check character."""
    assert not is_uscc(VALID_USCC[:8] + letter + VALID_USCC[9:])
    assert not is_uscc(VALID_USCC[:17] + letter)
    with pytest.raises(ValueError, match="unified social credit"):
        uscc_check_char(VALID_USCC[:8] + letter + VALID_USCC[9:17])


@pytest.mark.parametrize("code", ["", VALID_USCC[:17], VALID_USCC + "0", VALID_USCC[:-2]])
def test_uscc_wrong_length(code: str) -> None:
    """Only 18 characters make a USCC."""
    assert not is_uscc(code)


def test_uscc_lower_case() -> None:
    """Lower-case letters are not in the alphabet."""
    assert not is_uscc(VALID_USCC.lower())
    with pytest.raises(ValueError, match="unified social credit"):
        uscc_check_char(VALID_USCC[:17].lower())


def test_uscc_region_must_be_digits() -> None:
    """Positions 3-8 are a region code even when the check character fits."""
    assert not is_uscc("91A50100M000100Y4" + uscc_check_char("91A50100M000100Y4"))


def test_uscc_rejects_non_ascii() -> None:
    """Full-width and other non-ASCII look-alikes are rejected."""
    assert not is_uscc("９" + VALID_USCC[1:])


# --- resident ID -----------------------------------------------------------------------


@pytest.mark.parametrize("number", ["11010519491231002X", "440524188001010014"])
def test_resident_id_known_valid(number: str) -> None:
    """The published examples are valid."""
    assert is_resident_id(number, today=TODAY)


def test_resident_id_round_trip() -> None:
    """17 digits plus the computed check character make a valid ID."""
    assert resident_id_check_char("11010519491231002") == "X"
    assert is_resident_id(rid("33010620000229123"), today=TODAY)


def test_resident_id_wrong_check_char() -> None:
    """A wrong final character is rejected."""
    assert not is_resident_id("110105194912310021", today=TODAY)
    assert not is_resident_id("440524188001010015", today=TODAY)


def test_resident_id_lower_case_x_rejected() -> None:
    """The standard writes X; lower-case x is rejected."""
    assert not is_resident_id("11010519491231002x", today=TODAY)


@pytest.mark.parametrize("born", ["19990230", "20231301", "20230001", "20230100", "19000229"])
def test_resident_id_impossible_dates(born: str) -> None:
    """Birth dates must be real calendar dates."""
    assert not is_resident_id(rid("110105" + born + "001"), today=TODAY)


def test_resident_id_year_before_1800() -> None:
    """Birth years before 1800 are rejected."""
    assert not is_resident_id(rid("11010517991231001"), today=TODAY)
    assert is_resident_id(rid("11010518000101001"), today=TODAY)


def test_resident_id_future_birth_date() -> None:
    """A birth date after ``today`` is rejected; today itself is fine."""
    assert is_resident_id("440524188001010014", today=date(1880, 1, 1))
    assert not is_resident_id("440524188001010014", today=date(1879, 12, 31))
    assert not is_resident_id(rid("11010520240616001"), today=TODAY)


def test_resident_id_default_today() -> None:
    """Without ``today`` the current date bounds the birth date."""
    assert is_resident_id("11010519491231002X")
    assert not is_resident_id(rid("11010599991231001"))


@pytest.mark.parametrize("prefix", ["99", "10", "00", "16", "72"])
def test_resident_id_unknown_province(prefix: str) -> None:
    """The first two digits must be a province-level code."""
    assert not is_resident_id(rid(prefix + "010519491231002"), today=TODAY)


@pytest.mark.parametrize(
    "number", ["", "11010519491231002", "11010519491231002X0", "110105491231002"]
)
def test_resident_id_wrong_length(number: str) -> None:
    """Only 18 characters make an ID; 15-digit old numbers are rejected."""
    assert not is_resident_id(number, today=TODAY)


def test_resident_id_non_ascii_digits() -> None:
    """Full-width digits are not digits here."""
    assert not is_resident_id("１１010519491231002X", today=TODAY)
    with pytest.raises(ValueError, match="ASCII digits"):
        resident_id_check_char("１１010519491231002")


def test_resident_id_check_char_rejects_bad_input() -> None:
    """The check-character helper wants exactly 17 ASCII digits."""
    for bad in ("1101051949123100", "110105194912310021", "1101051949123100X"):
        with pytest.raises(ValueError, match="ASCII digits"):
            resident_id_check_char(bad)


@given(
    prefix=st.sampled_from(PROVINCE_PREFIXES),
    area=st.integers(0, 9999),
    born=st.dates(min_value=date(1800, 1, 1), max_value=TODAY),
    sequence=st.integers(0, 999),
)
def test_resident_id_property(prefix: str, area: int, born: date, sequence: int) -> None:
    """The computed check character is the only final character that validates."""
    first17 = f"{prefix}{area:04d}{born:%Y%m%d}{sequence:03d}"
    check = resident_id_check_char(first17)
    assert is_resident_id(first17 + check, today=TODAY)
    for other in "0123456789Xx":
        if other != check:
            assert not is_resident_id(first17 + other, today=TODAY)


# --- GB/T 2260 -------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["100000", "110000", "110105", "330106", "419001", "820000"])
def test_gb2260_valid(code: str) -> None:
    """Province, prefecture, county and national codes are valid."""
    assert is_gb2260(code)


@pytest.mark.parametrize(
    "code",
    ["990000", "101000", "100001", "110001", "119100", "11000", "1100000", "11000a", "１10000"],
)
def test_gb2260_invalid(code: str) -> None:
    """Unknown provinces, bad prefecture parts, wrong lengths and non-digits are rejected."""
    assert not is_gb2260(code)


def test_province_name() -> None:
    """Any valid code resolves to its province; invalid codes give None."""
    assert province_name("110105") == "北京市"
    assert province_name("440524") == "广东省"
    assert province_name("820000") == "澳门特别行政区"
    assert province_name("100000") == "中华人民共和国"
    assert province_name("990000") is None
    assert province_name("110001") is None


# --- patterns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("service-item-code", "330117001000", True),
        ("service-item-code", "11330000002482448J3330117001000", True),
        ("service-item-code", "11330000002482448J3330117001000-01", True),
        ("service-item-code", "330117001000\n", False),
        ("service-item-code", "3301", False),
        ("service-item-code", "11330000002482448j3330117001000", False),
        ("case-number", "330100-2024-000123", True),
        ("case-number", "abc12345", True),
        ("case-number", "-2024000123", False),
        ("case-number", "2024 0001", False),
        ("case-number", "1234567", False),
    ],
)
def test_default_patterns(name: str, value: str, ok: bool) -> None:
    """The default patterns accept typical codes and reject malformed ones."""
    assert set(DEFAULT_PATTERNS) == {"service-item-code", "case-number"}
    assert make_format_checker().conforms(value, name) is ok


# --- make_format_checker ---------------------------------------------------------------


def test_schema_rejects_bad_uscc_and_accepts_good() -> None:
    """A document with a bad USCC fails validation; a good one passes."""
    v = validator()
    v.validate({"uscc": VALID_USCC, "cn-resident-id": "11010519491231002X", "gb2260": "330106"})
    with pytest.raises(ValidationError) as info:
        v.validate({"uscc": "91350100M000100Y44"})
    assert info.value.validator == "format"
    assert list(info.value.absolute_path) == ["uscc"]


def test_schema_reports_each_bad_field() -> None:
    """Every custom format reports its own error."""
    doc = {
        "uscc": "91350100M000100Y4O",
        "cn-resident-id": "11010519490230002X",
        "gb2260": "990000",
        "service-item-code": "bad code",
        "case-number": "x",
    }
    errors = validator().iter_errors(doc)
    assert sorted(e.absolute_path[0] for e in errors) == sorted(doc)


def test_non_strings_pass_formats() -> None:
    """Formats only apply to strings, as JSON Schema says."""
    checker = make_format_checker()
    for name in ("uscc", "cn-resident-id", "gb2260", "service-item-code", "case-number"):
        assert checker.conforms(12345, name)
        assert checker.conforms(None, name)


def test_pattern_override() -> None:
    """A custom pattern replaces the default for its format only."""
    custom = validator({"case-number": r"^BJ-[0-9]{6}$"})
    custom.validate({"case-number": "BJ-000123", "service-item-code": "330117001000"})
    with pytest.raises(ValidationError):
        custom.validate({"case-number": "330100-2024-000123"})
    validator().validate({"case-number": "330100-2024-000123"})


def test_pattern_override_errors() -> None:
    """Unknown pattern names and uncompilable patterns are configuration errors."""
    with pytest.raises(ValueError, match="unknown pattern formats: case-no"):
        make_format_checker({"case-no": ".*"})
    with pytest.raises(ValueError, match="bad pattern"):
        make_format_checker({"case-number": "("})


def test_default_formats_kept_and_global_untouched() -> None:
    """jsonschema's formats stay available and its shared checker gains nothing."""
    checker = make_format_checker()
    assert not checker.conforms("not an email", "email")
    assert checker.conforms("12345678-1234-5678-1234-567812345678", "uuid")
    assert not checker.conforms("not-a-uuid", "uuid")
    assert "uscc" not in Draft202012Validator.FORMAT_CHECKER.checkers
