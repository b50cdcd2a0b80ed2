"""``mock``: canned answers from config, for tests, demos and services still being built."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.base import AdapterContext, Answer, Exchange, Health
from gateway.config.model import MEMBER_ID_PATTERN
from gateway.errors import UpstreamError

__all__ = ["MockAdapter"]


class MockAdapter:
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "responses": {
                "type": "object",
                "description": "Answer per service code; 'default' answers the rest.",
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["body"],
                    "properties": {
                        "status": {"type": "integer", "minimum": 200, "maximum": 599},
                        "body": {},
                    },
                },
            },
            "delay_s": {"type": "number", "minimum": 0, "maximum": 60},
            "receiver": {
                "type": "string",
                "pattern": MEMBER_ID_PATTERN,
                "description": "The member this upstream is: the one party whose callbacks "
                "are taken for what it was sent (none: nobody calls back).",
            },
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        self.name = name
        self._delay = float(config.get("delay_s", 0))
        self._answers: dict[str, tuple[int, bytes]] = {
            code: (int(spec.get("status", 200)), json.dumps(spec["body"]).encode())
            for code, spec in config.get("responses", {}).items()
        }
        self.receiver: str | None = config.get("receiver")
        self.sent: list[Exchange] = []  # what reached this adapter, for tests and demos

    async def send(self, exchange: Exchange) -> Answer:
        self.sent.append(exchange)
        if self._delay:
            await asyncio.sleep(self._delay)
        answer = self._answers.get(exchange.service) or self._answers.get("default")
        if answer is None:
            raise UpstreamError(f"{self.name}: no canned answer for {exchange.service}")
        status, body = answer
        if status >= 300:
            raise UpstreamError(f"{self.name}: canned answer {status}")
        return Answer(status=status, body=body)

    async def health(self) -> Health:
        return Health(healthy=True, detail="canned answers")

    async def aclose(self) -> None:
        self.sent.clear()
