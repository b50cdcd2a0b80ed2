"""Personal data out of sight: stored exchanges as operators see them.

The operator's view of a stored message is built here once (``message_view``, and
``dead_letter_view`` for a dead letter) and shown as it is by the admin API, ``gateway
log show`` and ``gateway dead-letters list``. Three rules apply to it: ``Gw-User`` (and
any credential header) is replaced by ``***``; every resident identity number keeps
only its region code and check digits and every mobile number its first three and last
four digits (``mask_personal``), in bodies and in the ``error`` an upstream may have
written; and each field a service lists under ``sensitive`` (JSON Pointers, RFC 6901,
where a ``*`` segment stands for every member or item) is replaced by ``***``. Messages
in transit are never changed; only views are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.logs import mask_personal
from gateway.store import DeadLetter, MessageRecord

__all__ = [
    "MASK",
    "dead_letter_view",
    "mask_document",
    "mask_headers",
    "mask_pointers",
    "masked_body",
    "message_view",
]

MASK = "***"
_SECRET_HEADERS = frozenset({"gw-user", "authorization", "cookie", "proxy-authorization"})


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


def _mask_strings(node: Any) -> Any:
    if isinstance(node, str):
        return mask_personal(node)
    if isinstance(node, dict):
        return {mask_personal(k): _mask_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_mask_strings(v) for v in node]
    return node


def mask_document(document: Any, pointers: Iterable[str] = ()) -> Any:
    """A parsed document for display: sensitive fields and resident IDs masked."""
    return _mask_strings(mask_pointers(document, pointers))


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
    """Headers for display: ``Gw-User`` and credentials hidden, resident IDs masked."""
    return {
        k: MASK if k.lower() in _SECRET_HEADERS else mask_personal(v) for k, v in headers.items()
    }


def _masked_error(error: str | None) -> str | None:
    # Free text, often an upstream's own words about the applicant.
    return mask_personal(error) if error else error


def message_view(record: MessageRecord, sensitive: Sequence[str] = ()) -> dict[str, Any]:
    """A stored exchange for an operator (the admin API's JSON): Gw-User, resident IDs
    and mobile numbers (also in ``error``) and the service's ``sensitive`` fields masked."""
    return {
        "seq": record.seq,
        "message_id": record.message_id,
        "client": record.client,
        "service": record.service,
        "mode": record.mode,
        "state": record.state,
        "target": record.target,
        "adapter": record.adapter,
        "receiver": record.receiver,  # the member it was delivered to (whose callback it takes)
        "status": record.status,
        "code": record.code,
        "error": _masked_error(record.error),
        "attempts": record.attempts,
        "request_digest": record.request_digest,
        "request_headers": mask_headers(record.request_headers),
        "request": masked_body(record.request_body, sensitive),
        "response": masked_body(record.response_body, sensitive),
        "result": masked_body(record.result, sensitive),
        "timings_ms": dict(record.timings),
        "trace_id": record.trace_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter (message or callback) for an operator: its last ``error`` masked."""
    return {**dataclasses.asdict(letter), "error": _masked_error(letter.error)}
