"""``national_platform``: our exchange mapped onto the national platform's exchange API.

The national government service platform speaks its own envelope (the simulator in
``simulators/national.py`` implements it): a request is
``{"service", "message_id", "client", "source_gateway", "target", "payload"}`` posted to
``{base_url}/api/v1/exchange``, signed by this gateway, and every answer is HTTP 200
with ``{"code", "message", "data"?, "ticket"?}``: code ``"0"`` with a ``ticket`` is an
acknowledgement (the decision follows by callback to ``/v1/callbacks/{service}``),
code ``"0"`` with ``data`` is the result, any other code is the platform refusing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from multidict import CIMultiDict

from adapters.base import AdapterContext, Answer, Exchange
from adapters.http import BASE_URL_PATTERN, HttpAdapter
from gateway.config.model import MEMBER_ID_PATTERN
from gateway.config.outbound import join
from gateway.errors import UpstreamError

__all__ = ["NATIONAL_PLATFORM", "NationalPlatformAdapter"]

NATIONAL_PLATFORM = "100000:national-platform"  # the member id of the national level


class NationalPlatformAdapter(HttpAdapter):
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["base_url", "platform_keys"],
        "properties": {
            "base_url": {"type": "string", "pattern": BASE_URL_PATTERN},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "platform_keys": {
                "type": "array",
                "minItems": 1,
                "description": "The platform's public JWKs (inline or file paths): its answers "
                "must be signed by one of them.",
                "items": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            },
            "content_digest": {
                "enum": ["sha-256", "sha-512", "sm3"],
                "description": "Content-Digest algorithm of outbound requests (default: sm3 "
                "when the gateway's key is SM2, else sha-256).",
            },
            "forward_user": {"type": "boolean"},
            "receiver": {
                "type": "string",
                "pattern": MEMBER_ID_PATTERN,
                "default": NATIONAL_PLATFORM,
                "description": "The platform's member id: its callbacks are the ones taken "
                "for what this adapter delivered.",
            },
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        base = str(config["base_url"])
        http_config = self.derived_config(
            config,
            url=join(base, "api", "v1", "exchange"),
            health_url=join(base, "health"),
            keys=list(config["platform_keys"]),
        )
        super().__init__(name, http_config, context)
        self._member_id = context.member_id
        self.receiver = str(config.get("receiver", NATIONAL_PLATFORM))

    def encode(self, exchange: Exchange) -> bytes:
        envelope = {
            "service": exchange.service,
            "message_id": exchange.message_id,
            "client": exchange.client,
            "source_gateway": self._member_id,
            "target": exchange.target,
            "payload": json.loads(exchange.body),
        }
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()

    def decode(self, status: int, headers: CIMultiDict[str], body: bytes) -> Answer:
        try:
            reply = json.loads(body)
            code = str(reply["code"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"{self.name}: the platform's answer is not its envelope") from exc
        if code != "0":
            raise UpstreamError(
                f"{self.name}: the platform refused: {code} {reply.get('message', '')}"
            )
        if reply.get("ticket") and reply.get("data") is None:
            ack = {"accepted": True, "ticket": str(reply["ticket"])}
            return Answer(status=202, body=json.dumps(ack).encode())
        data = json.dumps(reply.get("data"), ensure_ascii=False).encode()
        return Answer(status=200, body=data)
