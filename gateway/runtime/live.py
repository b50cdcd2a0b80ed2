"""The live configuration: the file as bootstrap, admin writes on top, swapped atomically.

Precedence: ``config.yaml`` supplies members, services, adapters and routes at start.
Every admin write is stored as an overlay entry for one resource (its new body, or a
tombstone when deleted), and for that resource the overlay wins over the file, across
restarts. A resource no admin has touched follows the file, so editing the file and
restarting still works. ``gateway config export`` prints the merged result.

Between the two sits an optional *layer* (the federation directory, ``gateway/federation
.py``): changes computed from the file and overlay, over the file, under the overlay, so an
admin's write still wins over what the directory says. ``set_layer`` rebuilds with it.
The layer only adds: it is given the file with the overlay and must leave what they
define alone. An admin write on a resource that only the layer defines (a peer gateway
learnt from the directory) is stored as a *patch*, ``{"$patch": {field: value}}``, of
the fields it changed (``PATCHABLE``), applied over whatever the layer says at each
rebuild: the operator's ``enabled: false`` survives a new directory version, and so
does the directory's revocation of a key survive the operator's write. A write that
would change anything else of such a resource (its keys, URL, regions) is refused, as
is deleting it: those belong to the national platform.

A write builds the complete new configuration beside the running one (validated as a
whole, schemas compiled, new adapters constructed), persists it with its audit record,
then swaps the runtime in one assignment. In-flight exchanges keep the runtime they
started with; a replaced adapter is closed only after the longest service timeout.

Several processes (workers of ``gateway serve --workers N``, instances on one
PostgreSQL database) share the store, so each write also bumps the store's
configuration version in its own transaction. Every process watches that version
(``Store.wait_for_config_change``: a notification where the store has them, otherwise a
poll every ``POLL_S``) and, when it moved, rebuilds from the file and the stored overlay
and swaps the same way: a write is in force everywhere within a second. A write is
based on the version this process last applied; when another process wrote meanwhile
(``ConfigConflict``) it reads the new configuration and tries again, unless that
changed the very resource being written: then the admin gets 409 ``resource_changed``
rather than a silent overwrite of the other write.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from adapters.base import Adapter, AdapterContext
from gateway.config.model import Config, parse_config
from gateway.config.secrets import redact
from gateway.errors import ConfigError, FieldError, ResourceChanged, SchemaInvalid
from gateway.runtime.registry import AdapterSlot, Runtime, build_adapter, build_runtime
from gateway.store import ConfigConflict, ResourceChange, Store

__all__ = ["KINDS", "PATCHABLE", "Layer", "LiveConfig", "is_patch", "merge", "resource_id"]

log = logging.getLogger("gateway.runtime.live")

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


# A layer: given the file with the overlay applied, the changes it makes over the file.
Layer = Callable[[Mapping[str, Any]], Sequence[tuple[str, str, Any]]]

# What an admin may change of a resource only the layer defines, stored as a patch.
PATCHABLE: Mapping[str, frozenset[str]] = {
    "members": frozenset(
        {"enabled", "name", "services", "rate_limit", "revoked_keys", "allowed_algs"}
    ),
    "adapters": frozenset({"enabled", "readiness", "concurrency", "breaker"}),
}
PATCH = "$patch"


def is_patch(body: Any) -> bool:
    """An overlay entry that patches a layer resource rather than replacing it."""
    return isinstance(body, Mapping) and PATCH in body


def _redacted(kind: str, body: Any) -> Any:
    """``redact`` that also reaches into a patch entry's fields."""
    if is_patch(body):
        return {PATCH: redact(kind, body[PATCH])}
    return redact(kind, body)


def _patched(item: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: copy.deepcopy(v) for k, v in item.items()}
    for field, value in patch.items():
        if value is None:
            out.pop(field, None)
        else:
            out[field] = copy.deepcopy(value)
    revoked = set(out.get("revoked_keys", ()))
    if revoked and isinstance(out.get("keys"), list):
        # A kid revoked here stays out, whatever the layer lists.
        out["keys"] = [k for k in out["keys"] if not _kid_in(k, revoked)]
    return out


def _kid_in(jwk: Any, kids: set[str]) -> bool:
    return isinstance(jwk, Mapping) and jwk.get("kid") in kids


def _kids(keys: Any) -> set[str]:
    if not isinstance(keys, list):
        return set()
    return {str(k.get("kid")) for k in keys if isinstance(k, Mapping)}


