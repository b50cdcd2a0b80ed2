"""Microseconds per signature made in a PKCS#11 token (SoftHSM2, through gateway/crypto/hsm.py)
beside the same key type in process, and what a hop to a thread costs.

    .venv/bin/python -m bench.hsm [--n 2000]

It makes a SoftHSM2 token of its own in a temp dir (``softhsm2-util``; SOFTHSM2_CONF is
set for this process only). Each figure is the median of five timed runs of ``n``
operations over a 400-byte message, in wall time: signing in the token blocks the
caller for that long, which is what decides whether it belongs in a thread
(docs/decisions.md, Keys in hardware).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

__all__ = ["main"]

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def per_op_us(operation: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            operation()
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


async def _hop_us(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await asyncio.to_thread(lambda: None)
    return (time.perf_counter() - started) / n * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "tokens").mkdir()
        conf = base / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {base / 'tokens'}\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin = secrets.token_hex(8)
        pin_file = base / "pin"
        pin_file.write_text(pin)
        pin_file.chmod(0o600)
        init = ["--init-token", "--free", "--label", "bench", "--pin", pin]
        subprocess.run(  # noqa: S603 - our own arguments, no shell
            [shutil.which("softhsm2-util") or "softhsm2-util", *init, "--so-pin", pin[::-1]],
            check=True,
            capture_output=True,
        )
        from gateway.crypto.hsm import Pkcs11Uri, generate_key  # after SOFTHSM2_CONF is set

        message = b"x" * 400
        ed = ed25519.Ed25519PrivateKey.generate()
        p256 = ec.generate_private_key(ec.SECP256R1())
        for kind, local in (
            ("ed25519", lambda: ed.sign(message)),
            ("ecdsa-p256", lambda: p256.sign(message, ec.ECDSA(hashes.SHA256()))),
        ):
            uri = Pkcs11Uri.parse(
                f"pkcs11:token=bench;object={kind}?module-path={MODULE}&pin-source=file:{pin_file}"
            )
            key = generate_key(uri, kind, key_id=kind.encode())  # type: ignore[arg-type]
            token_us = per_op_us(lambda key=key: key.sign(message), args.n)  # type: ignore[misc]
            local_us = per_op_us(local, args.n)
            print(f"{kind:11} token {token_us:7.1f} µs/sign   in process {local_us:6.1f} µs/sign")
        print(f"asyncio.to_thread hop {asyncio.run(_hop_us(args.n)):.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
