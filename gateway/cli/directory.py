"""``gateway directory sign|show|verify``: the federation directory for the national
operator (sign a new version) and for auditors (read one, check one against pinned keys).

A source is a file holding the compact JWS or an ``http(s)://`` URL serving it
(``GET /v1/directory`` on the national platform).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config.model import jwk_path_for
from gateway.crypto.hsm import is_pkcs11_uri
from gateway.crypto.keys import load_key
from gateway.encoding import iso_utc
from gateway.errors import DirectoryRefused
from gateway.federation.directory import check_succession, read_directory, sign_directory

__all__ = ["register"]


async def _fetch(url: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers={"Accept": "application/jose"}, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise DirectoryRefused("http", f"{url} answered {resp.status}")
        return await resp.text()


def _read_source(source: str) -> str:
    if source.startswith(("http://", "https://")):
        try:
            return asyncio.run(_fetch(source))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DirectoryRefused("unreachable", f"{source}: {exc}") from exc
    return Path(source).read_text(encoding="ascii").strip()


def _pinned(path: str) -> list[dict[str, Any]]:
    """A JWKS (``{"keys": […]}``) or a single JWK."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(data["keys"]) if isinstance(data, dict) and "keys" in data else [data]


def cmd_sign(args: argparse.Namespace) -> int:
    payload = json.loads(Path(args.input).read_text(encoding="utf-8"))
    now = time.time()
    payload.setdefault("format", "gw-directory/1")
    if args.version is not None:
        payload["version"] = args.version
    payload["issued_at"] = iso_utc(now)
    payload["expires_at"] = iso_utc(now + args.validity_hours * 3600)
    key = args.key
    keypair = load_key(key, None if is_pkcs11_uri(key) else jwk_path_for(Path(key)))
    jws = sign_directory(keypair, payload)
    if args.out:
        Path(args.out).write_text(jws + "\n", encoding="ascii")
    else:
        print(jws)
    print(
        f"signed version {payload.get('version')} with {keypair.kid}, "
        f"expires {payload['expires_at']}",
        file=sys.stderr,
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    parts = _read_source(args.source).split(".")
    try:
        if len(parts) != 3:
            raise ValueError("not three parts")
        header, payload = (json.loads(base64.urlsafe_b64decode(p + "==")) for p in parts[:2])
    except (ValueError, UnicodeDecodeError):
        print("directory: not a compact JWS", file=sys.stderr)
        return 1
    print(json.dumps({"header": header, "payload": payload}, ensure_ascii=False, indent=2))
    print(
        "(shown unverified; use `gateway directory verify` with the pinned keys)", file=sys.stderr
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        directory = read_directory(_read_source(args.source), _pinned(args.keys))
        if args.min_version is not None and directory.version < args.min_version:
            raise DirectoryRefused(
                "rollback", f"version {directory.version} is lower than {args.min_version}"
            )
        check_succession(directory, None, now=time.time())
    except DirectoryRefused as exc:
        print(f"refused ({exc.reason}): {exc.detail}", file=sys.stderr)
        return 1
    summary = {
        "version": directory.version,
        "issuer": directory.issuer,
        "signed_by": directory.kid,
        "issued_at": iso_utc(directory.issued_at),
        "expires_at": iso_utc(directory.expires_at),
        "regions": {
            r.region: {"gateway": r.gateway.member_id, "keys": [k.kid for k in r.gateway.keys]}
            for r in directory.regions
        },
    }
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("directory", help="the federation directory: sign, show, verify")
    d_sub = d.add_subparsers(dest="action", required=True)
    sign = d_sub.add_parser("sign", help="sign a directory payload (national operator)")
    sign.add_argument(
        "--key", required=True, help="the directory key: a PKCS#8 PEM, or a pkcs11: URI"
    )
    sign.add_argument("--in", dest="input", required=True, help="payload JSON")
    sign.add_argument("--version", type=int, help="version (default: the payload's)")
    sign.add_argument("--validity-hours", type=float, default=24.0, help="default 24")
    sign.add_argument("--out", help="write the JWS here (default: standard output)")
    sign.set_defaults(func=cmd_sign)
    show = d_sub.add_parser("show", help="print a directory's header and payload, unverified")
    show.add_argument("source", help="file with the JWS, or its URL")
    show.set_defaults(func=cmd_show)
    verify = d_sub.add_parser("verify", help="check a directory against pinned keys")
    verify.add_argument("source", help="file with the JWS, or its URL")
    verify.add_argument("--keys", required=True, help="pinned JWK or JWKS file")
    verify.add_argument("--min-version", type=int, help="refuse a lower version")
    verify.set_defaults(func=cmd_verify)
