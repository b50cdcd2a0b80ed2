"""What the admin API and the console show, per role: one view of each shape.

- a resource (member, adapter, service, route) with its secrets as placeholders
  (``resource_view``; what is secret is declared in ``gateway/config/secrets.py``);
- an audit entry, its before and after redacted the same way (``audit_view``): the trail
  records fingerprints since secrets became write-only, and an entry written before that
  is redacted when read;
- a message or dead letter as ``gateway/masking.py`` builds it, less its bodies and
  headers for a role that may not read them (``for_role``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.admin.auth import Principal
from gateway.config.secrets import redact
from gateway.masking import mask_headers, masked_body, masked_error
from gateway.store import ChangeRecord, DeadLetter, MessageRecord

__all__ = [
    "BODY_FIELDS",
    "WITHHELD",
    "audit_view",
    "dead_letter_view",
    "for_role",
    "message_view",
    "resource_view",
]

BODY_FIELDS = ("request", "response", "result", "request_headers")
WITHHELD = "withheld"  # the key a trimmed view carries: which fields it left out


def resource_view(kind: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """A resource as every role sees it: each secret as ``set · <fingerprint>``."""
    shown: dict[str, Any] = redact(kind, dict(item))
    return shown


def audit_view(entry: ChangeRecord) -> dict[str, Any]:
    """One audit entry, secrets in its before and after as placeholders."""
    fields = dataclasses.asdict(entry)
    kind = str(fields.get("kind", ""))
    for part in ("before", "after"):
        fields[part] = redact(kind, fields.get(part))
    return fields


def for_role(principal: Principal, view: Mapping[str, Any]) -> dict[str, Any]:
    """A message view for ``principal``: without bodies and headers unless it may read
    them (an auditor sees who exchanged what, when, and how it ended; not the content)."""
    shown = dict(view)
    if principal.may("read_bodies"):
        return shown
    for name in BODY_FIELDS:
        shown[name] = None
    shown[WITHHELD] = [name for name in BODY_FIELDS if name in view]
    return shown


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
        "error": masked_error(record.error),
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
    return {**dataclasses.asdict(letter), "error": masked_error(letter.error)}
