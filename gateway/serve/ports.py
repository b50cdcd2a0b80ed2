"""Free loopback ports for the processes the demo, the benchmark and the tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, chosen *outside* the kernel's ephemeral range.

    A port found by binding port 0 comes from the ephemeral range; between closing that
    socket and the server binding it, any outgoing connection may take it as its local
    port (seen as ``EADDRINUSE`` in test and benchmark runs). No outgoing connection is
    ever given a port outside the range, so a free one there stays free for the server.
    """
    ephemeral_low, ephemeral_high = _ephemeral_range()
    if ephemeral_low > 11_000:
        low, high = 10_000, ephemeral_low - 1
    else:
        low, high = ephemeral_high + 1, 65_535
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")
