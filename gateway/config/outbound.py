"""Where outbound requests may go: the policy for URLs nobody configured by hand.

A URL in ``config.yaml`` or written by an admin is trusted as it stands. A URL *learnt*
from the federation directory (a peer gateway's ingress, the national platform's base
URL, a callback URL; an announcement reaches us only through the directory) is checked
twice:

- when it is learnt (``OutboundPolicy.check_url``): ``https`` (``http`` only with
  ``allow_http``), no user info, no query or fragment (a ``?`` or ``#`` would change the
  path of every URL joined onto it), and a host that is not a literal address outside
  the public internet (loopback, private, link-local, shared, reserved, multicast, and
  the same inside IPv4-mapped, 6to4, NAT64 and Teredo IPv6) unless ``allow_networks``
  holds it;
- at connect time, by the session learnt URLs go through (``learnt_session``): its
  resolver drops every resolved address the policy refuses, so a name that resolves
  (or later rebinds) to ``127.0.0.1`` is never connected to, and a client middleware
  checks each request's URL again.

What comes back is bound to what we sent (``bound_to``): a signed answer covers the
request's signature (``"signature";req``) or its message id, else it could be any
other request's answer, replayed (``upstream_unbound``).

Redirects are never followed by the gateway's own requests (every call passes
``allow_redirects=False``; a 3xx is a failed attempt, logged with its ``Location``).
URLs are joined with yarl (``join``), never by string concatenation.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from gateway.crypto.files import check_private_file
from gateway.errors import ConfigError, GatewayError, OutboundRefused
from gateway.signing import RequestView, SignatureInput, parse_signature_input
from gateway.signing.fields import Headers

__all__ = [
    "LOOPBACK_NETWORKS",
    "GuardedResolver",
    "IPAddress",
    "IPNetwork",
    "OutboundPolicy",
    "OutboundRefused",
    "bound_to",
    "client_context",
    "configured_session",
    "join",
    "learnt_session",
    "location_of",
    "networks",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64, Teredo), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]  # the client's address
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundPolicy:
    """The ``outbound`` block of config: what learnt URLs may name.

    The default refuses ``http`` and every address outside the public internet; the
    demo and tests that run gateways on loopback allow ``http`` and ``127.0.0.0/8``."""

    allow_http: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def loopback(cls) -> OutboundPolicy:
        """What a federation entirely on one machine needs (the demo, the tests)."""
        return cls(allow_http=True, allow_networks=LOOPBACK_NETWORKS)

    def allows_address(self, address: IPAddress) -> bool:
        if any(address in net for net in self.allow_networks if net.version == address.version):
            return True
        inner = _embedded(address)
        if inner is not address and any(
            inner in net for net in self.allow_networks if net.version == inner.version
        ):
            return True
        return all(a.is_global and not a.is_multicast for a in (address, inner))

    def check_url(self, url: str | URL, *, what: str = "a learnt URL") -> URL:
        """The URL parsed, or ``OutboundRefused`` saying which rule it breaks."""
        try:
            parsed = url if isinstance(url, URL) else URL(url)
            host = parsed.host
        except (ValueError, TypeError) as exc:
            raise OutboundRefused(f"{what} is not a URL: {exc}") from exc
        allowed = ("https", "http") if self.allow_http else ("https",)
        if parsed.scheme not in allowed:
            raise OutboundRefused(
                f"{what} {parsed.scheme}://… is refused: only {' or '.join(allowed)} "
                "(outbound.allow_http allows http)"
            )
        if not host:
            raise OutboundRefused(f"{what} has no host")
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise OutboundRefused(f"{what} must not carry user information")
        if parsed.raw_query_string or parsed.raw_fragment or "?" in str(url) or "#" in str(url):
            raise OutboundRefused(f"{what} must not carry a query or a fragment")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return parsed  # a name: its addresses are checked at connect time
        if not self.allows_address(address):
            raise OutboundRefused(
                f"{what} names {address}, which is not a public address "
                "(outbound.allow_networks allows a network)"
            )
        return parsed


class GuardedResolver(AbstractResolver):
    """Resolves as ``inner`` does, then keeps only addresses the policy allows."""

    def __init__(self, policy: OutboundPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if self._allowed(r["host"])]
        if not kept:
            refused = ", ".join(sorted({r["host"] for r in found})) or "nothing"
            raise OutboundRefused(
                f"{host} resolves to {refused}: not a public address "
                "(outbound.allow_networks allows a network)"
            )
        return kept

    def _allowed(self, text: str) -> bool:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone id
        except ValueError:
            return False
        return self._policy.allows_address(address)

    async def close(self) -> None:
        await self._inner.close()


def _url_guard(policy: OutboundPolicy) -> Any:
    async def guard(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        policy.check_url(request.url, what="an outbound URL")
        return await handler(request)

    return guard


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=60, connect=5)


def configured_session() -> aiohttp.ClientSession:
    """The app's session for configured URLs (adapters, callbacks to local members)."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=_timeout())


def learnt_session(
    policy: OutboundPolicy, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The app's session for learnt URLs: addresses checked at connect time.

    ``resolver`` replaces the system's (tests use one that answers what they need)."""
    connector = aiohttp.TCPConnector(
        limit=128,
        limit_per_host=64,
        ttl_dns_cache=30,
        resolver=GuardedResolver(policy, resolver),
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=_timeout(), middlewares=(_url_guard(policy),)
    )


def join(base: str | URL, *segments: str) -> str:
    """``base`` with path segments appended (each percent-encoded as one segment).

    A base with a query or a fragment is refused: joining onto it would either drop
    them or, by string concatenation, move the path into them."""
    url = base if isinstance(base, URL) else URL(base)
    if url.raw_query_string or url.raw_fragment or "?" in str(base) or "#" in str(base):
        raise ValueError(f"{base} must not carry a query or a fragment")
    for segment in segments:
        url = url / segment
    return str(url)


def location_of(headers: Any, limit: int = 200) -> str:
    """A redirect's ``Location`` for the log: as sent, bounded."""
    value = str(headers.get("Location", "")) if headers is not None else ""
    return (value[:limit] + "…") if len(value) > limit else (value or "none")


def networks(values: Iterable[str] | Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings (``ValueError`` names the bad one)."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def bound_to(sig: SignatureInput, headers: Headers, request: RequestView) -> bool:
    """Whether a verified answer's signature binds it to ``request``: it covers the
    request's signature by its label (``"signature";req;key=…``), or the request's
    message id (``"gw-message-id";req``, or the answer's ``gw-message-id`` when it
    equals the request's)."""
    try:
        label: str | None = parse_signature_input(request.headers).label
    except GatewayError:
        label = None
    ours = request.headers.get("Gw-Message-Id")
    for name, params in sig.items:
        if name == "signature" and params.get("req") is True and params.get("key") == label:
            return label is not None
        if name == "gw-message-id" and ours:
            if params.get("req") is True:
                return True
            if not params and headers.get("Gw-Message-Id") == ours:
                return True
    return False


def client_context(
    cert: Path | None, key: Path | None, ca: Path | None, *, pinned: bool = False
) -> ssl.SSLContext:
    """A TLS 1.2+ client context presenting ``cert`` (if any), verifying the server
    against ``ca`` (None: the system's CAs); ``pinned``: the caller checks the server's
    certificate by its fingerprint instead (aiohttp.Fingerprint), so chain and name are not."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if pinned:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        check_private_file(key)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [f"cannot load the client certificate {cert} with {key} ({exc})"]
            ) from exc
    return context
