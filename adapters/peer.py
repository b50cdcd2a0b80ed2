"""``peer_gateway``: federation with another province's gateway.

The peer's ingress takes our request as a member's (``POST /v1/exchange/{service}``),
signed by this gateway's key, with the original ``Gw-Client`` and us appended to the
``Gw-Via`` chain; the peer accepts it only for members of the regions it granted us,
never for its own region. Its answer must be signed by the peer and bound to our
request (``"signature";req`` or our ``gw-message-id``, as every signed answer:
``adapters/http.py``), which proves the answer belongs to this question. A ``202``
means the peer will call
back on our ``/v1/callbacks/{service}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.base import AdapterContext
from adapters.http import BASE_URL_PATTERN, HttpAdapter
from gateway.config.model import MEMBER_ID_PATTERN
from gateway.config.outbound import join

__all__ = ["PeerGatewayAdapter"]


class PeerGatewayAdapter(HttpAdapter):
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["url", "peer_id", "peer_keys"],
        "properties": {
            "url": {
                "type": "string",
                "pattern": BASE_URL_PATTERN,
                "description": "the peer's ingress (no query or fragment: paths are joined on)",
            },
            "peer_id": {"type": "string", "pattern": MEMBER_ID_PATTERN},
            "peer_keys": {
                "type": "array",
                "minItems": 1,
                "items": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            },
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "content_digest": {
                "enum": ["sha-256", "sha-512", "sm3"],
                "description": "Content-Digest algorithm of outbound requests (default: sm3 "
                "when the gateway's key is SM2, else sha-256).",
            },
            "forward_user": {"type": "boolean"},
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        base = str(config["url"])
        http_config = self.derived_config(
            config,
            url=join(base, "v1", "exchange") + "/{service}",
            health_url=join(base, "healthz"),
            keys=list(config["peer_keys"]),
        )
        super().__init__(name, http_config, context)
        self.peer_id = str(config["peer_id"])
        self.receiver = self.peer_id  # its callbacks are the ones taken for what it was sent
