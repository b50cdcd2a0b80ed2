"""Files that hold secrets (private keys, passphrases, PINs): refused when group or
others may read them, as OpenSSH refuses a private key."""

from __future__ import annotations

import stat
from pathlib import Path

from gateway.errors import ConfigError

__all__ = ["check_private_file"]


def check_private_file(path: Path, what: str = "private key") -> None:
    """Refuse a secret (private key, passphrase) that group or others could read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read {what} ({exc.strerror})"]) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError([f"{path}: {what} is accessible by group or others (chmod 600)"])
