#!/usr/bin/env python3
"""Set up and run the gateway, or its test suite, on a fresh clone with only python3.

    python3 dev.py run     # venv + install, then gateway, simulator and demo system
    python3 dev.py test    # venv + install, then ruff, mypy (strict) and pytest
    python3 dev.py test --fast   # the inner loop: ruff, then the unit-level tests only

The virtual environment lives in .venv and is reinstalled when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed"


def _sh(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, env=env)


def _test_env() -> dict[str, str]:
    """The test steps keep compiled bytecode, pytest's rewritten test modules too, under
    .venv/pycache (never in the tree): without it (PYTHONDONTWRITEBYTECODE) every run
    compiles and rewrites all ~170 modules again (about 3 s of CPU a run)."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(VENV / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    _sh(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip")
    _sh(BIN / "python", "-m", "pip", "install", "-q", "-e", ".[dev]")
    STAMP.write_text(wanted)


_apt_updated = False


def _apt_install(package: str) -> None:
    """``apt-get install -y PACKAGE``, with one ``apt-get update`` per run first."""
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "install", "-y", "-q", package]]
    if not _apt_updated:
        steps.insert(0, ["apt-get", "update", "-q"])
    for args in steps:
        print("+", " ".join(args), flush=True)
        subprocess.run(args, check=True, env=env)
    _apt_updated = True


CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> None:
    """The console's browser tests drive Debian's chromium (tests/test_console_browser.py;
    Playwright's own browser download cannot work here): install it when missing and we
    may (root, Debian), else say how."""
    if Path(CHROMIUM).exists():
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install("chromium")
        return
    print(
        f"chromium is not installed at {CHROMIUM}, so the console's browser tests will skip "
        "(under CI=true they fail): install it with `sudo apt-get install chromium`.",
        flush=True,
    )


def _postgres_installed() -> bool:
    found = list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")
    return bool(found or os.environ.get("GATEWAY_PG_BIN"))


def ensure_postgres() -> None:
    """The PostgreSQL tests start their own server (tests/pg.py) from the installed
    binaries: install them when missing and we may (root, Debian), else say how."""
    if os.environ.get("GATEWAY_TEST_PG_DSN") or _postgres_installed():
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        # Only the binaries: no cluster of the package's own left running.
        conf = Path("/etc/postgresql-common/createcluster.conf")
        if not conf.exists():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text("create_main_cluster = false\n")
        _apt_install("postgresql")
        return
    print(
        "PostgreSQL is not installed, so its tests will skip (under CI=true they fail): "
        "install it with `sudo apt-get install postgresql`, or point GATEWAY_TEST_PG_DSN "
        "at a server where this role may create databases.",
        flush=True,
    )


def ensure_openssl() -> None:
    """The SM2 tests use the OpenSSL command line as an independent peer (tests/test_sm2.py):
    install it when missing and we may (root, Debian)."""
    missing = shutil.which("openssl") is None and shutil.which("apt-get") is not None
    if missing and os.name == "posix" and os.geteuid() == 0:
        _apt_install("openssl")


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def ensure_softhsm() -> None:
    """The PKCS#11 tests make a SoftHSM2 token of their own (tests/test_hsm.py) and read it
    with OpenSC's pkcs11-tool as an independent party: install both when missing and we
    may (root, Debian), else say how."""
    wanted = [
        package
        for package, present in (
            ("softhsm2", Path(SOFTHSM_MODULE).exists() and shutil.which("softhsm2-util")),
            ("opensc", shutil.which("pkcs11-tool")),
        )
        if not present
    ]
    if not wanted:
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        for package in wanted:
            _apt_install(package)
        return
    print(
        f"{' and '.join(wanted)} not installed, so the PKCS#11 tests will skip (under CI=true "
        f"they fail): install with `sudo apt-get install {' '.join(wanted)}`.",
        flush=True,
    )


def ensure_wrk() -> None:
    """The benchmark's load generator (bench/load.py; tests/test_bench.py runs it, and
    under CI=true fails without it): install it when missing and we may (root, Debian),
    else say how."""
    if shutil.which("wrk"):
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install("wrk")
        return
    print(
        "wrk is not installed, so the benchmark falls back to its Python load generator and "
        "its wrk test skips (under CI=true it fails): install it with `sudo apt-get install wrk`.",
        flush=True,
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test"}:
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "run":
        cmd = [str(BIN / "gateway"), "up", "--config", str(ROOT / "config.yaml"), *argv[1:]]
        try:
            return subprocess.call(cmd, cwd=ROOT)
        except KeyboardInterrupt:
            return 0
    ensure_postgres()
    ensure_openssl()
    ensure_softhsm()
    ensure_wrk()
    steps: list[list[str | Path]]
    if "--fast" in argv[1:]:
        # No mypy and no coverage: the whole `test` stays the gate (tests/conftest.py).
        steps = [[BIN / "ruff", "check", "."], [BIN / "python", "-m", "pytest", *argv[1:]]]
    else:
        ensure_chromium()
        steps = [
            [BIN / "ruff", "check", "."],
            [BIN / "ruff", "format", "--check", "."],
            [BIN / "mypy"],
            [BIN / "python", "-m", "pytest", "--cov", "--cov-report=term:skip-covered", *argv[1:]],
        ]
    env = _test_env()
    for step in steps:
        try:
            _sh(*step, env=env)
        except subprocess.CalledProcessError as exc:
            return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
