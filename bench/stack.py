"""The processes under test: upstream, bare, floor and the real gateway, on loopback.

Keys are generated into a temporary directory, with the gateway's config beside them;
every process logs to a file there, and all are terminated and waited for on exit.

With ``instances`` > 1 (on PostgreSQL, ``store_url``) several ``gateway serve``
processes share that one config file, each on its own ``--listen`` port; the
configured ``public_url`` is the first one's, so a request signed for it is valid at
every instance, as behind a load balancer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.load import Member
from gateway.config.model import jwk_path_for
from gateway.crypto.keys import KeyType, generate, write_keypair
from gateway.crypto.sm2 import Sm2PrivateKey
from gateway.serve.ports import free_port

__all__ = ["PORTAL_ID", "ROOT", "Stack", "example", "running"]

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas" / "services"
PORTAL_ID = "330000:one-stop-portal"
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Stack:
    """Base URLs of everything started, the member that signs the load, the store."""

    upstream: str
    bare: str
    floor: str
    gateway: str  # the first instance's URL, which is also the gateway's public_url
    member: Member
    store: Path
    gateway_pid: int  # `gateway serve` (with --workers, the supervisor of the workers)
    gateways: tuple[str, ...] = ()  # every instance (the first is ``gateway``)
    gateway_pids: tuple[int, ...] = ()
    store_url: str | None = None  # PostgreSQL; None: the SQLite file ``store``


def example(service: str) -> Any:
    """The first example document of a service's request schema."""
    schema = json.loads((SCHEMAS / service / "request.json").read_text(encoding="utf-8"))
    return schema["examples"][0]


def _write_keys(directory: Path, alg: KeyType = "ed25519") -> Member:
    """Fresh key pairs (PEM 0600 + JWK) for gateway, platform and member: Ed25519, or with
    ``alg="sm2"`` SM2 for the gateway and the member (the upstream signs only callbacks)."""
    pairs = {}
    for name in ("gateway", "national", "portal"):
        pem = directory / f"{name}.pem"
        kind: KeyType = "ed25519" if name == "national" else alg
        pairs[name] = write_keypair(generate(kind), pem, jwk_path_for(pem))
    portal = pairs["portal"].private
    assert isinstance(portal, ed25519.Ed25519PrivateKey | Sm2PrivateKey)  # as generated
    return Member(member_id=PORTAL_ID, key=portal, kid=pairs["portal"].kid)


def gateway_config(
    keys: Path,
    *,
    port: int,
    upstream: str,
    store: Path,
    store_url: str | None = None,
    monitoring: bool = True,
) -> dict[str, Any]:
    """The gateway's config: the member allowed both services, one http adapter;
    ``monitoring`` False turns the operational records off (bench/monitoring.py)."""
    return {
        "monitoring": {"enabled": monitoring},
        "gateway": {
            "member_id": "330000:gateway",
            "key": str(keys / "gateway.pem"),
            "public_url": f"http://127.0.0.1:{port}",
        },
        "listen": {
            "ingress": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": free_port()},
        },
        "store": {"path": str(store)} | ({"url": store_url} if store_url else {}),
        "members": [
            {
                "id": PORTAL_ID,
                "kind": "system",
                "keys": [str(keys / "portal.jwk.json")],
                "services": ["credit.query", "crossregion.apply"],
                "callback_url": f"{upstream}/callbacks",
            },
            {
                "id": "100000:national-platform",
                "kind": "platform",
                "keys": [str(keys / "national.jwk.json")],
                "regions": ["100000"],
            },
        ],
        "services": [
            {
                "code": "credit.query",
                "mode": "sync",
                "request_schema": str(SCHEMAS / "credit.query" / "request.json"),
                "response_schema": str(SCHEMAS / "credit.query" / "response.json"),
                "timeout_s": 10,
            },
            {
                "code": "crossregion.apply",
                "mode": "async",
                "request_schema": str(SCHEMAS / "crossregion.apply" / "request.json"),
                "response_schema": str(SCHEMAS / "crossregion.apply" / "response.json"),
                "callback_schema": str(SCHEMAS / "crossregion.apply" / "callback.json"),
                "timeout_s": 10,
            },
        ],
        "adapters": [
            {
                "name": "upstream",
                "type": "http",
                "config": {
                    "url": f"{upstream}/api/exchange/{{service}}",
                    "timeout_s": 10,
                    "receiver": "100000:national-platform",  # the upstream calls back as it
                },
            }
        ],
        "routes": [
            {"service": "credit.query", "adapter": "upstream"},
            {"service": "crossregion.apply", "adapter": "upstream"},
        ],
    }


