"""Logging: one JSON object per line, resident IDs and mobile numbers masked wherever they
appear."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.masking import mask_personal
from gateway.observe.logs import JsonFormatter, TextFormatter, configure_logging

RESIDENT_ID = "11010519491231002X"
MASKED = "110105********002X"


def _logger(formatter: logging.Formatter, name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_parse_with_standard_fields_and_extras() -> None:
    """Each record is one JSON object with ts, level, logger, msg and the extra fields."""
    logger, stream = _logger(JsonFormatter(), "test.logs.json")
    logger.info("exchange %s answered", "m-1", extra={"status": 200, "client": "330000:x"})
    logger.warning("second line")
    first, second = _lines(stream)
    assert first["msg"] == "exchange m-1 answered"
    assert first["level"] == "info"
    assert first["logger"] == "test.logs.json"
    assert (first["status"], first["client"]) == (200, "330000:x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["level"] == "warning"
    assert "status" not in second


def test_json_keeps_chinese_text_and_stringifies_odd_values() -> None:
    """Non-ASCII text stays readable and values JSON cannot hold are written as strings."""
    logger, stream = _logger(JsonFormatter(), "test.logs.odd")
    logger.info("办件受理", extra={"path": Path("/var/gw.db"), "ids": {1, 2}})
    (line,) = _lines(stream)
    assert line["msg"] == "办件受理"
    assert "办件受理" in stream.getvalue()
    assert line["path"] == "/var/gw.db"
    assert isinstance(line["ids"], str)


def test_resident_ids_are_masked_in_message_extras_and_exception() -> None:
    """A resident ID in the message, an extra field or a traceback is masked in the output."""
    logger, stream = _logger(JsonFormatter(), "test.logs.mask")
    try:
        raise ValueError(f"bad applicant {RESIDENT_ID}")
    except ValueError:
        logger.exception("applicant %s refused", RESIDENT_ID, extra={"doc": {"id": RESIDENT_ID}})
    text = stream.getvalue()
    assert RESIDENT_ID not in text
    assert "19491231" not in text
    (line,) = _lines(stream)
    assert line["msg"] == f"applicant {MASKED} refused"
    assert line["doc"] == {"id": MASKED}
    assert f"bad applicant {MASKED}" in line["exc"]


def test_resident_ids_held_as_numbers_or_in_plain_fields_are_masked() -> None:
    """Every value is masked on its own: a string field, an 18-digit number, a long one."""
    logger, stream = _logger(JsonFormatter(), "test.logs.values")
    number = 330106200001010015
    logger.info("x", extra={"user": RESIDENT_ID, "as_number": number, "small": 200})
    (line,) = _lines(stream)
    assert line["user"] == MASKED
    assert line["as_number"] == "330106********0015"
    assert line["small"] == 200
    assert str(number) not in stream.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (RESIDENT_ID, MASKED),
        ("11010519491231002x", "110105********002x"),
        ("330106200001010015", "330106********0015"),
        (f"id={RESIDENT_ID};", f"id={MASKED};"),
        (f"{RESIDENT_ID} and 440305198806150021", f"{MASKED} and 440305********0021"),
    ],
)
def test_mask_personal_hides_the_birth_date(text: str, expected: str) -> None:
    """Region code and the last four characters remain; the eight birth-date digits go."""
    assert mask_personal(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("13800138000", "138****8000"),
        ("手机13800138000。", "手机138****8000。"),
        ("+8613800138000", "+86138****8000"),
        ("tel:19912345678;", "tel:199****5678;"),
    ],
)
def test_mask_personal_hides_the_middle_of_a_mobile_number(text: str, expected: str) -> None:
    """The first three and last four digits (and a +86) remain; the middle four go."""
    assert mask_personal(text) == expected


def test_short_values_holding_a_phone_are_masked_in_json_lines() -> None:
    """A field as short as a mobile number, or a number as large, is masked too."""
    logger, stream = _logger(JsonFormatter(), "test.logs.phone")
    logger.info("x", extra={"phone": "13800138000", "as_number": 13800138000})
    (line,) = _lines(stream)
    assert (line["phone"], line["as_number"]) == ("138****8000", "138****8000")


@pytest.mark.parametrize(
    "text",
    [
        "12800138000",  # no mobile prefix 12
        "138001380001",  # 12 digits
        "f47ac10b-58cc-4372-a567-a13812345678",  # a UUID's hex group
        "11010519491231002",  # 17 digits
        "1101051949123100234",  # 19 digits: part of a longer number
        "91350100M000100Y43",  # a USCC
        "order 2026 item 42",
    ],
)
def test_mask_personal_leaves_other_numbers(text: str) -> None:
    """Numbers that are neither resident IDs nor mobile numbers are left alone."""
    assert mask_personal(text) == text


def test_text_formatter_masks_and_appends_extras() -> None:
    """The development format masks IDs too and shows extras as key=value."""
    logger, stream = _logger(TextFormatter("%(levelname)s %(message)s"), "test.logs.text")
    logger.info("user %s", RESIDENT_ID, extra={"service": "credit.query", "skip": None})
    assert stream.getvalue().strip() == f"INFO user {MASKED} service=credit.query"


def test_configure_logging_installs_one_formatted_root_handler() -> None:
    """configure_logging leaves one root handler with the chosen format and level."""
    configure_logging(level="debug", fmt="json")
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.level == logging.DEBUG
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    configure_logging(level="WARNING", fmt="text")
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)
    assert logging.getLogger().level == logging.WARNING
