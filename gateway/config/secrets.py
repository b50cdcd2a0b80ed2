"""What is secret in the configuration, declared once: write-only values and their views.

A *secret* is a value the gateway needs and nobody reads back once it is written. Three
declarations say which values are secret, for every view (admin API, console, CLI, audit
trail, logs) and for the store's encryption at rest alike:

- **JWK private and symmetric members** (``JWK_SECRET_MEMBERS``: ``d``, ``p``, ``q``,
  ``dp``, ``dq``, ``qi``, ``k``, ``oth``) wherever a JWK (a mapping with ``kty``) appears
  in a resource: a member's ``keys``, an adapter's inline keys;
- **adapter config fields** an adapter type's ``config_schema`` marks ``writeOnly: true``
  (JSON Schema's own keyword; ``properties``, ``additionalProperties``, ``patternProperties``,
  ``items``, ``prefixItems`` and ``allOf``/``anyOf``/``oneOf`` are followed), e.g. every
  value of the ``http`` adapter's ``headers``;
- **admin tokens**: only their SHA-256 is stored, and no view carries even that
  (``gateway/admin/auth.py``).

A view shows a secret as its *placeholder*, ``"set · 1a2b3c4d"``: that it is set and its
*fingerprint*, the first 8 hex digits of the SHA-256 of its UTF-8 text (a non-string
secret, such as a JWK's ``oth``, of its canonical JSON). A write that carries a placeholder
back (a PATCH or PUT of what was read, a console form left as it was) keeps the stored
secret it names (``restore``); a placeholder that names no stored secret of that resource
is refused, so a placeholder is never stored as if it were the secret.

The API, for views and for the store:

- ``secret_pointers(kind, item)``: the JSON Pointers of the secrets a resource holds;
- ``redact(kind, item)``: a copy with each secret replaced by its placeholder;
- ``restore(kind, body, current)``: a write's body with placeholders replaced by the
  stored secrets they name (``SchemaInvalid`` for one that names none);
- ``fingerprint(value)``, ``placeholder(value)``, ``is_placeholder(value)``;
- ``is_reference(value)``: ``{"env": NAME}`` or ``{"file": PATH}``, a secret given by
  reference (gateway/config/secretstore.py resolves them), shown as it is;
- ``schema_secret_pointers(schema)``: the pointer patterns (``*`` for any member or item)
  a JSON Schema marks write-only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gateway.config.plugins import adapter_types
from gateway.errors import FieldError, SchemaInvalid

__all__ = [
    "JWK_SECRET_MEMBERS",
    "PLACEHOLDER_PREFIX",
    "fingerprint",
    "is_placeholder",
    "is_reference",
    "placeholder",
    "redact",
    "redact_document",
    "restore",
    "schema_secret_pointers",
    "secret_paths",
    "secret_pointers",
    "secrets_of",
]

JWK_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
PLACEHOLDER_PREFIX = "set · "
_PLACEHOLDER = re.compile(r"^set · ([0-9a-f]{8})$")
_WILDCARD = "*"

Path = tuple[str, ...]


def fingerprint(value: Any) -> str:
    """The first 8 hex digits of the SHA-256 of a secret (its UTF-8 text, or for anything
    else its canonical JSON)."""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def placeholder(value: Any) -> str:
    """What every view shows instead of a secret: ``set · <fingerprint>``."""
    return PLACEHOLDER_PREFIX + fingerprint(value)


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and _PLACEHOLDER.match(value) is not None


def is_reference(value: Any) -> bool:
    """A secret given by reference, ``{"env": NAME}`` or ``{"file": PATH}``: it names where
    the secret is, which views show as it is (the reference is not the secret)."""
    return (
        isinstance(value, Mapping)
        and len(value) == 1
        and next(iter(value)) in ("env", "file")
        and isinstance(next(iter(value.values())), str)
    )


# Pointers ----------------------------------------------------------------------------


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(path: Path) -> str:
    return "".join("/" + _escape(t) for t in path)


def _tokens(pointer: str) -> Path:
    if not pointer:
        return ()
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))


def schema_secret_pointers(schema: Any) -> list[str]:
    """The places a JSON Schema marks ``writeOnly: true``, as pointer patterns in which
    ``*`` stands for any member or item (``/headers/*`` for every header value)."""
    found: list[Path] = []
    _walk_schema(schema, (), found, depth=0)
    return sorted({_pointer(p) for p in found})


def _walk_schema(schema: Any, at: Path, found: list[Path], *, depth: int) -> None:
    if not isinstance(schema, Mapping) or depth > 32:
        return
    if schema.get("writeOnly") is True:
        found.append(at)
        return  # everything under a secret is the secret
    for key in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(key) or ():
            _walk_schema(branch, at, found, depth=depth + 1)
    for name, sub in (schema.get("properties") or {}).items():
        _walk_schema(sub, (*at, str(name)), found, depth=depth + 1)
    for sub in (schema.get("patternProperties") or {}).values():
        _walk_schema(sub, (*at, _WILDCARD), found, depth=depth + 1)
    if isinstance(schema.get("additionalProperties"), Mapping):
        _walk_schema(schema["additionalProperties"], (*at, _WILDCARD), found, depth=depth + 1)
    if isinstance(schema.get("items"), Mapping):
        _walk_schema(schema["items"], (*at, _WILDCARD), found, depth=depth + 1)
    for i, sub in enumerate(schema.get("prefixItems") or ()):
        _walk_schema(sub, (*at, str(i)), found, depth=depth + 1)


def _expand(node: Any, pattern: Path, at: Path = ()) -> Iterator[Path]:
    """The concrete paths in ``node`` that ``pattern`` names (``*``: every member/item)."""
    if not pattern:
        yield at
        return
    head, rest = pattern[0], pattern[1:]
    if isinstance(node, Mapping):
        names = list(node) if head == _WILDCARD else [head] if head in node else []
        for name in names:
            yield from _expand(node[name], rest, (*at, str(name)))
    elif isinstance(node, list):
        if head == _WILDCARD:
            indexes = range(len(node))
        elif head.isdigit() and int(head) < len(node):
            indexes = range(int(head), int(head) + 1)
        else:
            indexes = range(0)
        for i in indexes:
            yield from _expand(node[i], rest, (*at, str(i)))


def _jwk_paths(node: Any, at: Path = (), depth: int = 0) -> Iterator[Path]:
    """The secret members of every JWK (a mapping with ``kty``) inside ``node``."""
    if depth > 64:
        return
    if isinstance(node, Mapping):
        is_jwk = "kty" in node
        for name, value in node.items():
            if is_jwk and name in JWK_SECRET_MEMBERS:
                yield (*at, str(name))
            else:
                yield from _jwk_paths(value, (*at, str(name)), depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _jwk_paths(value, (*at, str(i)), depth + 1)


# Secret patterns by adapter type name. A type's schema is its class's, fixed for the
# process; scanning entry points costs milliseconds, so it happens again only for a type
# not seen yet (a plugin installed at runtime).
_TYPE_PATTERNS: dict[str, list[Path]] = {}


def _adapter_patterns(item: Mapping[str, Any]) -> list[Path]:
    kind = item.get("type")
    if not isinstance(kind, str):
        return []
    if kind not in _TYPE_PATTERNS:
        for name, found in adapter_types().items():
            pointers = schema_secret_pointers(found.config_schema)
            _TYPE_PATTERNS[name] = [("config", *_tokens(p)) for p in pointers]
    return _TYPE_PATTERNS.get(kind, [])


def _paths(kind: str, item: Any) -> list[Path]:
    if not isinstance(item, Mapping):
        return []
    paths = set(_jwk_paths(item))
    if kind == "adapters":
        for pattern in _adapter_patterns(item):
            paths.update(_expand(item, pattern))
    # A secret inside another secret is the outer one: keep the outermost only.
    kept = sorted(paths, key=len)
    outer: list[Path] = []
    for path in kept:
        if not any(path[: len(o)] == o for o in outer):
            outer.append(path)
    return sorted(outer)


def secret_paths(kind: str, item: Any) -> list[Path]:
    """``secret_pointers`` as token tuples, for code that walks the document."""
    return _paths(kind, item)


def secret_pointers(kind: str, item: Any) -> list[str]:
    """The JSON Pointers of the secrets ``item`` (a ``kind`` resource: members, adapters,
    services, routes) holds, outermost first within each branch, in document order."""
    return [_pointer(p) for p in _paths(kind, item)]


def _get(node: Any, path: Path) -> Any:
    for token in path:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def _set(node: Any, path: Path, value: Any) -> None:
    parent = _get(node, path[:-1])
    if isinstance(parent, list):
        parent[int(path[-1])] = value
    else:
        parent[path[-1]] = value


# Views and writes --------------------------------------------------------------------


def redact(kind: str, item: Any) -> Any:
    """A copy of a resource with every secret replaced by its placeholder."""
    paths = _paths(kind, item)
    if not paths:
        return copy.deepcopy(item)
    shown = copy.deepcopy(item)
    for path in paths:
        value = _get(shown, path)
        if not is_placeholder(value) and not is_reference(value):
            _set(shown, path, placeholder(value))
    return shown


def redact_document(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A whole configuration document (``config.yaml``'s shape) with every resource's
    secrets replaced by their placeholders."""
    out = dict(doc)
    for kind in ("members", "adapters", "services", "routes"):
        items = doc.get(kind)
        if isinstance(items, list):
            out[kind] = [redact(kind, i) for i in items]
    return out


def restore(kind: str, body: Any, current: Any) -> Any:
    """``body`` (a write) with each placeholder at a secret's place replaced by the stored
    secret of ``current`` (the resource as stored, or None) whose fingerprint it shows.

    A placeholder that names no stored secret of this resource is ``SchemaInvalid`` with its
    pointer: the writer must send the secret itself."""
    paths = [p for p in _paths(kind, body) if is_placeholder(_get(body, p))]
    if not paths:
        return body
    stored = {fingerprint(_get(current, p)): _get(current, p) for p in _paths(kind, current)}
    restored = copy.deepcopy(body)
    errors: list[FieldError] = []
    for path in paths:
        shown = _get(body, path)
        match = _PLACEHOLDER.match(shown)
        assert match is not None  # is_placeholder said so
        if match.group(1) in stored:
            _set(restored, path, copy.deepcopy(stored[match.group(1)]))
        else:
            errors.append(
                FieldError(
                    _pointer(path),
                    "is a fingerprint that matches no stored secret here; send the secret itself",
                )
            )
    if errors:
        raise SchemaInvalid("a write-only value was given as a fingerprint", errors)
    return restored


def secrets_of(kind: str, item: Any) -> Sequence[tuple[str, Any]]:
    """Each secret of a resource with its pointer (for the store's encryption at rest)."""
    return [(_pointer(p), _get(item, p)) for p in _paths(kind, item)]
