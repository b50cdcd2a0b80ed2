"""Adapter dispatch (gateway/exchange/dispatch.py): a stored message to an adapter and back."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import pytest

from adapters.base import Answer, Exchange, Health
from gateway.config.model import AdapterConfig, RouteConfig, ServiceConfig
from gateway.errors import AdapterUnavailable, UpstreamError
from gateway.exchange.dispatch import call_adapter, exchange_of, validate_answer
from gateway.runtime.breaker import BreakerState
from gateway.runtime.registry import AdapterSlot, Runtime, Service
from gateway.runtime.routing import RouteTable
from gateway.states import MessageState
from gateway.store import MessageRecord
from gateway.validation import DocumentValidator
from tests.conftest import PORTAL_ID

RESPONSE_SCHEMA: Mapping[str, Any] = {"type": "object", "required": ["ok"]}


class Scripted:
    """A real adapter whose answers the test chooses (the interface is the boundary)."""

    def __init__(self, *answers: Answer | Exception) -> None:
        self.name = "scripted"
        self.answers = list(answers)
        self.sent: list[Exchange] = []

    async def send(self, exchange: Exchange) -> Answer:
        self.sent.append(exchange)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def health(self) -> Health:
        return Health(healthy=True)

    async def aclose(self) -> None:
        pass


def _service(mode: str = "sync") -> Service:
    cfg = ServiceConfig(
        code="credit.query",
        mode="async" if mode == "async" else "sync",
        request_schema=True,
        response_schema=RESPONSE_SCHEMA,
        timeout_s=2.0,
    )
    return Service(
        config=cfg,
        request=DocumentValidator(True),
        response=DocumentValidator(RESPONSE_SCHEMA),
        callback=None,
    )


def _runtime(adapter: Scripted, *, enabled: bool = True, learnt: bool = False) -> Runtime:
    service = _service()
    slot = AdapterSlot(
        config=AdapterConfig(
            name="up", type="scripted", enabled=enabled, failure_threshold=2, learnt=learnt
        ),
        adapter=adapter,
    )
    return Runtime(
        members={},
        services={service.code: service},
        routes=RouteTable((RouteConfig(service=service.code, adapter="up"),)),
        adapters={"up": slot},
        region="330000",
    )


def _record(**changes: Any) -> MessageRecord:
    now = time.time()
    fields: dict[str, Any] = {
        "seq": 1,
        "message_id": "0b9d3c1e-3f7a-4d2b-9a55-4c1d7e2f8a10",
        "client": PORTAL_ID,
        "service": "credit.query",
        "mode": "sync",
        "state": MessageState.DELIVERING,
        "request_headers": {"GW-USER": "u-1", "gw-issue": "I-7"},
        "request_body": b'{"q": 1}',
        "request_digest": "",
        "target": None,
        "adapter": None,
        "status": None,
        "code": None,
        "response_headers": {},
        "response_body": None,
        "result": None,
        "error": None,
        "attempts": 0,
        "next_attempt_at": None,
        "created_at": now,
        "updated_at": now,
    }
    fields.update(changes)
    return MessageRecord(**fields)


def test_exchange_of_reads_protocol_headers_whatever_their_case() -> None:
    """Gw-User and Gw-Issue come from the stored headers case-insensitively; mode sets async."""
    traceparent = f"00-{'1' * 32}-{'2' * 16}-01"
    exchange = exchange_of(_record(mode="async"), _service(), traceparent)
    assert (exchange.user, exchange.issue, exchange.asynchronous) == ("u-1", "I-7", True)
    assert exchange.body == b'{"q": 1}'
    assert exchange.timeout_s == 2.0
    assert exchange.traceparent == traceparent


async def test_an_adapter_crash_is_an_upstream_error_and_counts_against_its_breaker() -> None:
    """A foreign exception becomes upstream_error; two in a row open the breaker."""
    adapter = Scripted(RuntimeError("boom"), RuntimeError("boom"))
    runtime = _runtime(adapter)
    exchange = exchange_of(_record(), _service(), "")
    for _ in range(2):
        with pytest.raises(UpstreamError, match="the adapter failed"):
            await call_adapter(runtime, _service(), exchange)
    assert runtime.adapters["up"].breaker.state is BreakerState.OPEN
    with pytest.raises(AdapterUnavailable):
        await call_adapter(runtime, _service(), exchange)
    assert len(adapter.sent) == 2  # the open breaker kept the third call from the adapter


async def test_a_disabled_adapter_is_unavailable_and_never_called() -> None:
    """An adapter switched off answers adapter_unavailable without being sent anything."""
    adapter = Scripted(Answer(status=200, body=b"{}"))
    with pytest.raises(AdapterUnavailable, match="disabled"):
        await call_adapter(
            _runtime(adapter, enabled=False), _service(), exchange_of(_record(), _service(), "")
        )
    assert adapter.sent == []


async def test_a_good_answer_comes_back_with_the_adapters_name() -> None:
    """A routed, answered exchange returns (adapter name, answer) and closes the breaker."""
    answer = Answer(status=200, body=json.dumps({"ok": True}).encode())
    runtime = _runtime(Scripted(answer))
    name, got = await call_adapter(runtime, _service(), exchange_of(_record(), _service(), ""))
    assert (name, got) == ("up", answer)
    validate_answer(_service(), got)


@pytest.mark.parametrize(
    ("body", "detail"),
    [(b"<html>", "is not JSON"), (b'{"no": 1}', "violates the response schema at /")],
)
def test_an_answer_that_is_not_json_or_breaks_the_schema_is_an_upstream_error(
    body: bytes, detail: str
) -> None:
    """validate_answer refuses non-JSON and schema violations as upstream_error."""
    with pytest.raises(UpstreamError, match=detail):
        validate_answer(_service(), Answer(status=200, body=body))


@pytest.mark.parametrize("target", ["330000:registry", "330100:tax-bureau", "330102:office"])
async def test_a_learnt_catch_all_never_takes_a_target_in_the_own_region(target: str) -> None:
    """A route the directory added (learnt adapter) does not serve Gw-Target in this
    gateway's region or its sub-regions: no route, and the adapter is never called."""
    adapter = Scripted(Answer(status=200, content_type="application/json", body=b'{"ok": 1}'))
    with pytest.raises(AdapterUnavailable, match="no route"):
        await call_adapter(
            _runtime(adapter, learnt=True), _service(),
            exchange_of(_record(target=target), _service(), ""),
        )  # fmt: skip
    assert adapter.sent == []


async def test_a_learnt_catch_all_takes_other_regions_and_no_target() -> None:
    """The same route serves another region's target and a request without one."""
    for target in ("440000:gateway", None):
        ok = Answer(status=200, content_type="application/json", body=b'{"ok": 1}')
        adapter = Scripted(ok)
        name, _ = await call_adapter(
            _runtime(adapter, learnt=True), _service(),
            exchange_of(_record(target=target), _service(), ""),
        )  # fmt: skip
        assert (name, len(adapter.sent)) == ("up", 1)
