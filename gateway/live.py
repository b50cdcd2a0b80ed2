"""The live configuration: the file as bootstrap, admin writes on top, swapped atomically.

Precedence: ``config.yaml`` supplies members, services, adapters and routes at start.
Every admin write is stored as an overlay entry for one resource (its new body, or a
tombstone when deleted), and for that resource the overlay wins over the file, across
restarts. A resource no admin has touched follows the file, so editing the file and
restarting still works. ``gateway config export`` prints the merged result.

A write builds the complete new configuration beside the running one (validated as a
whole, schemas compiled, new adapters constructed), persists it with its audit record,
then swaps the runtime in one assignment. In-flight exchanges keep the runtime they
started with; a replaced adapter is closed only after the longest service timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from adapters.base import Adapter, AdapterContext
from gateway.config import Config, parse_config
from gateway.errors import ConfigError
from gateway.registry import AdapterSlot, build_adapter, build_runtime
from gateway.store import ResourceChange, Store

__all__ = ["KINDS", "LiveConfig", "merge", "resource_id"]

# Resource kinds an admin may write, and the field that names each resource.
KINDS: Mapping[str, str] = {
    "members": "id",
    "services": "code",
    "adapters": "name",
    "routes": "",
}


def resource_id(kind: str, body: Mapping[str, Any]) -> str:
    if kind == "routes":
        return f"{body['service']}|{body.get('target') or '*'}"
    return str(body[KINDS[kind]])


def merge(doc: Mapping[str, Any], changes: Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """``doc`` with each (kind, id, body-or-None) applied: replace, append or delete."""
    merged = copy.deepcopy(dict(doc))
    for kind, rid, body in changes:
        items = [i for i in merged.get(kind, []) if resource_id(kind, i) != rid]
        if body is not None:
            existing = [resource_id(kind, i) for i in merged.get(kind, [])]
            position = existing.index(rid) if rid in existing else len(items)
            items.insert(position, copy.deepcopy(body))
        merged[kind] = items
    return merged


class LiveConfig:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        apply: Callable[[Any], None],
        context: Callable[[], AdapterContext],
    ) -> None:
        self._file_doc = dict(config.raw)
        self._base = config.base
        self._path = config.path
        self._store = store
        self._apply = apply  # installs a new Runtime (one assignment)
        self._context = context
        self._lock = asyncio.Lock()
        self._slots: dict[str, AdapterSlot] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.doc: dict[str, Any] = dict(config.raw)
        self.config = config

    async def load(self) -> None:
        """Start-up: the file plus the stored overlay; adapters built once each."""
        overlay = await self._store.load_overlay()
        doc = merge(self._file_doc, overlay)
        try:
            config = parse_config(copy.deepcopy(doc), base=self._base, path=self._path)
        except ConfigError as exc:
            raise ConfigError(
                [f"the file with the stored admin changes is invalid: {p}" for p in exc.problems]
            ) from exc
        self._slots = self._build_slots(config, {})[0]
        self._install(doc, config)

    def _install(self, doc: dict[str, Any], config: Config) -> None:
        self.doc, self.config = doc, config
        self._apply(build_runtime(config, self._slots))

    def _build_slots(
        self, config: Config, old: Mapping[str, AdapterSlot]
    ) -> tuple[dict[str, AdapterSlot], list[Adapter]]:
        """New slots; an adapter whose type and config did not change is kept as it is."""
        slots: dict[str, AdapterSlot] = {}
        retired: list[Adapter] = []
        for cfg in config.adapters:
            previous = old.get(cfg.name)
            if previous is not None and previous.config == cfg:
                slots[cfg.name] = previous
                continue
            if (
                previous is not None
                and previous.config.type == cfg.type
                and previous.config.config == cfg.config
            ):
                slots[cfg.name] = AdapterSlot(config=cfg, adapter=previous.adapter)
                continue
            slots[cfg.name] = AdapterSlot(config=cfg, adapter=build_adapter(cfg, self._context()))
            if previous is not None:
                retired.append(previous.adapter)
        retired += [s.adapter for name, s in old.items() if name not in slots]
        return slots, retired

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [self._resolved(kind, i) for i in self.doc.get(kind, [])]

    def get(self, kind: str, rid: str) -> dict[str, Any] | None:
        for item in self.doc.get(kind, []):
            if resource_id(kind, item) == rid:
                return self._resolved(kind, item)
        return None

    def _resolved(self, kind: str, item: Mapping[str, Any]) -> dict[str, Any]:
        """A resource as the API shows it: key files and schema files read in, so that a
        write based on it is self-contained in the store."""
        out = copy.deepcopy(dict(item))
        if kind == "members":
            member = next(m for m in self.config.members if m.id == out["id"])
            if out.get("keys"):
                out["keys"] = [dict(k) for k in member.keys]
        elif kind == "services":
            service = next(s for s in self.config.services if s.code == out["code"])
            for part in ("request_schema", "response_schema", "callback_schema"):
                if isinstance(out.get(part), str):
                    out[part] = copy.deepcopy(getattr(service, part))
        return out

    async def write(
        self,
        kind: str,
        rid: str,
        body: Mapping[str, Any] | None,
        *,
        action: str,
        actor: str,
        role: str,
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Validate, persist (with audit) and apply one change; return (before, after)."""
        async with self._lock:
            before = self.get(kind, rid)
            after = copy.deepcopy(dict(body)) if body is not None else None
            doc = merge(self.doc, [(kind, rid, after)])
            config = parse_config(copy.deepcopy(doc), base=self._base, path=self._path)
            slots, retired = self._build_slots(config, self._slots)
            runtime = build_runtime(config, slots, previous=None)
            await self._store.put_resource(
                ResourceChange(
                    kind=kind,
                    id=rid,
                    action=action,
                    actor=actor,
                    role=role,
                    before=before,
                    after=after,
                )
            )
            self._slots = slots
            self.doc, self.config = doc, config
            self._apply(runtime)
            grace = max((s.timeout_s for s in config.services), default=10.0)
            for adapter in retired:
                self._retire(adapter, grace)
            return before, after

    def _retire(self, adapter: Adapter, grace_s: float) -> None:
        async def close_later() -> None:
            await asyncio.sleep(grace_s)
            await adapter.aclose()

        task = asyncio.create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self._slots.values():
            await slot.adapter.aclose()
