"""What every simulated party shares: verifying a signed request, signing answers."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.crypto.keys import VerificationKey
from gateway.errors import GatewayError
from gateway.signing import (
    RequestView,
    Signer,
    Verifier,
    check_content_digest,
    parse_signature_input,
)

__all__ = ["note", "problem", "signed_json", "verify_request"]


def note(trail: list[dict[str, Any]], hop: str, checked: str) -> None:
    """Record one hop (what arrived where, and which signature was checked there)."""
    trail.append({"at": time.monotonic(), "hop": hop, "checked": checked})


def problem(status: int, code: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": code, "status": status, "detail": detail, "code": code}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/problem+json"
    )


async def verify_request(
    request: web.Request,
    keys: Mapping[str, VerificationKey],
    verifier: Verifier,
    *,
    also: tuple[str, ...] = (),
) -> tuple[bytes, str]:
    """Verify an RFC 9421 signed request (with digest); return (body, signing kid).
    ``also``: components the signature must cover beyond the usual ones."""
    body = await request.read()
    sig = parse_signature_input(request.headers)
    key = keys.get(sig.keyid)
    if key is None:
        raise web.HTTPUnauthorized(reason=f"unknown key {sig.keyid}")
    verifier.verify(
        RequestView(request.method, str(request.url), request.headers),
        sig,
        key,
        required=(
            "@method",
            "@target-uri",
            "content-digest",
            "content-type",
            "gw-message-id",
            *also,
        ),
    )
    check_content_digest(request.headers["Content-Digest"], body)
    return body, key.kid


def signed_json(request: web.Request, signer: Signer, status: int, data: Any) -> web.Response:
    """A JSON answer signed like the gateway signs its own (bound with ``;req``)."""
    body = json.dumps(data, ensure_ascii=False).encode()
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    if "Gw-Message-Id" in request.headers:
        headers["Gw-Message-Id"] = request.headers["Gw-Message-Id"]
    label = None
    try:
        label = parse_signature_input(request.headers).label
    except GatewayError:
        label = None
    view = RequestView(request.method, str(request.url), request.headers)
    signer.sign_response(status, headers, body, view, label)
    return web.Response(status=status, body=body, headers=headers)
