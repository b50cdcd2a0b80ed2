"""The ``gateway`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import eventloop
from gateway.admin.cli import register_admin_commands
from gateway.audit_cli import register_audit_commands
from gateway.config import Config, jwk_path_for, load_config, warnings_of
from gateway.errors import ConfigError, GatewayError
from gateway.keys import (
    KEY_TYPES,
    KeyType,
    VerificationKey,
    ensure_keypair,
    generate,
    read_passphrase,
    write_keypair,
)
from gateway.keys_cli import add_passphrase_options, passphrase_from_args, register_keys_commands
from gateway.limits import GatewayRunner
from gateway.logs import configure_logging
from gateway.masking import mask_headers, masked_text
from gateway.tls import TLS_CONTEXT

__all__ = ["main"]

log = logging.getLogger("gateway")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


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
            await runner.setup()
            tls = app.get(TLS_CONTEXT)
            await web.TCPSite(
                runner, host, port, reuse_address=True, reuse_port=reuse_port, ssl_context=tls
            ).start()
            runners.append(runner)
            scheme = "https" if tls is not None else "http"
            if not quiet:
                print(f"  {label:<34} {scheme}://{host}:{port}", flush=True)
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
    from gateway.admin import create_admin_app
    from gateway.app import create_app

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
    config = _config(args)
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
    from gateway.workers import supervise

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
    gw_pem = base / raw["gateway"]["key"]
    secret = raw["gateway"].get("key_passphrase_file")
    passphrase = read_passphrase(
        raw["gateway"].get("key_passphrase_env"), base / secret if secret else None
    )
    gateway_pair = ensure_keypair(gw_pem, jwk_path_for(gw_pem), passphrase=passphrase)
    sim_pairs = {}
    for name, sim in raw.get("simulators", {}).items():
        pem = base / sim["key"]
        sim_pairs[name] = ensure_keypair(pem, jwk_path_for(pem))
    config = load_config(config_path)
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
            callback_delay_s=nat.callback_delay_s,
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
    from gateway.demo import main as demo

    return demo(args.crypto)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.registry import check_adapter_config

    try:
        config = _config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config}:{problem}")
        print(f"{len(exc.problems)} problem(s)")
        return 1
    problems: list[str] = []
    for i, adapter in enumerate(config.adapters):
        problems += check_adapter_config(adapter.type, adapter.config, f"/adapters/{i}")
    if not config.gateway.key_path.exists():
        problems.append(f"/gateway/key: {config.gateway.key_path} does not exist (gateway keygen)")
    for problem in problems:
        print(f"{args.config}:{problem}")
    for warning in warnings_of(config):
        print(f"{args.config}:{warning} [warning]")
    if problems:
        print(f"{len(problems)} problem(s)")
        return 1
    print(
        f"{args.config}: OK ({len(config.members)} members, {len(config.services)} services, "
        f"{len(config.adapters)} adapters, {len(config.routes)} routes)"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    pem = Path(args.out)
    if pem.exists() and not args.force:
        print(f"{pem} exists; --force replaces it", file=sys.stderr)
        return 1
    kind: KeyType = args.type
    passphrase = passphrase_from_args(args)
    pair = write_keypair(
        generate(kind), pem, jwk_path_for(pem), kid=args.kid, passphrase=passphrase
    )
    report = {
        "kid": pair.kid,
        "alg": pair.algorithm,
        "private": str(pem),
        "public_jwk": str(jwk_path_for(pem)),
    }
    print(json.dumps(report | ({"encrypted": True} if passphrase is not None else {})))
    return 0


async def _with_store(config: Config) -> Any:
    from gateway.store.sqlite import SQLiteStore

    store = SQLiteStore(config.store.path, synchronous=config.store.synchronous)
    await store.open()
    return store


def _text(data: bytes | None, sensitive: Sequence[str] = ()) -> str:
    """A stored body for an operator's eyes: personal data and sensitive fields masked."""
    return masked_text(data, sensitive)


