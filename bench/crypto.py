"""Microseconds per signature operation, as the gateway does them: Ed25519 through
libsodium (PyNaCl) and SM2 with SM3 through the system's libcrypto (gateway/crypto/sm2.py).

    .venv/bin/python -m bench.crypto [--n 2000] [--size 400]

Each figure is the median of five timed runs of ``n`` operations over a ``size``-byte
message (about a signature base's size), in CPU time of the measuring thread: on a
shared machine wall time says more about the neighbours than about the operation.
Where gmssl-pyx is installed (it is not a dependency), its SM2 is measured too, for
docs/decisions.md's comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

from nacl.signing import SigningKey

from gateway.crypto.sm2 import SIGNER_ID, Sm2PrivateKey

__all__ = ["main", "per_op_us"]


def per_op_us(operation: Callable[[], object], n: int) -> float:
    """The median over five runs of the CPU time one call of ``operation`` takes, in µs."""
    runs = []
    for _ in range(5):
        started = time.thread_time()
        for _ in range(n):
            operation()
        runs.append((time.thread_time() - started) / n * 1e6)
    return statistics.median(runs)


def _gmssl_pyx(message: bytes, n: int) -> tuple[float, float] | None:
    try:
        import gmssl_pyx  # type: ignore[import-not-found]
    except ImportError:
        return None
    public, private = gmssl_pyx.sm2_key_generate()
    signature = gmssl_pyx.sm2_sign(private, public, message, signer_id=SIGNER_ID)
    return (
        per_op_us(lambda: gmssl_pyx.sm2_sign(private, public, message, signer_id=SIGNER_ID), n),
        per_op_us(lambda: gmssl_pyx.sm2_verify(public, message, signature, signer_id=SIGNER_ID), n),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crypto", description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="operations per timed run")
    parser.add_argument("--size", type=int, default=400, help="message bytes")
    args = parser.parse_args(argv)
    message = b"x" * args.size
    ed = SigningKey.generate()
    ed_signature = ed.sign(message).signature
    sm2 = Sm2PrivateKey.generate()
    sm2_public = sm2.public_key()
    sm2_signature = sm2.sign(message)
    rows = {
        "ed25519 (libsodium)": (
            per_op_us(lambda: ed.sign(message), args.n),
            per_op_us(lambda: ed.verify_key.verify(message, ed_signature), args.n),
        ),
        "sm2-sm3 (libcrypto)": (
            per_op_us(lambda: sm2.sign(message), args.n),
            per_op_us(lambda: sm2_public.verify(sm2_signature, message), args.n),
        ),
    }
    gmssl = _gmssl_pyx(message, max(1, args.n // 10))
    if gmssl is not None:
        rows["sm2-sm3 (gmssl-pyx)"] = gmssl
    print(f"{'µs per operation':<22} {'sign':>8} {'verify':>8}   ({args.size}-byte message)")
    for name, (sign_us, verify_us) in rows.items():
        print(f"{name:<22} {sign_us:>8.1f} {verify_us:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
