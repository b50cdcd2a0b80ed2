"""The mock adapter: canned answers per service, a default, delays and failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.base import Adapter, AdapterContext, Exchange
from adapters.mock import MockAdapter
from gateway.errors import UpstreamError
from gateway.runtime.registry import check_adapter_config
from gateway.signing import Signer
from tests.conftest import GATEWAY_ID, PORTAL_ID, Keys

RESPONSES: dict[str, Any] = {
    "credit.query": {"body": {"credit_rating": "B", "name": "测试企业"}},
    "crossregion.apply": {"status": 202, "body": {"accepted": True}},
    "broken.service": {"status": 503, "body": {"detail": "down"}},
}


@pytest.fixture
async def context(keys: Keys) -> AsyncIterator[AdapterContext]:
    async with aiohttp.ClientSession() as session:
        yield AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )


def _exchange(service: str) -> Exchange:
    return Exchange(service=service, client=PORTAL_ID, message_id="m-1", body=b"{}")


def test_config_schema_accepts_the_documented_shape() -> None:
    """The example config passes the adapter's own schema; a bad status does not."""
    assert check_adapter_config("mock", {"responses": RESPONSES, "delay_s": 0.5}, "/a") == []
    bad = {"responses": {"x.y": {"status": 700, "body": 1}}, "delay_s": -1}
    assert len(check_adapter_config("mock", bad, "/a")) == 2


async def test_canned_answer_per_service(context: AdapterContext) -> None:
    """Each service gets its own canned status and JSON body."""
    adapter = MockAdapter("canned", {"responses": RESPONSES}, context)
    assert isinstance(adapter, Adapter)
    credit = await adapter.send(_exchange("credit.query"))
    assert credit.status == 200
    assert json.loads(credit.body) == {"credit_rating": "B", "name": "测试企业"}
    assert credit.content_type == "application/json"
    apply = await adapter.send(_exchange("crossregion.apply"))
    assert (apply.status, json.loads(apply.body)) == (202, {"accepted": True})


async def test_default_answers_other_services(context: AdapterContext) -> None:
    """A 'default' entry answers services without their own entry."""
    config = {"responses": {**RESPONSES, "default": {"body": {"fallback": True}}}}
    adapter = MockAdapter("canned", config, context)
    answer = await adapter.send(_exchange("other.service"))
    assert json.loads(answer.body) == {"fallback": True}
    assert json.loads((await adapter.send(_exchange("credit.query"))).body)["credit_rating"] == "B"


async def test_no_canned_answer_is_an_upstream_error(context: AdapterContext) -> None:
    """Without an entry or a default the adapter raises UpstreamError naming the service."""
    adapter = MockAdapter("canned", {"responses": RESPONSES}, context)
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange("other.service"))
    assert caught.value.detail == "canned: no canned answer for other.service"


async def test_canned_error_status_is_an_upstream_error(context: AdapterContext) -> None:
    """A canned status of 300 or more raises UpstreamError like a failing upstream."""
    adapter = MockAdapter("canned", {"responses": RESPONSES}, context)
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(_exchange("broken.service"))
    assert caught.value.detail == "canned: canned answer 503"


async def test_sent_records_exchanges_and_aclose_clears_them(context: AdapterContext) -> None:
    """Every exchange that reached the adapter is recorded, failures too, until aclose."""
    adapter = MockAdapter("canned", {"responses": RESPONSES}, context)
    first, second = _exchange("credit.query"), _exchange("broken.service")
    await adapter.send(first)
    with pytest.raises(UpstreamError):
        await adapter.send(second)
    assert adapter.sent == [first, second]
    await adapter.aclose()
    assert adapter.sent == []


async def test_delay_holds_the_answer(context: AdapterContext) -> None:
    """delay_s makes the answer wait at least that long."""
    adapter = MockAdapter("canned", {"responses": RESPONSES, "delay_s": 0.1}, context)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await adapter.send(_exchange("credit.query"))
    assert loop.time() - started >= 0.09


async def test_empty_config_answers_nothing_and_is_healthy(context: AdapterContext) -> None:
    """With no responses at all every send fails, but the adapter reports healthy."""
    adapter = MockAdapter("empty", {}, context)
    with pytest.raises(UpstreamError):
        await adapter.send(_exchange("credit.query"))
    health = await adapter.health()
    assert (health.healthy, health.detail) == (True, "canned answers")
