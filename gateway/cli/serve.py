"""``gateway serve`` (the gateway: ingress and admin API, one or several workers),
``gateway up`` (the gateway with the national-platform simulator and a demo provincial
system, missing keys created) and ``gateway demo`` (a cross-province exchange end to end)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.admin import create_admin_app
from gateway.cli._common import add_alg_option, load, with_config
from gateway.config.model import Config, jwk_path_for, listen_address, load_config, with_listeners
from gateway.crypto.hsm import is_pkcs11_uri
from gateway.crypto.keys import (
    VerificationKey,
    ensure_keypair,
    load_gateway_keypair,
    read_passphrase,
)
from gateway.errors import ConfigError
from gateway.exchange.app import create_app
from gateway.exchange.limits import GatewayRunner
from gateway.exchange.mtls import LOCAL_TLS
from gateway.exchange.tls import TLS_CONTEXT
from gateway.observe.logs import configure_logging
from gateway.serve import eventloop

__all__ = ["load_raw", "register"]

# The apps' modules are imported above, in the supervisor, not after a fork: a worker
# that is still importing when SIGTERM comes runs the supervisor's inherited handler.


def _address(text: str) -> tuple[str, int]:
    try:
        return listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the port (default 1)"
    )
    for flag, what in (
        ("--listen", "ingress"),
        ("--admin-listen", "admin API"),
        ("--local-listen", "local (mTLS)"),
    ):
        serve.add_argument(
            flag,
            type=_address,
            metavar="HOST:PORT",
            help=f"the {what} listener (default: the config's)",
        )
    serve.add_argument(
        "--loop",
        choices=eventloop.LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto), or asyncio's (default auto)",
    )
    serve.set_defaults(func=cmd_serve)
    up = with_config(
        sub.add_parser("up", help="create missing keys; run gateway, simulator and demo system")
    )
    add_alg_option(
        up, "type of the keys it creates (default ed25519; sm2-sm3: SM2 with SM3)", "ed25519"
    )
    up.set_defaults(func=cmd_up)
    demo = sub.add_parser(
        "demo", help="a cross-province application end to end: A, national platform, B"
    )
    demo.add_argument(
        "--crypto",
        choices=["ed25519", "sm2"],
        default="ed25519",
        help="every party's keys: Ed25519, or SM2 with SM3 digests on every hop",
    )
    demo.set_defaults(func=cmd_demo)


async def _run_sites(
    sites: Sequence[tuple[web.Application, str, int, str]],
    *,
    shutdown_timeout: float,
    reuse_port: bool = False,
    quiet: bool = False,
) -> None:
    """Serve apps until SIGINT/SIGTERM, then stop accepting and drain (reverse order)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, host, port, label in sites:
            # GatewayRunner: HTTP-level errors (oversized headers…) answered as problem+json
            runner: web.AppRunner = GatewayRunner(
                app, shutdown_timeout=shutdown_timeout, access_log=None
            )
            # Cleaned up below even if set-up (a cleanup context) or the bind fails: the
            # contexts already entered (store, session, delivery) are closed.
            runners.append(runner)
            await runner.setup()
            tls = app.get(TLS_CONTEXT)
            await web.TCPSite(
                runner, host, port, reuse_address=True, reuse_port=reuse_port, ssl_context=tls
            ).start()
            scheme = "https" if tls is not None else "http"
            if not quiet:
                print(f"  {label:<34} {scheme}://{host}:{port}", flush=True)
            local = app.get(LOCAL_TLS)
            if local is not None:  # the same app, served to mtls members (gateway/exchange/mtls.py)
                where = local.config
                await web.TCPSite(
                    runner,
                    where.host,
                    where.port,
                    reuse_address=True,
                    reuse_port=reuse_port,
                    ssl_context=local.context,
                ).start()
                if not quiet:
                    print(f"  {'gateway local (mTLS)':<34} https://{where.host}:{where.port}")
        # Everything built at start-up (config, schemas, keys, the app) lives as long as the
        # process: keep it out of the cyclic collector's full passes.
        gc.freeze()
        if not quiet:
            print("Ready. Ctrl-C stops.", flush=True)
        await stop.wait()
        if not quiet:
            print("Stopping: no new requests; in-flight work finishes, the rest stays queued.")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _gateway_sites(
    config: Config, *, worker: int | None = None
) -> list[tuple[web.Application, str, int, str]]:
    """The ingress and admin apps; of several workers, only worker 0 serves the admin API."""
    app = create_app(config, worker=worker is not None)
    sites = [(app, config.ingress.host, config.ingress.port, "gateway ingress")]
    if not worker:
        sites.append(
            (create_admin_app(app), config.admin.host, config.admin.port, "gateway admin API")
        )
    return sites


