"""Logging: one JSON object per line in production, readable text for development."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "mask_personal"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}
# Resident identity numbers (GB 11643): 17 digits and a check character.
_RESIDENT_ID = re.compile(r"(?<![0-9])([0-9]{6})[0-9]{8}([0-9]{3}[0-9Xx])(?![0-9])")
# Mainland mobile numbers, 11 digits (an optional +86 kept). Not next to a letter or digit,
# so hex ids (a UUID's last group may be a letter and 11 digits) are never touched.
_MOBILE = re.compile(r"(?<![0-9A-Za-z])((?:\+?86)?1[3-9][0-9])[0-9]{4}([0-9]{4})(?![0-9A-Za-z])")
# The shortest value either pattern can match (a mobile number).
MIN_PERSONAL = 11


def mask_personal(text: str) -> str:
    """Mask resident IDs (region code kept, birth date hidden) and mobile numbers (first
    three and last four digits kept) wherever they appear."""
    return _MOBILE.sub(r"\1****\2", _RESIDENT_ID.sub(r"\1********\2", text))


_SCALARS = (int, float, bool, type(None))


def _timestamp(created: float, msecs: float, cache: dict[int, str] = {}) -> str:  # noqa: B006
    """ISO 8601 UTC to the millisecond; the part up to the second is formatted once."""
    second = int(created)
    prefix = cache.get(second)
    if prefix is None:
        cache.clear()
        prefix = cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{prefix}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_personal(record.getMessage()),
        }
        nested = False
        for key, value in record.__dict__.items():
            if key in _STANDARD:
                continue
            if isinstance(value, str):
                # Masked value by value (shorter ones cannot hold personal data): cheaper
                # than scanning the whole line, which was a third of a log line's cost.
                data[key] = mask_personal(value) if len(value) >= MIN_PERSONAL else value
            elif type(value) is int and abs(value) >= 10**10:  # an ID or phone as a number
                data[key] = mask_personal(str(value))
            else:
                data[key] = value
                nested = nested or not isinstance(value, _SCALARS)
        if record.exc_info:
            data["exc"] = mask_personal(self.formatException(record.exc_info))
        line = json.dumps(data, ensure_ascii=False, default=str)
        return mask_personal(line) if nested else line


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        line = super().format(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items() if v is not None)
        return mask_personal(line)


def configure_logging(*, level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(message)s")
    )
    # The logging HOWTO's "Optimization": no formatter here uses the caller's file and
    # line, thread or process names, so the records need not collect them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
