"""Adapter discovery and the live runtime state (members, services, routes, adapters).

The pipeline reads one immutable ``Runtime`` per request. A change builds a new
``Runtime`` beside the old one and swaps it in one assignment, so in-flight exchanges
finish on the state they started with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from adapters.base import Adapter, AdapterContext
from gateway.config.model import AdapterConfig, Config, MemberConfig, ServiceConfig
from gateway.config.plugins import adapter_types
from gateway.crypto.keys import VerificationKey
from gateway.errors import ConfigError
from gateway.runtime.breaker import CircuitBreaker
from gateway.runtime.routing import RouteTable
from gateway.validation import DocumentValidator

__all__ = [
    "AdapterSlot",
    "Member",
    "Runtime",
    "RuntimeHolder",
    "Service",
    "adapter_types",
    "build_adapter",
    "build_runtime",
    "check_adapter_config",
]

log = logging.getLogger(__name__)


def check_adapter_config(type_name: str, config: Mapping[str, Any], where: str) -> list[str]:
    """Problems with one adapter's config block against its type's JSON Schema."""
    types = adapter_types()
    if type_name not in types:
        return [f"{where}/type: unknown adapter type {type_name} (installed: {sorted(types)})"]
    validator = jsonschema.Draft202012Validator(types[type_name].config_schema)
    return [
        f"{where}/config{''.join('/' + str(p) for p in err.absolute_path)}: {err.message}"
        for err in validator.iter_errors(dict(config))
    ]


def build_adapter(cfg: AdapterConfig, context: AdapterContext) -> Adapter:
    """Construct one adapter; a ``learnt`` one talks only through the guarded session."""
    problems = check_adapter_config(cfg.type, cfg.config, f"/adapters/{cfg.name}")
    if problems:
        raise ConfigError(problems)
    if cfg.learnt:
        if context.learnt_session is None:
            raise ConfigError([f"/adapters/{cfg.name}: learnt URLs need the guarded session"])
        context = dataclasses.replace(context, session=context.learnt_session)
    return adapter_types()[cfg.type](cfg.name, cfg.config, context)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    config: MemberConfig
    keys: Mapping[str, VerificationKey]

    @property
    def id(self) -> str:
        return self.config.id


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    config: ServiceConfig
    request: DocumentValidator
    response: DocumentValidator
    callback: DocumentValidator | None

    @property
    def code(self) -> str:
        return self.config.code


@dataclass(slots=True, kw_only=True)
class AdapterSlot:
    """An adapter instance with its limits and its circuit breaker."""

    config: AdapterConfig
    adapter: Adapter
    breaker: CircuitBreaker = field(init=False)

    def __post_init__(self) -> None:
        self.breaker = CircuitBreaker(
            failure_threshold=self.config.failure_threshold,
            reset_timeout_s=self.config.reset_timeout_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    members: Mapping[str, Member]
    services: Mapping[str, Service]
    routes: RouteTable
    adapters: Mapping[str, AdapterSlot]
    # Members (by id) and adapters (by name) refused for now, with why: the directory
    # that defines them is past its max_stale_s (gateway/federation/follower.py).
    refused: Mapping[str, str] = field(default_factory=dict)
    # This gateway's region: what is learnt from the directory never serves targets in it.
    region: str = ""


class RuntimeHolder:
    """Holds the current ``Runtime``; a swap is one assignment (atomic for readers)."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


def _service(cfg: ServiceConfig, max_errors: int) -> Service:
    return Service(
        config=cfg,
        request=DocumentValidator(cfg.request_schema, max_errors=max_errors),
        response=DocumentValidator(cfg.response_schema, max_errors=max_errors),
        callback=(
            DocumentValidator(cfg.callback_schema, max_errors=max_errors)
            if cfg.callback_schema is not None
            else None
        ),
    )


def build_runtime(
    config: Config,
    adapters: Mapping[str, AdapterSlot],
    *,
    previous: Runtime | None = None,
) -> Runtime:
    """Compile schemas and keys once; reuse compiled services that did not change."""
    max_errors = config.security.max_field_errors
    old = previous.services if previous is not None else {}
    services = {
        s.code: old[s.code]
        if s.code in old and old[s.code].config == s
        else _service(s, max_errors)
        for s in config.services
    }
    members = {
        m.id: Member(
            config=m, keys={k.kid: k for k in (VerificationKey.from_jwk(j) for j in m.keys)}
        )
        for m in config.members
    }
    return Runtime(
        members=members,
        services=services,
        routes=RouteTable(config.routes),
        adapters=dict(adapters),
        region=config.gateway.region,
    )