def _configure_logging(args: argparse.Namespace, config: Config) -> None:
    """The config's ``logging`` section; ``--log-level``/``--log-format`` win over it."""
    configure_logging(
        level=getattr(args, "log_level", None) or config.logging.level,
        fmt=getattr(args, "log_format", None) or config.logging.format,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    config = with_listeners(
        load(args), ingress=args.listen, admin=args.admin_listen, local=args.local_listen
    )
    _configure_logging(args, config)
    try:
        loop = eventloop.resolve(args.loop)
        eventloop.loop_factory(loop)
    except ValueError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    print(f"gateway {config.gateway.member_id} ({loop} event loop)")
    grace = config.delivery.shutdown_grace_s
    if args.workers <= 1:
        eventloop.run(_run_sites(_gateway_sites(config), shutdown_timeout=grace), loop)
        return 0
    from gateway.serve.workers import supervise

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Metrics of all workers are merged from files in one directory.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    print(
        f"  gateway ingress                    http://{config.ingress.host}:{config.ingress.port}"
    )
    print(f"  gateway admin API (worker 0)       http://{config.admin.host}:{config.admin.port}")

    def run_worker(i: int) -> None:
        sites = _gateway_sites(config, worker=i)
        eventloop.run(_run_sites(sites, shutdown_timeout=grace, reuse_port=True, quiet=True), loop)

    return supervise(config, args.workers, run_worker)


def cmd_up(args: argparse.Namespace) -> int:
    """Gateway + national-platform simulator + demo provincial system, keys created."""
    from simulators.national import NationalPlatform, create_national_app
    from simulators.portal import Portal, create_portal_app

    config_path = Path(args.config).resolve()
    raw = load_raw(config_path)
    base = config_path.parent
    if is_pkcs11_uri(raw["gateway"]["key"]):
        gateway_pair = None  # in a token: made there (gateway keygen --pkcs11), loaded below
    else:
        gw_pem = base / raw["gateway"]["key"]
        secret = raw["gateway"].get("key_passphrase_file")
        passphrase = read_passphrase(
            raw["gateway"].get("key_passphrase_env"), base / secret if secret else None
        )
        gateway_pair = ensure_keypair(
            gw_pem, jwk_path_for(gw_pem), args.type, passphrase=passphrase
        )
    _ensure_local_pki(raw, base)
    sim_pairs = {}
    for name, sim in raw.get("simulators", {}).items():
        pem = base / sim["key"]
        sim_pairs[name] = ensure_keypair(pem, jwk_path_for(pem), args.type)
    config = load_config(config_path)
    if gateway_pair is None:
        gateway_pair = load_gateway_keypair(config.gateway)
    _configure_logging(args, config)
    gateway_keys = {gateway_pair.kid: VerificationKey.from_jwk(gateway_pair.jwk)}
    url = f"http://{config.ingress.host}:{config.ingress.port}"
    sites = _gateway_sites(config)
    nat = config.simulators.get("national")
    if nat is not None:
        national = NationalPlatform(
            member_id=nat.member_id,
            keypair=sim_pairs["national"],
            trusted=gateway_keys,
            callback_base=url,
            callback_member=config.gateway.member_id,
            callback_delay_s=nat.callback_delay_s,
            # Central monitoring: the simulator pulls this gateway's aggregates when the
            # gateway names it a monitoring party (monitoring.central).
            monitored=(
                {config.gateway.member_id: url}
                if nat.member_id in config.monitoring.central
                else {}
            ),
            monitor_every_s=nat.monitor_every_s,
        )
        sites.append((create_national_app(national), nat.host, nat.port, "national platform (sim)"))
    por = config.simulators.get("portal")
    if por is not None:
        portal = Portal(
            member_id=por.member_id,
            keypair=sim_pairs["portal"],
            gateway_keys=gateway_keys,
            gateway_url=url,
            examples=_examples(config),
        )
        sites.append(
            (create_portal_app(portal), por.host, por.port, f"demo system {por.member_id}")
        )
    print(f"gateway {config.gateway.member_id} (kid {gateway_pair.kid})")
    asyncio.run(_run_sites(sites, shutdown_timeout=config.delivery.shutdown_grace_s))
    return 0


def _ensure_local_pki(raw: dict[str, Any], base: Path) -> None:
    """The shipped local listener's certificates (its CA ``local-ca.crt``, the server's,
    one per mtls member of that CA), made when missing as the keys are."""
    from gateway.exchange.certs import ensure_local_pki

    tls = raw.get("listen", {}).get("local", {}).get("tls", {})
    ca = tls.get("client_ca")
    if not isinstance(ca, str) or Path(ca).name != "local-ca.crt":
        return  # an operator's own PKI: nothing to make
    members = [
        (m["id"], m["id"].split(":", 1)[1])
        for m in raw.get("members", [])
        if "mtls" in m.get("auth", []) and m.get("certificate_ca") == ca
    ]
    for path in ensure_local_pki((base / ca).parent, members):
        print(f"  made {path.relative_to(base) if path.is_relative_to(base) else path}")


def load_raw(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: not a mapping"])
    return data


def _examples(config: Config) -> dict[str, Any]:
    found = {}
    for s in config.services:
        schema = s.request_schema
        if isinstance(schema, dict) and schema.get("examples"):
            found[s.code] = schema["examples"][0]
    return found


def cmd_demo(args: argparse.Namespace) -> int:
    """Province A, the national platform and province B on loopback, end to end."""
    from gateway.serve.demo import main as demo

    return demo(args.crypto)
