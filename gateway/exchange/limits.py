"""What one client may cost the gateway, and the problem+json it gets past each limit.

Three layers, cheapest first, each answering with a protocol code:

- **The HTTP parser** (aiohttp, per connection): header count and the length of the
  request line and of each header field (``handler_args``), and the idle timeout, which
  also bounds how long a client may take to send its headers. aiohttp answers its own
  parser errors with a plain-text 400 from ``RequestHandler.handle_error`` before any
  middleware runs; ``GatewayRunner`` serves the app with a handler whose
  ``handle_error`` answers problem+json instead (and never echoes the offending bytes,
  which may hold personal data).
- **Middleware** (``limits_middleware``, per request): requests in flight
  (``503 overloaded``) and the size of the whole header section (``400``).
- **Pipeline stages** (``RateLimiter``, ``check_json_shape``): per-member token buckets
  once the signature has proven who is asking (``429 rate_limited``), and the depth and
  item count of a JSON body before anything parses it (``400 malformed_request``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from gateway.config.model import MemberConfig, RateLimit, SecurityConfig
from gateway.errors import (
    GatewayError,
    InternalError,
    MalformedRequest,
    Overloaded,
    RateLimited,
    UpstreamTimeout,
)
from gateway.problem import problem_response

__all__ = [
    "IN_FLIGHT",
    "GatewayRunner",
    "InFlight",
    "RateLimiter",
    "TokenBucket",
    "check_json_shape",
    "handler_args",
    "limits_middleware",
]

log = logging.getLogger("gateway.exchange.limits")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OVERLOAD_RETRY_AFTER_S = 1


# Server level ------------------------------------------------------------------------


def handler_args(security: SecurityConfig) -> dict[str, Any]:
    """aiohttp's per-connection limits (``web.Application(handler_args=…)``)."""
    return {
        "max_headers": security.max_header_count,
        "max_line_size": security.max_header_line_bytes,
        "max_field_size": security.max_header_line_bytes,
        # aiohttp arms this timer when a connection opens and after each answer; it
        # closes a connection still waiting for (the rest of) a request's headers.
        "keepalive_timeout": security.idle_timeout_s,
    }


def _parser_error(
    handler: web.RequestHandler, status: int, exc: BaseException | None
) -> GatewayError:
    if status >= 500:
        if status == 504:
            return UpstreamTimeout("the request took too long")
        return InternalError("an internal error occurred; it has been logged")
    if isinstance(exc, LineTooLong):
        return MalformedRequest(
            f"the request line or a header field is longer than {handler.max_field_size} bytes"
        )
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return MalformedRequest(f"the request has more than {handler.max_headers} header fields")
    return MalformedRequest("the request is not valid HTTP/1.1")


class _ProblemRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem+json."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, give up
            raise ConnectionError("the response has begun; cannot send an error instead")
        error = _parser_error(self, status, exc)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            # Never the parser's message: it quotes the offending bytes.
            log.info(
                "rejected a request from %s: %s",
                request.remote,
                error.detail,
                extra={"event": "http_error", "status": error.status, "code": error.code},
            )
        response = problem_response(error)
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer HTTP-level errors as problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _ProblemServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )


# Middleware ----------------------------------------------------------------------------


@dataclass(slots=True)
class InFlight:
    """Requests being handled on the ingress right now, and the most allowed."""

    limit: int
    count: int = 0


IN_FLIGHT = web.AppKey("in_flight", InFlight)


def limits_middleware(security: SecurityConfig, gate: InFlight) -> Middleware:
    """Concurrency cap and header-section size for ``/v1/``; health and metrics are exempt.

    Place it after the problem middleware, which turns these errors into problem+json."""
    max_header_bytes = security.max_header_bytes

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        if gate.count >= gate.limit:
            raise Overloaded(
                f"more than {gate.limit} requests are in flight; try again shortly",
                retry_after=OVERLOAD_RETRY_AFTER_S,
            )
        # name + ": " + value + CRLF per field line
        size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > max_header_bytes:
            raise MalformedRequest(f"the header section is larger than {max_header_bytes} bytes")
        gate.count += 1
        try:
            return await handler(request)
        finally:
            gate.count -= 1

    return limits


