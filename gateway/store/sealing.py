"""The secrets of admin writes sealed on their way into the store and opened on the way
out (gateway/config/secretstore.py), once for both backends: resource bodies of the overlay and
the before/after of change records."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from gateway.config.secretstore import SecretBox
from gateway.store.records import ChangeRecord, ResourceChange

__all__ = ["opened_changes", "opened_overlay", "sealed_change"]


async def sealed_change(box: SecretBox, change: ResourceChange) -> ResourceChange:
    """``change`` with the secrets of its before and after sealed (AAD: kind, id, field)."""
    before = await box.seal(change.kind, change.id, change.before)
    after = await box.seal(change.kind, change.id, change.after)
    if before is change.before and after is change.after:
        return change
    return dataclasses.replace(change, before=before, after=after)


async def opened_overlay(
    box: SecretBox, rows: Sequence[tuple[str, str, Any]]
) -> list[tuple[str, str, Any]]:
    return [(kind, rid, await box.open(kind, rid, body)) for kind, rid, body in rows]


async def opened_changes(box: SecretBox, records: Sequence[ChangeRecord]) -> list[ChangeRecord]:
    out = []
    for r in records:
        before = await box.open(r.kind, r.resource_id, r.before)
        after = await box.open(r.kind, r.resource_id, r.after)
        out.append(
            r if before is r.before and after is r.after
            else dataclasses.replace(r, before=before, after=after)
        )  # fmt: skip
    return out
