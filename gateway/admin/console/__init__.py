"""The admin web console: the admin API's every operation in a browser, at ``/`` on the
admin listener.

- ``sessions``: an admin token exchanged for a server-side session (cookie, CSRF, expiry);
- ``forms``: HTML fields generated from JSON Schemas (an adapter type's ``config_schema``)
  and form values read back into JSON;
- ``overview``: the overview's figures and chart from the gateway's own metrics;
- ``views``: the pages and form actions, which call the admin API's own operations
  (``gateway.admin.operations``), never a copy of them;
- ``templates/`` (Jinja2) and ``static/`` (one stylesheet; no script, nothing from
  elsewhere: ``Content-Security-Policy: default-src 'self'``).
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.admin.console.overview import Sampler
from gateway.admin.console.sessions import DEFAULT_TTL_S, Sessions
from gateway.admin.console.views import CONSOLE, Console, routes
from gateway.admin.operations import INGRESS
from gateway.crypto.keys import expiry_warning
from gateway.exchange.app import KEYPAIR, METRICS

__all__ = ["CONSOLE", "CSP", "Console", "mount_console"]

STATIC = Path(__file__).parent / "static"
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/admin/v1"):
        return
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


def mount_console(
    app: web.Application, *, ttl_s: float = DEFAULT_TTL_S, sample_every_s: float = 10.0
) -> None:
    """Serve the console on the admin app (which holds the ingress app under ``INGRESS``)."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.admin.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # The banner in base.html: the signing key's expiry, worded as /readyz words it.
    keypair = app[INGRESS][KEYPAIR]
    aiohttp_jinja2.get_env(app).globals["key_expiry"] = lambda: expiry_warning(keypair, time.time())
    metrics = app[INGRESS][METRICS]
    sampler = Sampler(lambda: metrics.render().decode(), every_s=sample_every_s)
    app[CONSOLE] = Console(sessions=Sessions(ttl_s), sampler=sampler)
    app.router.add_routes(routes())
    app.router.add_static("/static/", STATIC)
    app.cleanup_ctx.append(sampler.context())
    app.on_response_prepare.append(_security_headers)