# Rate limits -------------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """``limit.rate_per_s`` tokens a second, at most ``limit.burst`` saved; one a request."""

    limit: RateLimit
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0 if there was one, else the seconds until there will be."""
        rate, burst = self.limit.rate_per_s, self.limit.burst
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class RateLimiter:
    """One token bucket per member: its own ``rate_limit``, else the ``security`` default.

    Keyed by the member whose key signed (a peer gateway's relays count against it), so
    a forged ``Gw-Client`` cannot drain anyone else's bucket. One dict lookup a request.
    """

    def __init__(
        self, default: RateLimit | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.default = default
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, member: MemberConfig) -> None:
        """Raise ``RateLimited`` (with ``Retry-After``) when the member is over its limit."""
        limit = member.rate_limit or self.default
        if limit is None:
            return
        now = self._clock()
        bucket = self._buckets.get(member.id)
        if bucket is None or bucket.limit != limit:  # new member, or its limit changed
            bucket = self._buckets[member.id] = TokenBucket(limit, float(limit.burst), now)
        wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(
                f"{member.id} exceeds {limit.rate_per_s:g} requests/s (burst {limit.burst})",
                retry_after=max(1, math.ceil(wait)),
            )

    def tracked(self) -> int:
        """How many members have a bucket (for tests and diagnostics)."""
        return len(self._buckets)


# JSON shape ----------------------------------------------------------------------------

# Everything but quotes, brackets and commas: once escapes are gone, strings keep their extent.
_NOT_SKELETON = bytes(b for b in range(256) if b not in b'"[]{},')
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_STEPS = bytes.maketrans(b"()", b"\x01\xff")  # +1 and -1 as signed chars


def check_json_shape(body: bytes, *, max_depth: int, max_items: int) -> None:
    """Reject a JSON text nested deeper than ``max_depth`` or with more than ``max_items``
    members and items, before any parser or validator recurses into it.

    A byte scan: counting brackets and commas is memchr-fast and bounds both, since
    strings can only add to the counts; only a document that fails that bound has its
    strings cut out and its nesting measured exactly, all with bytes methods (C loops).
    """
    opens = body.count(b"[") + body.count(b"{")
    if opens <= max_depth and opens + body.count(b",") <= max_items:
        return
    bare = _without_strings(body)
    nest = bare.translate(_PARENS, b",")  # brackets outside strings, as ( and )
    opens = nest.count(b"(")
    if opens > max_depth:
        _check_depth(nest, max_depth)
    if opens + bare.count(b",") > max_items:
        raise MalformedRequest(f"the JSON document has more than {max_items} members and items")


def _check_depth(nest: bytes, max_depth: int) -> None:
    """Raise unless ``nest`` (``(`` and ``)`` only) stays within ``max_depth`` levels.

    Each pass of ``replace`` removes every innermost ``()``: one level of every branch,
    since it does not rescan what it produced. Ordinary documents (many small
    containers) empty in a few such C-speed passes. When a pass removes little, the
    document is deep and narrow; its depth is then measured in one linear scan instead
    of up to ``max_depth`` passes over nearly all of it."""
    levels = 0  # removed from every branch so far
    while nest:
        if levels == max_depth:
            raise MalformedRequest(f"the JSON document nests deeper than {max_depth} levels")
        inner = nest.replace(b"()", b"")
        if len(inner) * 4 > len(nest) * 3:
            if _deeper_than(nest, max_depth - levels):
                raise MalformedRequest(f"the JSON document nests deeper than {max_depth} levels")
            return
        nest, levels = inner, levels + 1


def _deeper_than(nest: bytes, limit: int, chunk: int = 4096) -> bool:
    """Whether some prefix of ``nest`` opens more than ``limit`` levels (prefix sums of
    +1/-1 in C, a chunk at a time, so a run of openers is caught at once)."""
    steps = array("b", nest.translate(_STEPS))
    depth = 0
    for start in range(0, len(steps), chunk):
        running = list(accumulate(steps[start : start + chunk], initial=depth))
        if max(running) > limit:
            return True
        depth = running[-1]
    return False


def _without_strings(body: bytes) -> bytes:
    """The brackets and commas of a JSON text that lie outside its strings.

    Escapes go first: backslashes only occur in strings, where ``\\\\`` and ``\\"`` are
    read left to right, as ``replace`` does; what remains of a string is its quotes and
    any brackets or commas in it, and its quotes now pair up in order."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _NOT_SKELETON)
    bare = skeleton.replace(b'""', b"")
    if b'"' not in bare:
        return bare  # no string held a bracket or a comma (the usual case)
    return b"".join(skeleton.split(b'"')[::2])
