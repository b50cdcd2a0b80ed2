"""An independent checker of gateway archive files (docs/audit.md, "Archives"), written
from the format description alone: Python's hashlib, json and base64, and ``openssl`` for
the Ed25519 signatures. It imports nothing of the gateway; the test suite runs it with
``python -I``.

Usage: archive_checker.py GATEWAY_JWK_FILE ARCHIVE... ; exit 0 when every file holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")  # DER prefix of an Ed25519 key


class Broken(Exception):
    pass


def need(condition: bool, problem: str) -> None:
    if not condition:
        raise Broken(problem)


def b64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def openssl_verify(jwk: dict[str, Any], jws: str, tmp: Path) -> dict[str, Any]:
    """The payload of an EdDSA compact JWS, checked with openssl alone."""
    head, payload, sig = jws.split(".")
    header = json.loads(b64u(head))
    need(header.get("alg") == "EdDSA" and header.get("kid") == jwk["kid"], "unexpected key")
    der = ED25519_SPKI + b64u(jwk["x"])
    pem = "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n"
    (tmp / "key.pem").write_text(pem + "-----END PUBLIC KEY-----\n")
    (tmp / "in").write_bytes((head + "." + payload).encode())
    (tmp / "sig").write_bytes(b64u(sig))
    done = subprocess.run(
        [OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp / "key.pem"), "-rawin",
         "-in", str(tmp / "in"), "-sigfile", str(tmp / "sig")],
        capture_output=True,
        check=False,
    )  # fmt: skip
    need(done.returncode == 0, "a signature does not verify")
    out: dict[str, Any] = json.loads(b64u(payload))
    return out


def check(raw: bytes, jwk: dict[str, Any], tmp: Path) -> dict[str, Any]:
    need(raw.endswith(b"\n"), "truncated")
    cut = raw.rfind(b"\n", 0, len(raw) - 1) + 1
    body, last = raw[:cut], json.loads(raw[cut:])
    need(last["t"] == "signature", "no signature line")
    signed = openssl_verify(jwk, last["jws"], tmp)
    need(signed["sha256"] == hashlib.sha256(body).hexdigest(), "content not as signed")
    lines = [json.loads(x) for x in body.splitlines()]
    header: dict[str, Any] = lines[0]
    need(header["t"] == "header", "no header")
    need(header["format"] == "gw-archive/1", "unknown format")
    need((signed["name"], signed["gateway"]) == (header["name"], header["gateway"]), "names")
    seq, prev = header["first_seq"], header["prev_hash"]
    last_record = None
    checkpoint = None
    for line in lines[1:]:
        if line["t"] in ("record", "link"):
            need((line["seq"], line["prev_hash"]) == (seq, prev), f"break at {line['seq']}")
            if line["t"] == "record":
                facts = line["facts"].encode("ascii")
                need(hashlib.sha256(facts).hexdigest() == line["content_digest"], "facts")
                need(json.loads(facts)["seq"] == line["seq"], "facts name another seq")
                last_record = seq
            joined = (line["prev_hash"] + ":" + line["content_digest"]).encode("ascii")
            need(hashlib.sha256(joined).hexdigest() == line["hash"], f"hash at {seq}")
            seq, prev = seq + 1, line["hash"]
        elif line["t"] == "checkpoint":
            checkpoint = line
    need(last_record == header["last_seq"], "records end early")
    need(checkpoint is not None, "no checkpoint")
    assert checkpoint is not None
    need((checkpoint["seq"], checkpoint["hash"]) == (seq - 1, prev), "chain misses checkpoint")
    cp = openssl_verify(jwk, checkpoint["jws"], tmp)
    fields = ("seq", "hash", "at")
    need([cp[k] for k in fields] == [checkpoint[k] for k in fields], "checkpoint not as signed")
    return header


def main(argv: list[str]) -> int:
    jwk = json.loads(Path(argv[0]).read_text())
    bad = 0
    previous = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in argv[1:]:
            raw = Path(name).read_bytes()
            try:
                header = check(raw, jwk, Path(tmp))
                if previous is not None:
                    need(header["prev_archive"] == previous, "does not follow the previous")
                previous = hashlib.sha256(raw).hexdigest()
                print("OK", name)
            except (Broken, KeyError, ValueError) as exc:
                bad += 1
                print("BROKEN", name, exc)
    return 1 if bad else 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
