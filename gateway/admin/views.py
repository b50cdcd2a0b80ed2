"""What the admin API and the console show, per role: one view of each shape.

- a resource (member, adapter, service, route) with its secrets as placeholders
  (``resource_view``; what is secret is declared in ``gateway/secrets.py``);
- an audit entry, its before and after redacted the same way (``audit_view``): the trail
  records fingerprints since secrets became write-only, and an entry written before that
  is redacted when read;
- a message or dead letter as ``gateway/masking.py`` builds it, less its bodies and
  headers for a role that may not read them (``for_role``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gateway.admin.auth import Principal
from gateway.secrets import redact
from gateway.store import ChangeRecord

__all__ = ["BODY_FIELDS", "WITHHELD", "audit_view", "for_role", "resource_view"]

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
