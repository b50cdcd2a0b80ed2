"""An external adapter type: answers every exchange with the document it was sent."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.base import AdapterContext, Answer, Exchange, Health


class EchoAdapter:
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["greeting"],
        "properties": {"greeting": {"type": "string", "minLength": 1}},
    }

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        self.name = name
        self.greeting = str(config["greeting"])
        self.calls = 0

    async def send(self, exchange: Exchange) -> Answer:
        self.calls += 1
        body = {
            "greeting": self.greeting,
            "adapter": self.name,
            "echo": json.loads(exchange.body),
            "client": exchange.client,
        }
        return Answer(status=200, body=json.dumps(body, ensure_ascii=False).encode())

    async def health(self) -> Health:
        return Health(healthy=True, detail=f"{self.calls} calls")

    async def aclose(self) -> None:
        self.calls = 0
