"""The one small interface every adapter implements (as httpx's transports do).

An adapter turns an ``Exchange`` (what a member asked, already verified and validated)
into an ``Answer`` from somewhere else. The core finds adapter types by name through the
``gateway.adapters`` entry-point group and never imports a concrete adapter.

An adapter type is a class with:
- ``config_schema``: a JSON Schema (Draft 2020-12) for its ``config`` block;
- ``__init__(name, config, context)``: config already validated against that schema;
- ``send(exchange) -> Answer``; ``health() -> Health``; ``aclose()``;
- optionally ``receiver``: the member id of the party it delivers to (the national
  platform, a peer gateway). A callback for a message is taken only from the member the
  message was delivered to (PROTOCOL.md, «Trust rules»); an adapter without one delivers
  to a party that never calls back.

Adapters raise the gateway's errors: ``UpstreamError`` (502), ``UpstreamTimeout`` (504),
``AdapterUnavailable`` (503). Anything else is reported as ``upstream_error``.

This module is the stable surface for plugin authors: everything an adapter needs is
importable from here (its ``__all__``), the errors included, so that a plugin does not
depend on how the core is laid out. README.md, "Writing an adapter", shows a whole one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import aiohttp
from multidict import CIMultiDict

from gateway.errors import AdapterUnavailable, UpstreamError, UpstreamTimeout

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AdapterContext",
    "AdapterType",
    "AdapterUnavailable",
    "Answer",
    "Exchange",
    "Health",
    "Signer",
    "UpstreamError",
    "UpstreamTimeout",
    "receiver_of",
]

# The entry-point group a plugin's package registers its adapter types in.
ENTRY_POINT_GROUP = "gateway.adapters"


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """One verified, validated message on its way out."""

    service: str
    client: str
    message_id: str
    body: bytes
    content_type: str = "application/json"
    target: str | None = None
    user: str | None = None
    issue: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    timeout_s: float = 10.0
    # True when the exchange is delivered from the outbox (asynchronous mode).
    asynchronous: bool = False
    # Extra protocol headers to forward (for example Gw-Via on a relayed message).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What the far side answered: a status, a JSON body and its headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    healthy: bool
    detail: str = ""


class Signer(Protocol):
    """Signs an outbound request with the gateway's key (RFC 9421 + RFC 9530)."""

    kid: str

    def sign_request(
        self, method: str, url: str, headers: CIMultiDict[str], body: bytes
    ) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterContext:
    """What the core lends an adapter: identity, signer, the shared HTTP pool.

    ``session`` is the one to use. For an adapter whose URLs were learnt from the
    federation directory the core passes its guarded session there instead (addresses
    checked against the outbound policy at connect time, ``gateway/config/outbound.py``);
    ``learnt_session`` is that guarded session, which the core swaps in."""

    member_id: str
    signer: Signer
    session: aiohttp.ClientSession
    base_dir: str = "."
    learnt_session: aiohttp.ClientSession | None = None


@runtime_checkable
class Adapter(Protocol):
    name: str

    async def send(self, exchange: Exchange) -> Answer: ...

    async def health(self) -> Health: ...

    async def aclose(self) -> None: ...


def receiver_of(adapter: object) -> str | None:
    """The member id an adapter delivers to (its optional ``receiver``), or None."""
    value = getattr(adapter, "receiver", None)
    return value if isinstance(value, str) and value else None


class AdapterType(Protocol):
    """The class an entry point names."""

    config_schema: ClassVar[Mapping[str, Any]]

    def __call__(
        self, name: str, config: Mapping[str, Any], context: AdapterContext
    ) -> Adapter: ...