def merge(doc: Mapping[str, Any], changes: Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """``doc`` with each (kind, id, body-or-None) applied: replace, append or delete.
    A patch of a layer resource (``is_patch``) is not a body: ``LiveConfig`` applies it."""
    merged = copy.deepcopy(dict(doc))
    for kind, rid, body in changes:
        if is_patch(body):
            continue
        items = [i for i in merged.get(kind, []) if resource_id(kind, i) != rid]
        if body is not None:
            existing = [resource_id(kind, i) for i in merged.get(kind, [])]
            position = existing.index(rid) if rid in existing else len(items)
            items.insert(position, copy.deepcopy(body))
        merged[kind] = items
    return merged


class LiveConfig:
    POLL_S = 0.2  # between version checks; a change is in force everywhere within ~this
    WRITE_ATTEMPTS = 5  # a write that keeps meeting others' writes gives up with 409

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
        self._runtime: Runtime | None = None  # the last one installed; its schemas are reused
        self._context = context
        self._lock = asyncio.Lock()
        self._slots: dict[str, AdapterSlot] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.doc: dict[str, Any] = dict(config.raw)
        self.config = config
        self.version = 0  # the store's configuration version this process runs
        self._layer: Layer | None = None
        self._overlay: list[tuple[str, str, Any]] = []  # as last read from the store
        self._layered: dict[tuple[str, str], dict[str, Any]] = {}  # what only the layer defines
        self._refused: Mapping[str, str] = {}  # member id or adapter name → why refused

    async def load(self) -> None:
        """Start-up: the file plus the stored overlay; adapters built once each."""
        # The version first: an overlay read after it is at least as new (a change in
        # between is applied now and once more at the next check, harmlessly).
        version = await self._store.config_version()
        doc, config = await self._stored()
        self._slots = self._build_slots(config, {})[0]
        self._install(doc, config)
        self.version = version

    async def _stored(self) -> tuple[dict[str, Any], Config]:
        """The file with the stored overlay applied, parsed."""
        self._overlay = list(await self._store.load_overlay())
        doc = self._compose(self._overlay)
        try:
            config = parse_config(copy.deepcopy(doc), base=self._base, path=self._path)
        except ConfigError as exc:
            raise ConfigError(
                [f"the file with the stored admin changes is invalid: {p}" for p in exc.problems]
            ) from exc
        return doc, config

    def _compose(self, overlay: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
        """file < layer < overlay; patches apply to what only the layer defines."""
        full = [c for c in overlay if not is_patch(c[2])]
        patches = {(k, r): b[PATCH] for k, r, b in overlay if is_patch(b)}
        local = merge(self._file_doc, full)
        if self._layer is None:
            self._layered = {}
            return local
        changes = self._layer(local)
        defined = {(kind, resource_id(kind, i)) for kind in KINDS for i in local.get(kind, [])}
        self._layered = {
            (kind, rid): copy.deepcopy(dict(body))
            for kind, rid, body in changes
            if body is not None and (kind, rid) not in defined
        }
        patched = [
            (kind, rid, _patched(body, patches[(kind, rid)]))
            for (kind, rid), body in self._layered.items()
            if (kind, rid) in patches
        ]
        return merge(merge(merge(self._file_doc, changes), full), patched)

    async def set_layer(self, layer: Layer | None) -> None:
        """Install a new layer and rebuild as a refresh does; a layer whose result does
        not validate raises ``ConfigError`` and leaves everything as it was."""
        async with self._lock:
            previous = self._layer
            self._layer = layer
            try:
                doc, config = await self._stored()
                slots, retired = self._build_slots(config, self._slots)
            except Exception:
                self._layer = previous
                raise
            runtime = build_runtime(config, slots, previous=self._runtime)
            self._slots = slots
            self.doc, self.config = doc, config
            self._set(runtime)
            self._retire_all(retired, config)

    def watch(self) -> None:
        """Follow admin writes made by other processes, until ``aclose``."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="live-config")

    async def _watch(self) -> None:
        while True:
            await self._store.wait_for_config_change(self.POLL_S)
            try:
                await self.refresh()
            except Exception:  # the store down, a config this process cannot build …
                log.exception("could not apply the stored configuration; will retry")
                await asyncio.sleep(self.POLL_S)

    async def refresh(self) -> bool:
        """Apply what other processes wrote, if anything; whether the version moved."""
        if await self._store.config_version() == self.version:
            return False
        async with self._lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> bool:
        version = await self._store.config_version()
        if version == self.version:
            return False
        started = time.perf_counter()
        doc, config = await self._stored()
        slots, retired = self._build_slots(config, self._slots)
        runtime = build_runtime(config, slots, previous=self._runtime)
        self._slots = slots
        self.doc, self.config = doc, config
        self._set(runtime)
        self.version = version
        self._retire_all(retired, config)
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info("configuration version %d applied in %.0f ms", version, elapsed_ms)
        return True

    def _install(self, doc: dict[str, Any], config: Config) -> None:
        self.doc, self.config = doc, config
        self._set(build_runtime(config, self._slots))

    def _set(self, runtime: Runtime) -> None:
        runtime = dataclasses.replace(runtime, refused=dict(self._refused))
        self._runtime = runtime
        self._apply(runtime)

    def set_refused(self, refused: Mapping[str, str]) -> None:
        """Members (by id) and adapters (by name) to refuse, with the detail the client
        gets (``DirectoryStale``): no rebuild, the running runtime with a new list."""
        self._refused = dict(refused)
        if self._runtime is not None:
            self._set(self._runtime)

    def layered(self, kind: str) -> list[str]:
        """The ids of the resources of ``kind`` that only the layer defines."""
        return [rid for k, rid in self._layered if k == kind]

    def from_layer(self, kind: str, rid: str) -> bool:
        """Whether only the layer (the directory) defines this member or adapter, so
        that a write is kept as a patch. A route holds nothing the directory could
        revoke: an admin's route replaces the directory's, as a local decision."""
        return kind in PATCHABLE and (kind, rid) in self._layered

    def _layer_write(
        self, kind: str, rid: str, after: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
        """The patch an admin write on a layer resource stores, and the overlay with it;
        ``SchemaInvalid`` when it changes what only the directory may change."""
        base = self._layered[(kind, rid)]
        if after is None:
            raise SchemaInvalid(
                f"{kind[:-1]} {rid} comes from the federation directory",
                [FieldError("", 'it cannot be deleted here: disable it ({"enabled": false})')],
            )
        allowed = PATCHABLE.get(kind, frozenset())
        patch: dict[str, Any] = {}
        errors: list[FieldError] = []
        revoked = set(after.get("revoked_keys", ()) or ())
        for field in sorted(set(base) | set(after)):
            if after.get(field) == base.get(field):
                continue
            if field in allowed:
                patch[field] = copy.deepcopy(after.get(field))
            elif (
                field == "keys"
                and _kids(after.get(field)) <= _kids(base.get(field))
                and (_kids(base.get(field)) - _kids(after.get(field)) <= revoked)
            ):
                continue  # keys left out by a revocation: the revoked list says it
            else:
                errors.append(
                    FieldError(f"/{field}", "comes from the federation directory; "
                               "only the national platform changes it")
                )  # fmt: skip
        if errors:
            raise SchemaInvalid(f"{kind[:-1]} {rid} comes from the federation directory", errors)
        stored = {KINDS[kind]: rid, PATCH: patch}
        overlay = [c for c in self._overlay if (c[0], c[1]) != (kind, rid)]
        return stored, [*overlay, (kind, rid, stored)]

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
        write based on it is self-contained in the store. Inline keys stay as written: a
        secret reference ({"env": …}) is shown and kept, never its value."""
        out = copy.deepcopy(dict(item))
        if kind == "members":
            member = next(m for m in self.config.members if m.id == out["id"])
            if out.get("keys"):
                out["keys"] = [
                    dict(member.keys[j]) if isinstance(ref, str) else ref
                    for j, ref in enumerate(out["keys"])
                ]
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
        """Validate, persist (with audit) and apply one change; return (before, after).

        ``body`` was derived from the resource as this process showed it at the call:
        if, once other processes' writes are in, the resource is no longer that, the
        write is refused with ``ResourceChanged`` instead of undoing theirs."""
        seen = self.get(kind, rid)
        after = copy.deepcopy(dict(body)) if body is not None else None
        async with self._lock:
            for _ in range(self.WRITE_ATTEMPTS):
                before = self.get(kind, rid)
                if before != seen:
                    raise ResourceChanged(f"{kind[:-1]} {rid} was changed meanwhile; read it again")
                overlay: list[tuple[str, str, Any]] | None = None
                stored = after
                if self.from_layer(kind, rid):
                    stored, overlay = self._layer_write(kind, rid, after)
                    doc = self._compose(overlay)
                else:
                    doc = merge(self.doc, [(kind, rid, after)])
                config = parse_config(copy.deepcopy(doc), base=self._base, path=self._path)
                slots, retired = self._build_slots(config, self._slots)
                runtime = build_runtime(config, slots, previous=self._runtime)
                change = ResourceChange(
                    kind=kind, id=rid, action=action, actor=actor, role=role,
                    before=before, after=stored,
                    # The trail records that a secret changed, by fingerprint, never it.
                    recorded=(redact(kind, before), _redacted(kind, stored)),
                )  # fmt: skip
                try:
                    version = await self._store.put_resource(change, expected_version=self.version)
                except ConfigConflict:
                    # Another process wrote first: the new adapters built for this attempt
                    # were never installed, so they close now; then take the others' writes.
                    running = {id(s.adapter) for s in self._slots.values()}
                    for slot in slots.values():
                        if id(slot.adapter) not in running:
                            await slot.adapter.aclose()
                    await self._refresh_locked()
                    continue
                self._slots = slots
                self.doc, self.config = doc, config
                self._set(runtime)
                self.version = version
                self._retire_all(retired, config)
                if overlay is not None:
                    self._overlay = overlay
                    return before, self.get(kind, rid)  # the patch over the directory's
                self._overlay = [c for c in self._overlay if (c[0], c[1]) != (kind, rid)]
                self._overlay.append((kind, rid, stored))
                return before, after
        raise ResourceChanged("the configuration kept changing under this write; try again")

    def _retire_all(self, retired: Iterable[Adapter], config: Config) -> None:
        grace = max((s.timeout_s for s in config.services), default=10.0)
        for adapter in retired:
            self._retire(adapter, grace)

    def _retire(self, adapter: Adapter, grace_s: float) -> None:
        async def close_later() -> None:
            await asyncio.sleep(grace_s)
            await adapter.aclose()

        task = asyncio.create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self._slots.values():
            await slot.adapter.aclose()
