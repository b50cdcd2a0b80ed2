"""The route table: exact (service, target) routes first, then the service's catch-all."""

from __future__ import annotations

from pathlib import Path

from gateway.config.model import RouteConfig, parse_config
from gateway.runtime.routing import RouteTable
from tests.conftest import PEER_ID, TAX_ID, Keys, config_document

ROUTES = [
    RouteConfig(service="credit.query", adapter="national"),
    RouteConfig(service="credit.query", adapter="peer", target=PEER_ID),
    RouteConfig(service="crossregion.apply", adapter="peer", target=PEER_ID),
]


def test_catch_all_route_serves_a_request_without_target() -> None:
    """With no Gw-Target the service's catch-all adapter is chosen."""
    assert RouteTable(ROUTES).lookup("credit.query", None) == "national"


def test_exact_target_route_wins_over_the_catch_all() -> None:
    """A route for the exact target is preferred to the catch-all."""
    assert RouteTable(ROUTES).lookup("credit.query", PEER_ID) == "peer"


def test_unrouted_target_falls_back_to_the_catch_all() -> None:
    """A target without its own route uses the service's catch-all route."""
    assert RouteTable(ROUTES).lookup("credit.query", TAX_ID) == "national"


def test_no_route_gives_none() -> None:
    """An unknown service, or a target-only service asked without that target, has no route."""
    table = RouteTable(ROUTES)
    assert table.lookup("ghost.service", None) is None
    assert table.lookup("crossregion.apply", None) is None
    assert table.lookup("crossregion.apply", TAX_ID) is None
    assert table.lookup("crossregion.apply", PEER_ID) == "peer"


def test_routes_round_trip() -> None:
    """routes() gives back the configured routes."""
    assert sorted(RouteTable(ROUTES).routes(), key=repr) == sorted(ROUTES, key=repr)


def test_table_from_parsed_config(keys: Keys, tmp_path: Path) -> None:
    """The table built from the test config routes both services to the national adapter."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    table = RouteTable(parse_config(doc, base=tmp_path).routes)
    assert table.lookup("credit.query", None) == "national"
    assert table.lookup("crossregion.apply", PEER_ID) == "national"
    assert RouteTable([]).lookup("credit.query", None) is None
