"""``gateway conformance``: the member's conformance kit (gateway/exchange/conformance.py) from the
command line; a pass/fail line per check, a JSON report, exit 1 on any failure."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
from pathlib import Path

from gateway.config.model import MEMBER_ID_PATTERN, jwk_path_for
from gateway.crypto.keys import KeyPair, load_keypair
from gateway.errors import ConfigError, GatewayError
from gateway.exchange.conformance import KitOptions, parse_jwks, run_kit

__all__ = ["register"]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text} is not HOST:PORT")
    return host.strip("[]"), int(port)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "conformance",
        help="check a member's integration against a gateway (docs/members.md)",
        description="Signed round trips, each error a member must handle, an asynchronous "
        "exchange with its callback and, with --callback-url, a tampered and a replayed "
        "callback your endpoint must refuse. Exits 1 if any check fails.",
    )
    p.add_argument("--url", required=True, help="the gateway's ingress URL (as you sign it)")
    p.add_argument("--client", required=True, help="your member id <region>:<system>")
    p.add_argument(
        "--key",
        required=True,
        action="append",
        metavar="PEM",
        help="your PKCS#8 private key; repeat for each key (one round trip per algorithm)",
    )
    p.add_argument(
        "--key-id",
        action="append",
        default=[],
        metavar="KID",
        help="the kid of the --key at the same position (default: the JWK beside the PEM, "
        "else the RFC 7638 thumbprint)",
    )
    p.add_argument(
        "--callback-url",
        metavar="URL",
        help="your system's callback endpoint: sent a tampered, the genuine and a replayed "
        "callback",
    )
    p.add_argument(
        "--receiver",
        type=_address,
        metavar="HOST:PORT",
        help="where the kit listens for the gateway's callback (default: the host and port "
        "of the callback URL the gateway has for you)",
    )
    p.add_argument(
        "--gateway-jwks",
        metavar="FILE",
        help="the gateway's pinned public keys (JWKS or JWK); default: fetched from "
        "/.well-known/jwks.json",
    )
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="wait for the callback (30)"
    )
    p.set_defaults(func=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    if not re.fullmatch(MEMBER_ID_PATTERN, args.client):
        print(f"--client {args.client}: not a member id <region>:<system>", file=sys.stderr)
        return 2
    if len(args.key_id) > len(args.key):
        print("more --key-id than --key", file=sys.stderr)
        return 2
    try:
        pairs = []
        for i, pem in enumerate(args.key):
            pair = load_keypair(Path(pem), jwk_path_for(Path(pem)))
            if i < len(args.key_id):
                pair = _with_kid(pair, args.key_id[i])
            pairs.append(pair)
        pinned = parse_jwks(Path(args.gateway_jwks).read_text()) if args.gateway_jwks else ()
    except (ConfigError, GatewayError, OSError, ValueError) as exc:
        print(f"cannot read a key: {exc}", file=sys.stderr)
        return 2
    options = KitOptions(
        url=args.url,
        client=args.client,
        keys=tuple(pairs),
        callback_url=args.callback_url,
        receiver=args.receiver,
        gateway_jwks=pinned,
        timeout_s=args.timeout,
    )
    report = asyncio.run(run_kit(options))
    for check in report.checks:
        print(check.line())
    data = report.to_json()
    print(f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped")
    if args.report:
        Path(args.report).write_text(
            json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    return 0 if report.ok else 1


def _with_kid(pair: KeyPair, kid: str) -> KeyPair:
    return dataclasses.replace(pair, kid=kid, jwk={**pair.jwk, "kid": kid})
