"""RFC 9457 problem details for every error the gateway answers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError
from gateway.masking import mask_personal, mask_value

__all__ = ["problem_body", "problem_response"]


def problem_body(exc: GatewayError, message_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"https://gateway.example/problems/{exc.code}",
        "title": exc.title,
        "status": exc.status,
        "detail": mask_personal(exc.detail),  # never personal data, whatever the source
        "code": exc.code,
    }
    if message_id:
        body["message_id"] = message_id
    if exc.errors:
        # Pointers name properties, and a property's name may be a phone number.
        body["errors"] = mask_value([e.as_dict() for e in exc.errors])
    return body


def problem_response(exc: GatewayError, message_id: str | None = None) -> web.Response:
    response = web.Response(
        status=exc.status,
        body=json.dumps(problem_body(exc, message_id), ensure_ascii=False).encode(),
        content_type=None,
        headers={"Content-Type": "application/problem+json"},
    )
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
