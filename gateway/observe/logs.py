"""Logging: one JSON object per line in production, readable text for development.

Both formatters mask personal data with ``gateway.masking`` (the views' own function):
the message, each extra field (strings, integers, nested values) and tracebacks."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gateway.masking import MIN_PERSONAL, mask_personal, mask_value

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _masked_str(value: object) -> str:
    return mask_personal(str(value))


def _masked_extra(value: Any) -> Any:
    """One extra field, masked on its own (cheaper than scanning the whole line, which was
    a third of a line's cost): short strings and small integers cannot hold personal data."""
    if type(value) is str:
        return mask_personal(value) if len(value) >= MIN_PERSONAL else value
    if value is None or isinstance(value, int | float | dict | list | tuple):
        return mask_value(value)  # large integers, and every string and number nested
    return _masked_str(value)  # what JSON cannot hold is written as (masked) text


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
        for key, value in record.__dict__.items():
            if key in _STANDARD:
                continue
            data[key] = _masked_extra(value)
        if record.exc_info:
            data["exc"] = mask_personal(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False, default=_masked_str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = mask_personal(super().format(record))
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if extra:
            # Each value masked before it is written: repr's escapes (``\x07``) could
            # otherwise glue digits onto a number.
            line += " " + " ".join(
                f"{k}={_masked_extra(v)}" for k, v in extra.items() if v is not None
            )
        return line


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