def _sensitive(doc: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each service's sensitive JSON Pointers, in the file with the admin changes."""
    return {s["code"]: list(s.get("sensitive", [])) for s in doc.get("services", [])}


def cmd_log_show(args: argparse.Namespace) -> int:
    config = _config(args)

    async def run() -> int:
        store = await _with_store(config)
        try:
            records = await store.find_by_message_id(args.id.lower())
            if not records:
                print(f"no message {args.id}", file=sys.stderr)
                return 1
            from gateway.live import merge

            sensitive = _sensitive(merge(config.raw, await store.load_overlay()))
            for r in records:
                fields = sensitive.get(r.service, [])
                out = {
                    "seq": r.seq,
                    "message_id": r.message_id,
                    "client": r.client,
                    "service": r.service,
                    "mode": r.mode,
                    "state": r.state,
                    "target": r.target,
                    "adapter": r.adapter,
                    "status": r.status,
                    "code": r.code,
                    "error": r.error,
                    "attempts": r.attempts,
                    "request_digest": r.request_digest,
                    "request_headers": mask_headers(r.request_headers),
                    "request_body": _text(r.request_body, fields),
                    "response_body": _text(r.response_body, fields),
                    "result": _text(r.result, fields) or None,
                    "timings_ms": dict(r.timings),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created_at)),
                    "trace_id": r.trace_id,
                }
                print(json.dumps(out, ensure_ascii=False, indent=2))
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_dead_letters(args: argparse.Namespace) -> int:
    config = _config(args)

    async def run() -> int:
        store = await _with_store(config)
        try:
            if args.action == "list":
                rows = await store.dead_letters(limit=args.limit)
                if args.json:
                    print(json.dumps(list(rows), ensure_ascii=False, indent=2))
                else:
                    print(
                        f"{'KIND':<9}{'SEQ':>6}  {'MESSAGE ID':<37}{'SERVICE':<22}ATTEMPTS  ERROR"
                    )
                    for r in rows:
                        print(
                            f"{r['kind']:<9}{r['seq']:>6}  {r['message_id']:<37}"
                            f"{r['service']:<22}{r['attempts']:>8}  {r['error'] or ''}"
                        )
                    print(f"{len(rows)} dead letter(s)")
                return 0
            ok = await store.redeliver(args.kind, args.seq, time.time())
            print("queued for redelivery" if ok else f"no dead {args.kind} {args.seq}")
            return 0 if ok else 1
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_token(args: argparse.Namespace) -> int:
    """Tokens are managed in the store directly, so the first one needs no API."""
    from gateway.admin.auth import create_token
    from gateway.store import ResourceChange

    config = _config(args)

    async def run() -> int:
        store = await _with_store(config)
        try:
            if args.action == "create":
                token = await create_token(store, args.name, args.role)
                await store.audit(
                    ResourceChange(
                        kind="tokens",
                        id=args.name,
                        action="create",
                        actor="cli",
                        role="local",
                        after={"name": args.name, "role": args.role},
                    )
                )
                print(token)
                print(
                    f"token {args.name!r} ({args.role}) created; it is shown only once",
                    file=sys.stderr,
                )
                return 0
            if args.action == "revoke":
                if not await store.revoke_token(args.name):
                    print(f"no active token {args.name}", file=sys.stderr)
                    return 1
                await store.audit(
                    ResourceChange(
                        kind="tokens",
                        id=args.name,
                        action="revoke",
                        actor="cli",
                        role="local",
                        before={"name": args.name},
                    )
                )
                print(f"token {args.name!r} revoked")
                return 0
            rows = await store.list_tokens()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'NAME':<24}{'ROLE':<10}{'CREATED':<22}REVOKED")
                for r in rows:
                    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created_at"]))
                    revoked = (
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["revoked_at"]))
                        if r["revoked_at"]
                        else "-"
                    )
                    print(f"{r['name']:<24}{r['role']:<10}{created:<22}{revoked}")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_config_export(args: argparse.Namespace) -> int:
    """The live configuration (file + admin changes) as YAML that `gateway serve` accepts."""
    import yaml

    from gateway.config import parse_config
    from gateway.live import merge

    config = _config(args)

    async def run() -> dict[str, Any]:
        store = await _with_store(config)
        try:
            return merge(config.raw, await store.load_overlay())
        finally:
            await store.close()

    doc = asyncio.run(run())
    parse_config(doc, base=config.base, path=config.path)  # what we print must load
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Data exchange gateway for cross-regional government service interop.",
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING (default: the config's logging.level, or INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="default: the config's logging.format, or text",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default="config.yaml", help="config file (default config.yaml)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the port (default 1)"
    )
    serve.add_argument(
        "--loop",
        choices=eventloop.LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto), or asyncio's (default auto)",
    )
    serve.set_defaults(func=cmd_serve)
    with_config(
        sub.add_parser("up", help="create missing keys; run gateway, simulator and demo system")
    ).set_defaults(func=cmd_up)
    with_config(sub.add_parser("check", help="validate the configuration")).set_defaults(
        func=cmd_check
    )
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
    kg = sub.add_parser("keygen", help="generate a key pair (PKCS#8 PEM 0600 + public JWK)")
    kg.add_argument(
        "--alg", "--type", dest="type", choices=KEY_TYPES, default="ed25519", help="key type"
    )
    kg.add_argument("--out", required=True, help="private key path, e.g. keys/member.pem")
    kg.add_argument("--kid", help="key id (default: RFC 7638 thumbprint)")
    kg.add_argument("--force", action="store_true", help="replace an existing key")
    add_passphrase_options(kg)
    kg.set_defaults(func=cmd_keygen)
    register_keys_commands(sub)
    lg = sub.add_parser("log", help="read the message log")
    lg_sub = lg.add_subparsers(dest="action", required=True)
    show = with_config(lg_sub.add_parser("show", help="print one exchange"))
    show.add_argument("id", help="message id")
    show.set_defaults(func=cmd_log_show)
    dl = sub.add_parser("dead-letters", help="list or redeliver dead letters")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    ls = with_config(dl_sub.add_parser("list", help="list dead letters"))
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_dead_letters)
    rd = with_config(dl_sub.add_parser("redeliver", help="put one dead letter back in the outbox"))
    rd.add_argument("kind", choices=["message", "callback"])
    rd.add_argument("seq", type=int)
    rd.set_defaults(func=cmd_dead_letters)
    adm = sub.add_parser("admin", help="administer a gateway (tokens here; the rest via the API)")
    adm_sub = adm.add_subparsers(dest="area", required=True)
    tok = adm_sub.add_parser("token", help="admin API tokens (stored as hashes)")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tc = with_config(tok_sub.add_parser("create", help="create a token and print it once"))
    tc.add_argument("--name", required=True)
    tc.add_argument("--role", required=True, choices=["admin", "operator", "auditor"])
    tc.set_defaults(func=cmd_token)
    tl = with_config(tok_sub.add_parser("list", help="list tokens (never their values)"))
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func=cmd_token)
    tr = with_config(tok_sub.add_parser("revoke", help="revoke a token"))
    tr.add_argument("name")
    tr.set_defaults(func=cmd_token)
    register_admin_commands(adm_sub)
    cfg = sub.add_parser("config", help="the live configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    ex = with_config(cfg_sub.add_parser("export", help="print file + admin changes as YAML"))
    ex.add_argument("--out", help="write to this file instead of stdout")
    ex.set_defaults(func=cmd_config_export)
    register_audit_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level or "INFO", fmt=args.log_format or "text")
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config: {problem}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
