"""A member's signed client for the exchange API (demo systems, simulators, benchmarks)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config.outbound import bound_to
from gateway.crypto.keys import VerificationKey
from gateway.errors import UpstreamUnbound
from gateway.signing import (
    OPTIONAL_REQUEST_HEADERS,
    RequestView,
    ResponseView,
    Signer,
    Verifier,
    check_content_digest,
    parse_signature_input,
)

__all__ = ["ExchangeClient", "Reply", "verify_reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    request: RequestView

    def json(self) -> Any:
        return json.loads(self.body)


def verify_reply(reply: Reply, keys: Mapping[str, VerificationKey]) -> str:
    """Check the gateway's signature on a reply, bound to our request; return its kid."""
    sig = parse_signature_input(reply.headers)
    key = keys[sig.keyid]
    Verifier().verify(
        ResponseView(reply.status, reply.headers, reply.request),
        sig,
        key,
        required=("@status", "content-digest", "content-type"),
    )
    check_content_digest(reply.headers["Content-Digest"], reply.body)
    if not bound_to(sig, reply.headers, reply.request):
        raise UpstreamUnbound("the reply is not bound to our request")
    return key.kid


class ExchangeClient:
    """Signs and sends exchange requests as one member."""

    def __init__(
        self, *, member_id: str, signer: Signer, base_url: str, session: aiohttp.ClientSession
    ) -> None:
        self.member_id = member_id
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self._base = URL(self.base_url)
        self.session = session

    def url_for(self, path: str) -> str:
        """``path`` (with its query, if any) joined onto the base URL by yarl: a ``?`` or
        ``#`` in a path never moves what follows into the query."""
        relative = URL(path)
        if relative.is_absolute():
            raise ValueError(f"{path} is not a path")
        url = self._base
        for segment in relative.path.strip("/").split("/"):
            if segment:
                url = url / segment
        return str(url.with_query(relative.query) if relative.query_string else url)

    def prepare(
        self,
        method: str,
        path: str,
        document: Any = None,
        *,
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[str, CIMultiDict[str], bytes]:
        url = self.url_for(path)
        h: CIMultiDict[str] = CIMultiDict(headers or {})
        h.setdefault("Gw-Client", self.member_id)
        if method == "GET":
            # A read needs no message id; one that is sent is covered (PROTOCOL.md).
            if message_id is not None:
                h.setdefault("Gw-Message-Id", message_id)
            components = ["@method", "@target-uri", "gw-client"]
            # Every optional protocol header sent is covered (a relay's Gw-Via included).
            components += [n for n in ("gw-message-id", *OPTIONAL_REQUEST_HEADERS) if n in h]
            self.signer.sign_request(method, url, h, b"", components=components)
            h.popall("Content-Digest", None)
            return url, h, b""
        h.setdefault("Gw-Message-Id", message_id or str(uuid.uuid4()))
        data = body if body is not None else json.dumps(document, ensure_ascii=False).encode()
        h.setdefault("Content-Type", "application/json")
        self.signer.sign_request(method, url, h, data)
        return url, h, data

    async def request(
        self,
        method: str,
        path: str,
        document: Any = None,
        **kwargs: Any,
    ) -> Reply:
        url, headers, data = self.prepare(method, path, document, **kwargs)
        # A redirect is answered as it came: following it would re-send a signed request
        # to a place nobody chose.
        async with self.session.request(
            method,
            url,
            data=data if method != "GET" else None,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, resp.headers, body, RequestView(method, url, headers))

    async def exchange(self, service: str, document: Any, **kwargs: Any) -> Reply:
        return await self.request("POST", f"/v1/exchange/{service}", document, **kwargs)

    async def status(self, message_id: str) -> Reply:
        return await self.request("GET", f"/v1/messages/{message_id}")
