"""Adapter types installed in this environment: the ``gateway.adapters`` entry points.

Low in the house on purpose: what is secret in an adapter's config (gateway/config/secrets.py)
is read from its type's schema, and that must not reach up to the runtime registry.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from adapters.base import ENTRY_POINT_GROUP, AdapterType

__all__ = ["adapter_types"]

log = logging.getLogger("gateway.runtime.registry")


def adapter_types(*, refresh: bool = False) -> dict[str, AdapterType]:
    """Adapter types installed in this environment, by entry-point name."""
    if refresh:
        importlib.invalidate_caches()
    found: dict[str, AdapterType] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:  # a broken plugin must not take the gateway down
            log.exception("adapter type %s failed to load", ep.name)
    return found
