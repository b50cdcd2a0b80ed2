"""Microseconds per seal and open of a stored secret (gateway/config/secretstore.py), SM4-GCM
beside AES-256-GCM, and of the bare AEAD on ``size`` bytes (what issue 24's message
bodies will pay per record).

    .venv/bin/python -m bench.sealing [--n 2000] [--size 1024]

CPU time of the measuring thread, median of five runs of ``n``. A seal includes the read
of the store's data keys (a real SQLite store) that picks up another process's rotation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.crypto import per_op_us
from gateway.config.model import SecretsConfig
from gateway.config.secretstore import CIPHERS, SM4_GCM, CipherName, SecretBox, decrypt, encrypt
from gateway.store.sqlite import SQLiteStore

__all__ = ["main"]

MEMBER = {"id": "330000:x", "kind": "system", "keys": [{"kty": "oct", "kid": "a", "k": "A" * 43}]}


async def _per_op_us(operation: Callable[[], Awaitable[Any]], n: int) -> float:
    runs = []
    for _ in range(5):
        started = time.thread_time()
        for _ in range(n):
            await operation()
        runs.append((time.thread_time() - started) / n * 1e6)
    return statistics.median(runs)


async def _measure(alg: CipherName, directory: Path, n: int, size: int) -> dict[str, float]:
    store = SQLiteStore(directory / f"{alg}.db")
    box = SecretBox(store, SecretsConfig(kek_file=directory / "k.kek", cipher=alg), create=True)
    await store.open()
    try:
        await box.load()
        sealed = await box.seal("members", "330000:x", MEMBER)
        key = os.urandom(16 if alg == SM4_GCM else 32)
        data = os.urandom(size)
        blob = encrypt(alg, key, data, b"aad")
        return {
            "seal": await _per_op_us(lambda: box.seal("members", "330000:x", MEMBER), n),
            "open": await _per_op_us(lambda: box.open("members", "330000:x", sealed), n),
            "encrypt": per_op_us(lambda: encrypt(alg, key, data, b"aad"), n),
            "decrypt": per_op_us(lambda: decrypt(alg, key, blob, b"aad"), n),
        }
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="µs per seal/open, SM4-GCM and AES-256-GCM")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        for alg in CIPHERS:
            f = asyncio.run(_measure(alg, Path(directory), args.n, args.size))
            print(
                f"{alg:<12} seal a member {f['seal']:5.1f} µs, open {f['open']:5.1f} µs; "
                f"AEAD on {args.size} B: encrypt {f['encrypt']:5.1f} µs, "
                f"decrypt {f['decrypt']:5.1f} µs"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