def _ready(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def _process(
    name: str, command: Sequence[str], port: int, health: str, logs: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run one server until the block ends; fail early with its log if it never gets ready."""
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        # Our own interpreter and scripts, fixed arguments, no shell.
        process = subprocess.Popen(  # noqa: S603
            list(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _ready(port, health):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{_tail(log_path)}")
                time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def running(
    workdir: Path,
    *,
    gateway_workers: int = 1,
    loop: str = "auto",
    instances: int = 1,
    store_url: str | None = None,
    contenders: bool = True,
    alg: KeyType = "ed25519",
    monitoring: bool = True,
) -> Iterator[Stack]:
    """Start the upstream and the contenders (only the gateway without ``contenders``);
    stop them all when the block ends.

    With another ``alg`` than Ed25519 only the upstream and the gateway start (bare and
    floor are Ed25519's reference points; ``bare`` and ``floor`` are then empty)."""
    keys = workdir / "keys"
    member = _write_keys(keys, alg)
    logs = workdir / "logs"
    logs.mkdir()
    ports = {name: free_port() for name in ("upstream", "bare", "floor", "gateway")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    store = workdir / "gateway.db"
    config = workdir / "config.yaml"
    document = gateway_config(
        keys,
        port=ports["gateway"],
        upstream=url["upstream"],
        store=store,
        store_url=store_url,
        monitoring=monitoring,
    )
    config.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    # Every contender and the upstream run on the same event loop as the gateway.
    servers = [sys.executable, "-m", "bench.servers", f"--loop={loop}"]
    exchange = f"{url['upstream']}/api/exchange/credit.query"
    commands = {
        "upstream": [
            *servers,
            "upstream",
            f"--port={ports['upstream']}",
            f"--gateway-url={url['gateway']}",
            f"--key={keys / 'national.pem'}",
        ],
    }
    if alg != "ed25519":
        contenders = False
        url["bare"] = url["floor"] = ""
    if contenders:
        commands["bare"] = [*servers, "bare", f"--port={ports['bare']}", f"--upstream={exchange}"]
        commands["floor"] = [
            *servers,
            "floor",
            f"--port={ports['floor']}",
            f"--upstream={exchange}",
            f"--key={keys / 'gateway.pem'}",
            f"--client-jwk={keys / 'portal.jwk.json'}",
        ]
    serve = [
        str(Path(sys.executable).with_name("gateway")),
        "serve",
        f"--config={config}",
        f"--workers={gateway_workers}",
        f"--loop={loop}",
    ]
    gateway_ports = [ports["gateway"], *(free_port() for _ in range(instances - 1))]
    for i, port in enumerate(gateway_ports):
        name = "gateway" if i == 0 else f"gateway-{i}"
        ports[name] = port
        commands[name] = [
            *serve,
            f"--listen=127.0.0.1:{port}",
            f"--admin-listen=127.0.0.1:{free_port()}",
        ]
    with contextlib.ExitStack() as started:
        pids = {}
        for name, command in commands.items():
            health = "/healthz" if name.startswith("gateway") else "/health"
            process = started.enter_context(_process(name, command, ports[name], health, logs))
            pids[name] = process.pid
        gateways = tuple(f"http://127.0.0.1:{port}" for port in gateway_ports)
        yield Stack(
            upstream=url["upstream"],
            bare=url["bare"],
            floor=url["floor"],
            gateway=url["gateway"],
            member=member,
            store=store,
            gateway_pid=pids["gateway"],
            gateways=gateways,
            gateway_pids=tuple(pids[n] for n in commands if n.startswith("gateway")),
            store_url=store_url,
        )
