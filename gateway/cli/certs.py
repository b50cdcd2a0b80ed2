"""``gateway certs ca|issue|revoke``: a local CA for the local (mTLS) listener, member
and server certificates from it, and its CRL; ``issue`` prints the config lines to add."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.exchange.certs import issue, make_ca, revoke

__all__ = ["register"]


def _pair(stem: str) -> tuple[Path, Path]:
    """``keys/local-ca`` → (``keys/local-ca.crt``, ``keys/local-ca.key``)."""
    base = Path(stem)
    return base.with_name(base.name + ".crt"), base.with_name(base.name + ".key")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="a local CA and certificates for mTLS members")
    area = certs.add_subparsers(dest="action", required=True)
    ca = area.add_parser("ca", help="make a CA: STEM.crt and STEM.key (0600)")
    ca.add_argument("--out", required=True, metavar="STEM", help="e.g. keys/local-ca")
    ca.add_argument("--name", default="Gateway local CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650)
    ca.set_defaults(func=cmd_ca)
    iss = area.add_parser(
        "issue", help="issue a member's client certificate (or --host: a server's)"
    )
    iss.add_argument("--ca", required=True, metavar="STEM", help="the CA, e.g. keys/local-ca")
    who = iss.add_mutually_exclusive_group(required=True)
    who.add_argument("--member", help="member id, put in the subject CN and SAN URI")
    who.add_argument("--host", action="append", help="a server name or IP (repeatable)")
    iss.add_argument("--out", required=True, metavar="STEM", help="e.g. keys/legacy-records")
    iss.add_argument("--days", type=int, default=825)
    iss.set_defaults(func=cmd_issue)
    rev = area.add_parser("revoke", help="add certificates to the CA's CRL (made if missing)")
    rev.add_argument("--ca", required=True, metavar="STEM")
    rev.add_argument("--crl", required=True, type=Path, help="e.g. keys/local-ca.crl")
    rev.add_argument("cert", nargs="+", type=Path, help="PEM certificates to revoke")
    rev.set_defaults(func=cmd_revoke)


def cmd_ca(args: argparse.Namespace) -> int:
    cert, key = _pair(args.out)
    made = make_ca(cert, key, name=args.name, days=args.days)
    print(f"wrote {cert} and {key} (0600); sha256 {made.fingerprint}")
    print("# the local listener trusts it (config.yaml):")
    print("listen:")
    print("  local:")
    print("    host: 127.0.0.1")
    print("    port: 8443")
    print(f"    tls: {{cert: <server>.crt, key: <server>.key, client_ca: {cert}}}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    ca_cert, ca_key = _pair(args.ca)
    cert, key = _pair(args.out)
    made = issue(
        ca_cert, ca_key, cert, key, member=args.member, hosts=args.host or (), days=args.days
    )
    print(f"wrote {cert} and {key} (0600); sha256 {made.fingerprint}")
    if args.member is None:
        print(f"# the listener serves it: tls: {{cert: {cert}, key: {key}, ...}}")
        return 0
    print("# add to config.yaml under members: (either line authenticates it)")
    print(f'  - id: "{args.member}"')
    print("    kind: system")
    print("    auth: [mtls]")
    print(f'    certificates: ["{made.fingerprint}"]   # this certificate only')
    print(f"    certificate_ca: {ca_cert}          # or: any from this CA naming the member")
    print("    services: []")
    print("# or register the fingerprint on a running gateway:")
    print(f'#   POST /admin/v1/members/{args.member}/certificates {{"fingerprint": ...}}')
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    ca_cert, ca_key = _pair(args.ca)
    count = revoke(ca_cert, ca_key, args.crl, args.cert)
    print(f"wrote {args.crl}: {count} revoked; the gateway re-reads it on its next request")
    return 0
