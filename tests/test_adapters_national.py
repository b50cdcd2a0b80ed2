"""``national_platform``: the platform's envelope, acknowledgements and refusals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from adapters.base import AdapterContext, Exchange
from adapters.national import NationalPlatformAdapter
from gateway.errors import UpstreamError
from gateway.signing import Signer
from simulators.national import NationalPlatform, create_national_app
from tests.conftest import APPLY_EXAMPLE, CREDIT_EXAMPLE, GATEWAY_ID, NATIONAL_ID, PORTAL_ID, Keys


@dataclass
class Platform:
    sim: NationalPlatform
    adapter: NationalPlatformAdapter


@pytest.fixture
async def platform(keys: Keys) -> AsyncIterator[Platform]:
    sim = NationalPlatform(
        member_id=NATIONAL_ID,
        keypair=keys.pairs["national"],
        trusted=keys.verification("gateway"),
        callback_base="http://127.0.0.1:9",
        callback_delay_s=3600,
    )
    server = TestServer(create_national_app(sim))
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        context = AdapterContext(
            member_id=GATEWAY_ID, signer=Signer(keys.pairs["gateway"]), session=session
        )
        config = {
            "base_url": str(server.make_url("")).rstrip("/"),
            "platform_keys": [keys.jwk_file("national")],
        }
        yield Platform(sim, NationalPlatformAdapter("national", config, context))
    await server.close()


def _exchange(service: str, document: object) -> Exchange:
    return Exchange(
        service=service,
        client=PORTAL_ID,
        message_id="6f1c2c1e-4b8a-4f7e-9a51-0c6d2b1e7a10",
        body=json.dumps(document).encode(),
    )


async def test_sync_result_is_unwrapped_from_the_envelope(platform: Platform) -> None:
    """Code "0" with data: the data is the answer, signed by the platform and checked."""
    answer = await platform.adapter.send(_exchange("credit.query", CREDIT_EXAMPLE))
    assert answer.status == 200
    assert json.loads(answer.body)["uscc"] == CREDIT_EXAMPLE["uscc"]
    assert platform.sim.received == ["6f1c2c1e-4b8a-4f7e-9a51-0c6d2b1e7a10"]


async def test_ticket_is_an_acknowledgement(platform: Platform) -> None:
    """Code "0" with a ticket and no data becomes a 202: the decision comes by callback."""
    answer = await platform.adapter.send(_exchange("crossregion.apply", APPLY_EXAMPLE))
    assert answer.status == 202
    assert json.loads(answer.body)["ticket"].startswith("NP-")
    assert platform.sim.relays["6f1c2c1e-4b8a-4f7e-9a51-0c6d2b1e7a10"][0] == "crossregion.apply"


async def test_platform_refusal_is_an_upstream_error(platform: Platform) -> None:
    """A non-zero code (here: no such service) is reported as the platform's refusal."""
    with pytest.raises(UpstreamError, match="E404"):
        await platform.adapter.send(_exchange("unknown.service", {}))


async def test_platform_failure_is_an_upstream_error(platform: Platform) -> None:
    """A platform answering 500 is an upstream error, not a result."""
    platform.sim.mode = "error"
    with pytest.raises(UpstreamError, match="500"):
        await platform.adapter.send(_exchange("credit.query", CREDIT_EXAMPLE))


async def test_envelope_names_the_source_gateway_and_client(platform: Platform) -> None:
    """The request body is the platform's envelope around our document."""
    body = json.loads(platform.adapter.encode(_exchange("credit.query", CREDIT_EXAMPLE)))
    assert body["source_gateway"] == GATEWAY_ID
    assert body["client"] == PORTAL_ID
    assert body["payload"] == CREDIT_EXAMPLE
