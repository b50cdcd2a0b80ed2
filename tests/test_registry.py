"""Adapter discovery through entry points, adapter config checks, and the runtime state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adapters.base import Adapter, AdapterContext
from adapters.http import HttpAdapter
from adapters.mock import MockAdapter
from gateway.config.model import AdapterConfig, parse_config
from gateway.errors import ConfigError
from gateway.runtime.breaker import BreakerState
from gateway.runtime.registry import (
    AdapterSlot,
    adapter_types,
    build_adapter,
    build_runtime,
    check_adapter_config,
)
from tests.conftest import PEER_ID, PORTAL_ID, Keys, config_document


def test_entry_points_find_http_and_mock() -> None:
    """The installed package registers both built-in adapter types by name."""
    types = adapter_types()
    assert types["http"] is HttpAdapter
    assert types["mock"] is MockAdapter
    assert adapter_types(refresh=True).keys() == types.keys()


def test_valid_adapter_configs_have_no_problems() -> None:
    """Well-formed http and mock configs pass their type's schema."""
    http = {
        "url": "http://127.0.0.1:9000/api/{service}",
        "timeout_s": 5,
        "verify_response": {"keys": ["keys/national.jwk.json"]},
    }
    assert check_adapter_config("http", http, "/adapters/0") == []
    mock = {"responses": {"default": {"status": 200, "body": {"ok": True}}}, "delay_s": 0}
    assert check_adapter_config("mock", mock, "/adapters/1") == []


def test_bad_http_config_gives_located_problems() -> None:
    """Each violation of the http schema is located under /adapters/i/config."""
    problems = check_adapter_config(
        "http", {"url": "ftp://national", "timeout_s": 0, "retries": 3}, "/adapters/2"
    )
    assert len(problems) == 3
    assert sum(p.startswith("/adapters/2/config/url: ") for p in problems) == 1
    assert sum(p.startswith("/adapters/2/config/timeout_s: ") for p in problems) == 1
    assert any(p.startswith("/adapters/2/config: ") and "'retries'" in p for p in problems)


def test_missing_and_nested_problems_are_located() -> None:
    """A missing required key is at the config; a nested one at its full path."""
    assert check_adapter_config("http", {}, "/adapters/0") == [
        "/adapters/0/config: 'url' is a required property"
    ]
    problems = check_adapter_config(
        "mock", {"responses": {"credit.query": {"status": 99}}}, "/adapters/1"
    )
    assert sorted(problems) == [
        "/adapters/1/config/responses/credit.query/status: 99 is less than the minimum of 200",
        "/adapters/1/config/responses/credit.query: 'body' is a required property",
    ]


def test_unknown_adapter_type_is_located_at_type() -> None:
    """An uninstalled type is one problem at /type that lists what is installed."""
    (problem,) = check_adapter_config("soap", {}, "/adapters/3")
    assert problem.startswith("/adapters/3/type: unknown adapter type soap (installed: ")
    assert "'http'" in problem
    assert "'mock'" in problem


async def test_build_adapter_instantiates_the_named_type(context: AdapterContext) -> None:
    """build_adapter returns an instance of the entry point's class that meets the protocol."""
    cfg = AdapterConfig(
        name="canned", type="mock", config={"responses": {"default": {"body": {"ok": 1}}}}
    )
    adapter = build_adapter(cfg, context)
    assert isinstance(adapter, MockAdapter)
    assert isinstance(adapter, Adapter)
    assert adapter.name == "canned"
    assert (await adapter.health()).healthy


async def test_build_adapter_refuses_a_bad_config(context: AdapterContext) -> None:
    """A config failing its type's schema raises ConfigError instead of building."""
    cfg = AdapterConfig(name="upstream", type="http", config={"url": "mailto:x"})
    with pytest.raises(ConfigError) as caught:
        build_adapter(cfg, context)
    assert len(caught.value.problems) == 1
    assert "/config/url: " in caught.value.problems[0]


async def test_adapter_slot_breaker_follows_the_adapter_config(context: AdapterContext) -> None:
    """Each slot gets its own breaker, set from the adapter's threshold and timeout."""
    cfg = AdapterConfig(name="n", type="mock", failure_threshold=2, reset_timeout_s=1.5)
    one = AdapterSlot(config=cfg, adapter=build_adapter(cfg, context))
    two = AdapterSlot(config=cfg, adapter=one.adapter)
    assert (one.breaker.failure_threshold, one.breaker.reset_timeout_s) == (2, 1.5)
    one.breaker.record_failure()
    one.breaker.record_failure()
    assert one.breaker.state is BreakerState.OPEN
    assert two.breaker.state is BreakerState.CLOSED


async def test_build_runtime_compiles_members_services_and_routes(
    keys: Keys, tmp_path: Path, context: AdapterContext
) -> None:
    """The runtime indexes members by id with keys by kid, compiles schemas, routes services."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    config = parse_config(doc, base=tmp_path)
    adapter = build_adapter(AdapterConfig(name="national", type="mock"), context)
    slots = {"national": AdapterSlot(config=config.adapters[0], adapter=adapter)}
    runtime = build_runtime(config, slots)
    portal = runtime.members[PORTAL_ID]
    assert portal.id == PORTAL_ID
    assert set(portal.keys) == {keys.pairs["portal"].kid}
    assert portal.keys[keys.pairs["portal"].kid].algorithm == "ed25519"
    assert set(runtime.services) == {"credit.query", "crossregion.apply"}
    credit = runtime.services["credit.query"]
    assert credit.code == "credit.query"
    assert credit.request.errors({}) != []
    assert runtime.services["crossregion.apply"].callback is not None
    assert runtime.routes.lookup("credit.query", PEER_ID) == "national"
    assert runtime.adapters["national"].adapter is adapter


async def test_rebuild_reuses_unchanged_services(
    keys: Keys, tmp_path: Path, context: AdapterContext
) -> None:
    """A rebuilt runtime keeps the compiled service that did not change, recompiles the other."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    config = parse_config(doc, base=tmp_path)
    first = build_runtime(config, {})
    changed = dataclasses.replace(
        config,
        services=(
            config.services[0],
            dataclasses.replace(config.services[1], timeout_s=7),
        ),
    )
    second = build_runtime(changed, {}, previous=first)
    assert second.services["credit.query"] is first.services["credit.query"]
    assert second.services["crossregion.apply"] is not first.services["crossregion.apply"]
    assert second.services["crossregion.apply"].config.timeout_s == 7
