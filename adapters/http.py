"""``http``: JSON over HTTP to any upstream, signed with the gateway's key.

The request body is forwarded byte for byte; the protocol headers travel with it
(``Gw-Client``, ``Gw-Message-Id``, ``Gw-Issue``, ``traceparent`` …) plus ``Gw-Via``, the
relay chain the message came through with this gateway appended (oldest first).
When ``verify_response`` names the upstream's keys, its answer must carry an RFC 9421
signature over ``@status``, ``content-digest`` and ``content-type`` by one of them, bound
to our request: it covers the request's own signature (``"signature";req``) or its
message id (``gw-message-id``, equal to ours, or ``"gw-message-id";req``). An answer
that is not bound could be any other request's answer, replayed: ``upstream_unbound``.
Redirects are never followed (a 3xx is an upstream error naming its ``Location``).
With ``tls`` it presents a client certificate and trusts only ``ca`` for the upstream, or
pins the upstream's certificate by its SHA-256 fingerprint (``server_fingerprint``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from adapters.base import AdapterContext, Answer, Exchange, Health
from gateway.config.model import MEMBER_ID_PATTERN
from gateway.config.outbound import bound_to, client_context, location_of
from gateway.crypto.keys import VerificationKey
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnbound
from gateway.signing import (
    RequestView,
    ResponseView,
    Verifier,
    check_content_digest,
    content_digest,
)
from gateway.signing import parse_signature_input as parse_sig

__all__ = ["BASE_URL_PATTERN", "HttpAdapter"]

# A base URL that paths are joined onto: no query, no fragment (a "?" would move them).
BASE_URL_PATTERN = r"^https?://[^?#]+$"
_FORWARDED = ("Gw-Target", "Gw-User", "Gw-Issue", "Gw-Correlation-Id", "traceparent", "tracestate")


class HttpAdapter:
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["url"],
        "properties": {
            "url": {
                "type": "string",
                "pattern": "^https?://",
                "description": "Upstream URL; {service} is replaced by the service code.",
            },
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "health_url": {"type": "string", "pattern": "^https?://"},
            "headers": {
                "type": "object",
                "description": "Extra request headers; their values are secrets (write-only: "
                "views show that each is set and its fingerprint).",
                "additionalProperties": {"type": "string", "writeOnly": True},
            },
            "content_digest": {
                "enum": ["sha-256", "sha-512", "sm3"],
                "description": "Content-Digest algorithm of outbound requests (default: sm3 "
                "when the gateway's key is SM2, else sha-256).",
            },
            "forward_user": {"type": "boolean", "default": True},
            "receiver": {
                "type": "string",
                "pattern": MEMBER_ID_PATTERN,
                "description": "The member this upstream is: the one party whose callbacks "
                "are taken for what it was sent (none: nobody calls back).",
            },
            "tls": {
                "type": "object",
                "additionalProperties": False,
                "description": "HTTPS to a local back office: a client certificate, and the "
                "upstream's CA or its pinned certificate (paths relative to the config file).",
                "properties": {
                    "cert": {"type": "string", "minLength": 1, "description": "client PEM"},
                    "key": {"type": "string", "minLength": 1, "description": "its key, 0600"},
                    "ca": {
                        "type": "string",
                        "minLength": 1,
                        "description": "PEM CA bundle the upstream must chain to",
                    },
                    "server_fingerprint": {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                        "description": "the upstream's certificate pinned: SHA-256 of its DER",
                    },
                },
                "dependentRequired": {"cert": ["key"], "key": ["cert"]},
            },
            "verify_response": {
                "type": "object",
                "additionalProperties": False,
                "required": ["keys"],
                "properties": {
                    "keys": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"oneOf": [{"type": "string"}, {"type": "object"}]},
                    },
                },
            },
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        self.name = name
        self._url = URL(str(config["url"]))
        self._timeout = float(config.get("timeout_s", 30.0))
        self._health_url = config.get("health_url")
        self._headers = dict(config.get("headers", {}))
        self._forward_user = bool(config.get("forward_user", True))
        self._digest: str | None = config.get("content_digest")
        self._ctx = context
        self.receiver: str | None = config.get("receiver")
        self._verifier = Verifier()
        self._tls: ssl.SSLContext | bool = True
        self._pin: aiohttp.Fingerprint | None = None
        self._pinned: aiohttp.ClientSession | None = None
        tls = config.get("tls")
        if tls is not None:
            base = Path(context.base_dir)

            def file_of(name: str) -> Path | None:
                return base / tls[name] if name in tls else None

            fingerprint = tls.get("server_fingerprint")
            if fingerprint is not None:
                self._pin = aiohttp.Fingerprint(bytes.fromhex(fingerprint))
            self._tls = client_context(
                file_of("cert"), file_of("key"), file_of("ca"), pinned=fingerprint is not None
            )
        self._response_keys: dict[str, VerificationKey] = {}
        for ref in config.get("verify_response", {}).get("keys", []):
            jwk = ref
            if isinstance(ref, str):
                path = Path(ref) if Path(ref).is_absolute() else Path(context.base_dir) / ref
                jwk = json.loads(path.read_text(encoding="utf-8"))
            key = VerificationKey.from_jwk(jwk)
            self._response_keys[key.kid] = key

    @staticmethod
    def derived_config(
        config: Mapping[str, Any], *, url: str, health_url: str, keys: list[Any]
    ) -> dict[str, Any]:
        """The ``http`` config of an adapter type built on this one (fixed URL layout,
        answers that must be signed by ``keys``)."""
        return {
            "url": url,
            "health_url": health_url,
            "timeout_s": config.get("timeout_s", 30.0),
            "forward_user": config.get("forward_user", True),
            "verify_response": {"keys": keys},
        } | ({"content_digest": config["content_digest"]} if "content_digest" in config else {})

    def _session(self) -> aiohttp.ClientSession:
        """The core's session, or for a pinned upstream one of our own whose connector
        checks the fingerprint right after the handshake, before anything is sent."""
        if self._pin is None:
            return self._ctx.session
        if self._pinned is None:
            self._pinned = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._pin))
        return self._pinned

    def url_for(self, service: str) -> str:
        # {service} stands for one path segment; the query, if configured, stays as it is.
        path = self._url.path.replace("{service}", service)
        return str(self._url.with_path(path).with_query(self._url.query))

    def build_headers(self, exchange: Exchange) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        headers["Content-Type"] = exchange.content_type
        headers["Gw-Client"] = exchange.client
        headers["Gw-Message-Id"] = exchange.message_id
        # The relay chain reaches the receiver: we append ourselves, never overwrite.
        prior = exchange.headers.get("Gw-Via", "").strip()
        headers["Gw-Via"] = f"{prior}, {self._ctx.member_id}" if prior else self._ctx.member_id
        values = {
            "Gw-Target": exchange.target,
            "Gw-User": exchange.user if self._forward_user else None,
            "Gw-Issue": exchange.issue,
            "Gw-Correlation-Id": exchange.correlation_id,
            "traceparent": exchange.traceparent,
        }
        for name in _FORWARDED:
            value = values.get(name)
            if value is None and not (name == "Gw-User" and not self._forward_user):
                value = exchange.headers.get(name)
            if value:
                headers[name] = value
        return headers

    # What a subclass may change: how an exchange becomes a request body, which answer
    # components a signature must cover, and how an answer becomes an Answer.
    response_components: tuple[str, ...] = ("@status", "content-digest", "content-type")

    def encode(self, exchange: Exchange) -> bytes:
        return exchange.body

    def decode(self, status: int, headers: CIMultiDict[str], body: bytes) -> Answer:
        return Answer(
            status=status,
            body=body,
            content_type=headers.get("Content-Type", "application/json"),
            headers={k: v for k, v in headers.items() if k.lower().startswith("gw-")},
        )

    async def send(self, exchange: Exchange) -> Answer:
        url = self.url_for(exchange.service)
        headers = self.build_headers(exchange)
        data = self.encode(exchange)
        if self._digest is not None:  # else the signer's own (sm3 for an SM2 key)
            headers["Content-Digest"] = content_digest(data, self._digest)
        self._ctx.signer.sign_request("POST", url, headers, data)
        timeout = aiohttp.ClientTimeout(total=min(self._timeout, exchange.timeout_s))
        try:
            # Never follow a redirect: it would re-send a signed body (and Gw-User) to a
            # place nobody configured; a 3xx is an upstream error like any other.
            async with self._session().post(
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                ssl=self._tls,
            ) as resp:
                body = await resp.read()
                status = resp.status
                resp_headers = CIMultiDict(resp.headers)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{self.name}: no answer within {timeout.total} s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self.name}: {type(exc).__name__}") from exc
        if 300 <= status < 400:
            raise UpstreamError(
                f"{self.name}: upstream answered {status} (redirect to "
                f"{location_of(resp_headers)}, not followed)"
            )
        if status >= 300:
            raise UpstreamError(f"{self.name}: upstream answered {status}")
        if self._response_keys:
            self._verify(status, resp_headers, body, RequestView("POST", url, headers))
        return self.decode(status, resp_headers, body)

    def _verify(
        self, status: int, headers: CIMultiDict[str], body: bytes, request: RequestView
    ) -> None:
        try:
            sig = parse_sig(headers)
            key = self._response_keys.get(sig.keyid)
            if key is None:
                raise UpstreamError(f"{self.name}: the answer is signed by unknown key {sig.keyid}")
            self._verifier.verify(
                ResponseView(status, headers, request),
                sig,
                key,
                required=self.response_components,
            )
            check_content_digest(headers.get("Content-Digest", ""), body)
        except UpstreamError:
            raise
        except GatewayError as exc:
            raise UpstreamError(f"{self.name}: the answer's signature: {exc.detail}") from exc
        if not bound_to(sig, headers, request):
            raise UpstreamUnbound(
                f"{self.name}: the answer is not bound to our request (it covers neither "
                '"signature";req nor our gw-message-id)'
            )

    async def health(self) -> Health:
        if not self._health_url:
            return Health(healthy=True, detail="no health_url configured")
        try:
            async with self._session().get(
                self._health_url,
                timeout=aiohttp.ClientTimeout(total=2),
                allow_redirects=False,
                ssl=self._tls,
            ) as resp:
                return Health(healthy=resp.status < 300, detail=f"HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Health(healthy=False, detail=type(exc).__name__)

    async def aclose(self) -> None:
        # The core's session is the core's; a pinned upstream's is ours.
        if self._pinned is not None:
            await self._pinned.close()
        await asyncio.sleep(0)
