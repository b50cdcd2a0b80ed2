"""TLS on the ingress listener, and mutual TLS for peers, from ``listen.ingress.tls``.

Mutual TLS authenticates the connection; who sent a message is still proven by its
RFC 9421 signature, so a certificate never stands in for a member's key.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from gateway.config.model import TlsConfig
from gateway.crypto.keys import check_private_file
from gateway.errors import ConfigError

__all__ = ["TLS_CONTEXT", "server_context"]

# The SSL context a listener serves with; ``gateway serve`` reads it from the app.
TLS_CONTEXT = web.AppKey("tls_context", ssl.SSLContext)


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca``, client certificates are verified
    against that CA only (never the system store), and required if so configured."""
    check_private_file(tls.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"/listen/ingress/tls: cannot load {tls.cert} with {tls.key} ({_reason(exc)})"]
        ) from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [f"/listen/ingress/tls/client_ca: cannot load {tls.client_ca} ({_reason(exc)})"]
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc)
