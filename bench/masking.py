"""Microseconds that masking personal data costs, where it runs: on the exchange path (one
JSON log line per request and per outbox attempt) and in the operator's views.

    .venv/bin/python -m bench.masking [--n 5000]

Each figure is the median of five timed runs in CPU time of the measuring thread
(``bench.crypto.per_op_us``). "masking in it" is the part of the line's cost that is
``mask_personal`` over the line's values, measured alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
import uuid
from collections.abc import Sequence

from bench.crypto import per_op_us
from gateway.admin.views import message_view
from gateway.masking import mask_personal
from gateway.observe.logs import JsonFormatter
from gateway.store import MessageRecord

__all__ = ["main"]

DOCUMENT = {
    "mode": "full_online",
    "service_item_code": "11330000002482448J3330117001000",
    "applicant": {
        "type": "person",
        "resident_id": "11010519491231002X",
        "name": "张三丰",
        "phone": "13800138000",
    },
    "source_region": "330000",
    "handling_region": "440000",
    "materials": [{"name": "营业执照", "ref": "mat://330000/2026/000123"}],
    "e_licenses": ["ZJ-EL-2026-000456"],
}
REFUSAL = (
    "platform: the platform refused: E409 "
    "申请人 11010519491231002X（手机 138-0013-8000）已有在办申请"
)


def _record(fields: dict[str, object]) -> logging.LogRecord:
    record = logging.LogRecord("gateway.exchange", logging.INFO, "", 0, "exchange", (), None)
    record.__dict__.update(fields)
    return record


def _message() -> MessageRecord:
    body = json.dumps(DOCUMENT, ensure_ascii=False).encode()
    now = time.time()
    return MessageRecord(
        seq=1,
        message_id=str(uuid.uuid4()),
        client="330000:one-stop-portal",
        service="crossregion.apply",
        mode="async",
        state="dead",
        request_headers={"Gw-User": "inspector-7", "Gw-Client": "330000:one-stop-portal"},
        request_body=body,
        request_digest="sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
        target="440000",
        adapter="national",
        status=None,
        code="upstream_error",
        response_headers={},
        response_body=None,
        result=None,
        error=REFUSAL,
        attempts=4,
        next_attempt_at=None,
        created_at=now,
        updated_at=now,
        trace_id=uuid.uuid4().hex,
    )


def _mask_all(values: list[str]) -> list[str]:
    return [mask_personal(v) for v in values]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masking", description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="calls per timed run")
    args = parser.parse_args(argv)
    exchange = {
        "event": "exchange",
        "path": "/v1/exchange/credit.query",
        "client": "330000:one-stop-portal",
        "message_id": str(uuid.uuid4()),
        "service": "credit.query",
        "adapter": "national",
        "status": 200,
        "code": None,
        "trace_id": uuid.uuid4().hex,
        "latency_ms": 1.234,
    }
    delivery = {**exchange, "event": "delivery", "outcome": "dead", "error": REFUSAL}
    formatter = JsonFormatter()
    text = json.dumps(DOCUMENT, ensure_ascii=False)
    message = _message()
    rows: list[tuple[str, float]] = []
    for name, fields in (("exchange log line", exchange), ("delivery line, refusal", delivery)):
        record = _record(fields)
        values = [v for v in fields.values() if isinstance(v, str)]
        rows.append((name, per_op_us(functools.partial(formatter.format, record), args.n)))
        mask_all = functools.partial(_mask_all, values)
        rows.append(("  masking in it", per_op_us(mask_all, args.n)))
    rows.append(
        (f"mask_personal, {len(text)}-char text", per_op_us(lambda: mask_personal(text), args.n))
    )
    rows.append(("message_view (admin API)", per_op_us(lambda: message_view(message), args.n)))
    print(f"{'µs per call':<34} {'cpu':>8}")
    for name, us in rows:
        print(f"{name:<34} {us:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
