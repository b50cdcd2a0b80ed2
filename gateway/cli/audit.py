"""``gateway audit verify|export|check|purge``: verify the tamper-evident message log,
export and check evidence bundles, purge old bodies (docs/audit.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.audit import (
    Report,
    canonical_bundle,
    check_bundle,
    export_bundle,
    jwks_from,
    make_checkpoint,
    stamp_files,
    verify_store,
)
from gateway.audit.timestamping import StampTrust, stamp_checkpoints
from gateway.cli._common import load, open_store, read_json, with_config
from gateway.config.model import Config
from gateway.crypto.keys import load_gateway_keypair
from gateway.errors import StoreError, TimestampError
from gateway.store import Store

__all__ = ["EXIT_UNTRUSTED", "register"]

# ``audit check``: consistent, but only with the bundle's own key (no trusted JWKS given).
EXIT_UNTRUSTED = 3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify|export|check|purge`` to the ``gateway`` parser."""
    audit = sub.add_parser("audit", help="the tamper-evident message log (docs/audit.md)")
    actions = audit.add_subparsers(dest="action", required=True)

    verify = with_config(
        actions.add_parser(
            "verify",
            help="walk the chain and name the first modified, deleted, inserted, "
            "reordered or forged record; exit 1 if there is one",
        )
    )
    verify.add_argument("--jwks", help="trust this JWKS file (default: the gateway's own keys)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--archives",
        metavar="DIR",
        help="verify the archive files in DIR and the store as one chain (gateway log archive)",
    )
    verify.set_defaults(func=cmd_verify)

    export = with_config(
        actions.add_parser(
            "export", help="write one message's evidence bundle (signing a checkpoint if needed)"
        )
    )
    export.add_argument("message_id", metavar="MESSAGE_ID")
    export.add_argument("--out", required=True, help="bundle file to write")
    export.add_argument("--client", help="the sender, when several sent this message id")
    export.set_defaults(func=cmd_export)

    check = actions.add_parser(
        "check",
        help="check an evidence bundle offline; exit 0 verified against --jwks, 1 broken, "
        f"{EXIT_UNTRUSTED} consistent but checked only against its own key",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--jwks", help="the gateway's public JWKS, obtained independently")
    check.set_defaults(func=cmd_check)

    purge = with_config(
        actions.add_parser(
            "purge", help="drop request/response/result bodies older than DAYS; digests stay"
        )
    )
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.set_defaults(func=cmd_purge)


def gateway_jwks(config: Config) -> dict[str, Any]:
    """The gateway's public keys (current and previous), as ``/.well-known/jwks.json``."""
    if config.gateway.jwk_path.exists():
        return jwks_from(config.gateway.jwk_path, config.gateway.previous_keys)
    pair = load_gateway_keypair(config.gateway)
    return {"keys": [dict(pair.jwk), *(dict(k) for k in config.gateway.previous_keys)]}


def cmd_verify(args: argparse.Namespace) -> int:
    config = load(args)
    jwks = read_json(args.jwks, StoreError) if args.jwks else gateway_jwks(config)

    tsa = StampTrust.of(config.timestamping) if config.timestamping else None

    async def run() -> Report:
        async with open_store(config, readonly=True) as store:
            if args.archives:
                from gateway.audit.archive import verify_archives

                return await verify_archives(
                    store, Path(args.archives), jwks, gateway=config.gateway.member_id, tsa=tsa
                )
            return await verify_store(store, jwks, gateway=config.gateway.member_id, tsa=tsa)

    report = asyncio.run(run())
    if args.json:
        out = {
            "ok": report.ok,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "sealed": report.sealed,
            "stamped": report.stamped,
            "unstamped": report.unstamped,
            "stamp_lag_s": report.stamp_lag[1] if report.stamp_lag else None,
            "findings": [
                {"seq": f.seq, "kind": f.kind, "detail": f.detail} for f in report.findings
            ],
        }
        print(json.dumps(out, indent=2))
        return 0 if report.ok else 1
    unsealed = report.records - report.sealed
    print(
        f"message log: {report.records} records, {report.checkpoints} signed checkpoints; "
        f"sealed up to seq {report.sealed}"
        + (f" ({unsealed} records not covered by a valid checkpoint)" if unsealed > 0 else "")
    )
    print(_stamps_line(report))
    first = report.first
    if first is None:
        print("OK: every record, link and checkpoint holds")
        return 0
    print(f"BROKEN: {first}")
    for finding in report.findings[1:20]:
        print(f"  also {finding}")
    if len(report.findings) > 20:
        print(f"  … and {len(report.findings) - 20} more")
    print(f"{len(report.findings)} problem(s)", file=sys.stderr)
    return 1


def _stamps_line(report: Report) -> str:
    if report.stamped is None:
        held = report.checkpoints - report.unstamped
        return (
            f"time stamps: {held} kept, not checked (no timestamping.ca configured)"
            if held
            else "time stamps: none (timestamping is not configured)"
        )
    lag = (
        f"; the longest wait for a stamp: {report.stamp_lag[1]:.0f} s (checkpoint "
        f"{report.stamp_lag[0]})"
        if report.stamp_lag is not None
        else ""
    )
    return (
        f"time stamps: {report.stamped} of {report.checkpoints} checkpoints stamped by the TSA "
        f"and verified against its certificate; {report.unstamped} without a stamp{lag}"
    )


async def _stamp_now(config: Config, store: Store) -> None:
    """Stamp what is unstamped now (the bundle's checkpoint among it); a TSA that does not
    answer leaves the bundle without a stamp, said so on stderr."""
    if config.timestamping is None:
        return
    trust = StampTrust.of(config.timestamping)
    async with aiohttp.ClientSession() as session:
        try:
            await stamp_checkpoints(
                store,
                session,
                config.timestamping,
                trust,
                lease_s=2 * config.timestamping.timeout_s,
            )
        except TimestampError as exc:
            print(f"no time stamp now ({exc.reason}: {exc.detail})", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    config = load(args)
    jwks = gateway_jwks(config)

    async def run() -> dict[str, Any] | None:
        async with open_store(config, readonly=False) as store:
            async with store.snapshot() as snap:
                found = [
                    m
                    for m in await snap.messages_by_id(args.message_id.lower())
                    if args.client is None or m["client"] == args.client
                ]
                if len(found) != 1:
                    _not_one(args, found)
                    return None
                message = found[0]
                callbacks = await snap.callbacks_of(message["seq"])
                span = await snap.own_events(message["seq"], [c["seq"] for c in callbacks])
                covered = span is None or await snap.checkpoint_covering(span[1]) is not None
            if not covered:
                # Sign now rather than wait for the gateway's next checkpoint.
                keypair = load_gateway_keypair(config.gateway)
                await make_checkpoint(store, keypair, config.gateway.member_id)
            await _stamp_now(config, store)
            async with store.snapshot() as snap:
                return await export_bundle(snap, message, jwks, store.secrets)

    bundle = asyncio.run(run())
    if bundle is None:
        return 1
    raw = canonical_bundle(bundle)
    report = check_bundle(raw, jwks)
    if not report.ok:
        print(
            f"the bundle does not verify ({report.problem}); run `gateway audit verify`",
            file=sys.stderr,
        )
        return 1
    Path(args.out).write_bytes(raw)
    for suffix, data in stamp_files(bundle).items():
        Path(args.out + suffix).write_bytes(data)  # for openssl ts -verify (docs/audit.md)
    for line in report.summary:
        print(line)
    print(f"wrote {args.out} ({len(raw)} bytes)")
    if "timestamp" not in bundle:
        print("its checkpoint has no TSA time stamp (yet)")
    return 0


def _not_one(args: argparse.Namespace, found: list[dict[str, Any]]) -> None:
    if not found:
        print(f"no message {args.message_id}", file=sys.stderr)
    else:
        clients = ", ".join(m["client"] for m in found)
        print(f"several senders used {args.message_id} ({clients}): pass --client", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    trusted = read_json(args.jwks, StoreError) if args.jwks else None
    report = check_bundle(raw, trusted)
    for line in report.summary:
        print(line)
    if not report.ok:
        print(f"BROKEN: {report.problem}")
        return 1
    if report.trusted:
        print(f"OK: verified against {args.jwks}")
        return 0
    print(
        "CONSISTENT, but checked only against the key inside the bundle: this proves nothing "
        "about who signed it; pass --jwks with the gateway's published JWKS"
    )
    return EXIT_UNTRUSTED


def cmd_purge(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        print("--older-than must not be negative", file=sys.stderr)
        return 2
    config = load(args)
    now = time.time()
    cutoff = now - args.older_than * 86400

    async def run() -> tuple[int, int]:
        async with open_store(config, readonly=False) as store:
            return await store.purge_bodies(cutoff, now)

    messages, callbacks = asyncio.run(run())
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff))
    print(
        f"purged the bodies of {messages} message(s) and {callbacks} callback(s) created "
        f"before {since}; their digests stay in the chain"
    )
    return 0
