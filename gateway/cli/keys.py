"""``gateway keygen`` (a new key pair: a PEM, or made inside a PKCS#11 token with
``--pkcs11 URI``) and ``gateway keys rotate`` (the gateway's signing key), with the
passphrase options they share.

A passphrase never comes from the command line (other users can read it in ``ps``):
only from an environment variable or a file of mode 0600.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.cli._common import add_alg_option, load, with_config
from gateway.config.model import Config, jwk_path_for
from gateway.crypto.hsm import Pkcs11Uri, generate_key
from gateway.crypto.keys import (
    KeyPair,
    KeyType,
    generate,
    public_to_jwk,
    read_passphrase,
    rotate_keypair,
    write_keypair,
)
from gateway.encoding import iso_utc
from gateway.errors import GatewayError

__all__ = ["register"]

DEFAULT_PASSPHRASE_ENV = "GATEWAY_KEY_PASSPHRASE"  # noqa: S105 - a variable's name, not a secret


def add_passphrase_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the PEM (PKCS#8, best available cipher) with a passphrase",
    )
    parser.add_argument(
        "--passphrase-env",
        default=DEFAULT_PASSPHRASE_ENV,
        metavar="NAME",
        help=f"environment variable holding the passphrase (default {DEFAULT_PASSPHRASE_ENV})",
    )
    parser.add_argument(
        "--passphrase-file", metavar="PATH", help="file (mode 0600) holding the passphrase"
    )


def passphrase_from_args(args: argparse.Namespace) -> bytes | None:
    """The passphrase to encrypt with, or None when ``--encrypt`` was not given."""
    if not args.encrypt:
        return None
    if args.passphrase_file:
        return read_passphrase(None, Path(args.passphrase_file))
    return read_passphrase(args.passphrase_env, None)


def _expiry(args: argparse.Namespace) -> dict[str, int]:
    if args.expires_days is None:
        return {}
    return {"exp": math.ceil(time.time() + args.expires_days * 86400)}


def cmd_keygen_pkcs11(args: argparse.Namespace) -> int:
    """The key pair is made in the token (never extractable); only its public JWK is
    written, to ``--jwk`` when given, and printed."""
    uri = Pkcs11Uri.parse(args.pkcs11)
    key = generate_key(uri, args.type, key_id=os.urandom(16))
    jwk: dict[str, Any] = {**public_to_jwk(key.public_key(), args.kid), **_expiry(args)}
    if args.jwk:
        Path(args.jwk).parent.mkdir(parents=True, exist_ok=True)
        Path(args.jwk).write_text(json.dumps(jwk, indent=2) + "\n", encoding="utf-8")
    report = {
        "kid": jwk["kid"],
        "alg": key.algorithm,
        "pkcs11": uri.text.split("?")[0],
        "token_id": key.key_id.hex(),
        "public_jwk": args.jwk or jwk,
    }
    print(json.dumps(report))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.pkcs11:
        if args.out or args.encrypt:
            print("--pkcs11 makes the key in the token: no --out or --encrypt", file=sys.stderr)
            return 2
        return cmd_keygen_pkcs11(args)
    if not args.out:
        print("give --out PATH (a PEM) or --pkcs11 URI (a key in a token)", file=sys.stderr)
        return 2
    pem = Path(args.out)
    if pem.exists() and not args.force:
        print(f"{pem} exists; --force replaces it", file=sys.stderr)
        return 1
    kind: KeyType = args.type
    passphrase = passphrase_from_args(args)
    pair = write_keypair(
        generate(kind), pem, jwk_path_for(pem), kid=args.kid, passphrase=passphrase
    )
    if args.expires_days is not None:
        jwk_path_for(pem).write_text(
            json.dumps({**pair.jwk, **_expiry(args)}, indent=2) + "\n", encoding="utf-8"
        )
    report = {
        "kid": pair.kid,
        "alg": pair.algorithm,
        "private": str(pem),
        "public_jwk": str(jwk_path_for(pem)),
    }
    print(json.dumps(report | ({"encrypted": True} if passphrase is not None else {})))
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    config = load(args)
    gw = config.gateway
    if gw.key_path is None:
        print(
            "the signing key is in a PKCS#11 token: make the new one there "
            "(gateway keygen --pkcs11 URI), then point gateway.key at it",
            file=sys.stderr,
        )
        return 1
    passphrase = read_passphrase(gw.key_passphrase_env, gw.key_passphrase_file)
    old, new, expiry = rotate_keypair(
        gw.key_path,
        gw.jwk_path,
        gw.rotated_keys_path,
        grace_s=args.grace_days * 86400,
        passphrase=passphrase,
        kind=args.type,
        kid=args.kid,
    )
    report: dict[str, Any] = {
        "old_kid": old.kid,
        "new_kid": new.kid,
        "alg": new.algorithm,
        "old_published_until": iso_utc(expiry),
        "previous_keys": str(gw.rotated_keys_path),
        "encrypted": passphrase is not None,
    }
    directory = config.directory
    if directory is not None and directory.announce_url is not None:
        # Signed with the old key, which the directory lists for us: the national
        # platform takes the new one on its word.
        report["announced"] = asyncio.run(_announce(config, directory.announce_url, old, new))
    print(json.dumps(report))
    print(
        "restart the gateway to sign with the new key; the old one stays in the JWKS "
        "until the date above",
        file=sys.stderr,
    )
    return 0


async def _announce(config: Config, url: str, old: KeyPair, new: KeyPair) -> int | str:
    from gateway.federation.follower import announce, announcement_of  # imports the app's modules

    async with aiohttp.ClientSession() as session:
        try:
            return await announce(
                session,
                url,
                old,
                config.gateway.member_id,
                announcement_of(config, new),
            )
        except GatewayError as exc:
            print(f"announcement failed: {exc.detail}", file=sys.stderr)
            return "failed"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kg = sub.add_parser(
        "keygen",
        help="generate a key pair (PKCS#8 PEM 0600 + public JWK, or in a PKCS#11 token)",
    )
    add_alg_option(kg, "key type, or its signature algorithm (default ed25519)", "ed25519")
    kg.add_argument("--out", help="private key path, e.g. keys/member.pem")
    kg.add_argument(
        "--pkcs11",
        metavar="URI",
        help="make the key inside a PKCS#11 token instead (RFC 7512 URI with object=, "
        "module-path= and pin-source=file:PATH or env:NAME); it never leaves the token",
    )
    kg.add_argument(
        "--jwk", metavar="PATH", help="with --pkcs11: write the public JWK here (default: print it)"
    )
    kg.add_argument(
        "--expires-days",
        type=float,
        metavar="DAYS",
        help="record an expiry (JWK exp) this many days from now",
    )
    kg.add_argument("--kid", help="key id (default: RFC 7638 thumbprint)")
    kg.add_argument("--force", action="store_true", help="replace an existing key")
    add_passphrase_options(kg)
    kg.set_defaults(func=cmd_keygen)
    keys = sub.add_parser("keys", help="the gateway's signing key: rotation")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    rotate = with_config(
        keys_sub.add_parser(
            "rotate",
            help="new signing key; the old public key stays in the JWKS for a grace period",
        )
    )
    rotate.add_argument(
        "--grace-days",
        type=float,
        default=7.0,
        help="days the old key stays published in the JWKS (default 7)",
    )
    add_alg_option(rotate, "key type of the new key (default: the old key's)")
    rotate.add_argument("--kid", help="key id of the new key (default: RFC 7638 thumbprint)")
    rotate.set_defaults(func=cmd_rotate)
