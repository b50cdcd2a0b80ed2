"""Configuration: ``config.yaml`` validated by ``schemas/config.schema.json``, then frozen.

Paths in the file are relative to the file itself. JWKs and JSON Schemas may be given
inline or as paths; they are read here, so the rest of the gateway sees plain data.
Every problem is reported with its location (a JSON Pointer into the file), all at once.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from gateway.config.outbound import OutboundPolicy, networks
from gateway.config.secretstore import resolve_document
from gateway.crypto.hsm import Pkcs11Uri, is_pkcs11_uri
from gateway.errors import ConfigError

__all__ = [
    "MEMBER_ID_PATTERN",
    "SCHEMA_DIR",
    "AdapterConfig",
    "ClientTls",
    "Config",
    "DeliveryConfig",
    "DirectoryConfig",
    "GatewayIdentity",
    "Listen",
    "LocalListen",
    "LoggingConfig",
    "MemberConfig",
    "MonitoringConfig",
    "RateLimit",
    "RouteConfig",
    "SecretsConfig",
    "SecurityConfig",
    "ServiceConfig",
    "SimulatorConfig",
    "StoreConfig",
    "TimestampingConfig",
    "TlsConfig",
    "TracingConfig",
    "is_loopback",
    "jwk_path_for",
    "listen_address",
    "load_config",
    "parse_config",
    "region_within",
    "warnings_of",
    "with_listeners",
]

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
# <region>:<system>; written once, in the config schema, which every other use reads.
with (SCHEMA_DIR / "config.schema.json").open(encoding="utf-8") as _fh:
    MEMBER_ID_PATTERN: str = json.load(_fh)["$defs"]["member_id"]["pattern"]
MemberKind = Literal["system", "gateway", "platform"]
NATIONAL_REGION = "100000"


def region_within(region: str, area: str) -> bool:
    """Whether GB/T 2260 ``region`` is ``area`` or one of its sub-regions: a province
    (``330000``) holds its cities (``3301xx``) and counties, a city (``330100``) its
    counties. ``100000`` (the national level) holds only itself."""
    if region == area or area == NATIONAL_REGION:
        return region == area
    if area.endswith("0000"):
        return region[:2] == area[:2]
    if area.endswith("00"):
        return region[:4] == area[:4]
    return False


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


Mode = Literal["sync", "async"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """TLS on a listener; with ``client_ca``, peers may (or must) present a certificate."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalListen:
    """``listen.local``: the listener for members that cannot sign (``auth: mtls``). A
    client certificate chaining to ``client_ca`` is always required; ``crl`` is re-read
    whenever it changes."""

    host: str = "127.0.0.1"
    port: int
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTls:
    """``gateway.client_tls``: the certificate the gateway presents on HTTPS callbacks,
    and the CA bundle those callback servers must chain to (None: the system's)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    host: str = "127.0.0.1"
    port: int
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayIdentity:
    member_id: str
    # ``gateway.key`` is a PEM path (key_path) or a PKCS#11 URI (key_uri), never both.
    key_path: Path | None
    jwk_path: Path
    # The URLs members sign as @target-uri (the first is the one announced); empty: the
    # ingress's own bound address, allowed only on loopback.
    public_urls: tuple[str, ...] = ()
    previous_keys: tuple[Mapping[str, Any], ...] = ()
    # Where the private key's passphrase comes from when the PEM is encrypted.
    key_passphrase_env: str | None = None
    key_passphrase_file: Path | None = None
    key_uri: Pkcs11Uri | None = None
    key_expires_at: float | None = None  # Unix time; else the public JWK's ``exp``, if any
    client_tls: ClientTls | None = None  # presented on HTTPS callbacks when configured

    @property
    def region(self) -> str:
        return self.member_id.split(":", 1)[0]

    @property
    def public_url(self) -> str | None:
        """The primary public URL (the one announced to the directory), if any."""
        return self.public_urls[0] if self.public_urls else None

    @property
    def rotated_keys_path(self) -> Path:
        """Public JWKs retired by ``gateway keys rotate``, each with its ``exp``
        (``keys/gateway.jwk.json`` → ``keys/gateway.previous.jwks.json``)."""
        name = self.jwk_path.name.removesuffix(".json").removesuffix(".jwk")
        return self.jwk_path.with_name(name + ".previous.jwks.json")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    path: Path
    # A postgresql:// URL puts the store on PostgreSQL (several instances share it);
    # GATEWAY_STORE_URL overrides it. Unset: the SQLite file at ``path``.
    url: str | None = None
    # WAL with synchronous=NORMAL survives a process crash; FULL also survives power loss.
    synchronous: Literal["normal", "full"] = "normal"
    # How often the message log's chain head is signed (a checkpoint); see docs/audit.md.
    checkpoint_interval_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TimestampingConfig:
    """Third-party time (gateway/audit/timestamping.py): every checkpoint stamped by an RFC 3161
    time-stamping authority at ``url``, its stamps verified against ``ca`` (and, when
    given, the TSA's own certificate ``cert``, pinned)."""

    url: str
    ca: Path
    cert: Path | None = None
    # Past this, unstamped checkpoints are a /readyz warning (never a reason).
    warn_after_s: float = 3600.0
    timeout_s: float = 10.0
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretsConfig:
    """Secrets at rest (gateway/config/secretstore.py): the key-encryption key that wraps the
    store's data keys, from a file (default ``<gateway key>.kek``, generated on the first
    start of a store without data keys) or an environment variable; the data keys' AEAD
    (None: SM4-GCM where ``cryptography`` has it, else AES-256-GCM)."""

    kek_file: Path | None = None
    kek_env: str | None = None
    cipher: Literal["sm4-gcm", "aes-256-gcm"] | None = None


# --- archive ---
@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """``log.retention``: archive the message log in the background (the instance that
    holds the store's ``log.retention`` lock; gateway/audit/retention.py, docs/audit.md)."""

    older_than_s: float  # records older than this leave the store for archive files
    to: Path  # the archive directory
    interval_s: float = 3600.0
    max_bytes: int = 64 * 1024 * 1024  # a file is split past this size
    hook: str | None = None  # COMMAND run as ``COMMAND FILE`` per archive, retried


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    retention: RetentionConfig | None = None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_s(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` in seconds (the schema checked the form)."""
    return float(text[:-1]) * _DURATION_UNITS[text[-1]]


def _log(data: Mapping[str, Any], r: _Reader) -> LogConfig:
    ret = data.get("retention")
    if ret is None:
        return LogConfig()
    return LogConfig(
        retention=RetentionConfig(
            older_than_s=duration_s(ret["older_than"]),
            to=r.path(ret["to"]),
            interval_s=duration_s(ret.get("every", "1h")),
            max_bytes=int(ret.get("max_mb", 64) * 1024 * 1024),
            hook=ret.get("hook"),
        )
    )


# --- end archive ---


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """A token bucket: ``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    clock_skew_s: int = 300
    max_body_bytes: int = 1024 * 1024
    max_field_errors: int = 20
    max_concurrent: int = 1024  # requests in flight on the ingress; more get 503 overloaded
    rate_limit: RateLimit | None = None  # per member, unless the member sets its own
    max_header_count: int = 100
    max_header_line_bytes: int = 8190  # the request line and each header field
    max_header_bytes: int = 32768  # the whole header section
    body_timeout_s: float = 30.0  # the body must arrive within this, once headers are in
    idle_timeout_s: float = 75.0  # an idle (or header-trickling) connection is closed
    max_json_depth: int = 64
    max_json_items: int = 100_000  # object members plus array items, in the whole document


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    workers: int = 16
    poll_interval_s: float = 0.2
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    max_attempts: int = 10
    max_age_s: float = 86400.0
    outbox_limit: int = 100_000
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    level: str = "INFO"
    format: Literal["json", "text"] = "text"  # json: one object per line, for production


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    # OTLP/HTTP traces endpoint; None leaves tracing off unless OTEL_EXPORTER_OTLP_* is set.
    otlp_endpoint: str | None = None
    service_name: str = "gov-exchange-gateway"


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitoringConfig:
    """Operational monitoring (gateway/exchange/monitoring.py): records kept ``retention_s``,
    written in batches off the request path from a queue of at most ``queue_limit``."""

    enabled: bool = True
    retention_s: float = 30 * 86400.0
    queue_limit: int = 10_000
    batch_size: int = 500
    flush_interval_s: float = 0.5
    # Members allowed GET /v1/monitoring/aggregates (X-Road's central monitoring).
    central: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberConfig:
    id: str
    kind: MemberKind
    name: str = ""
    enabled: bool = True
    keys: tuple[Mapping[str, Any], ...] = ()
    services: tuple[str, ...] = ()
    callback_url: str | None = None
    regions: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None
    revoked_keys: tuple[str, ...] = ()  # kids that may not come back without ?reinstate=true
    # Signature algorithms this member may use (empty: any its keys have), e.g. ("sm2-sm3",).
    allowed_algs: tuple[str, ...] = ()
    # Its callback URL came from the federation directory: the outbound policy applies.
    learnt: bool = False
    # How it proves itself: "signature" (RFC 9421), "mtls" (a client certificate on the
    # local listener), or both. A certificate never stands in for a signature-only member.
    auth: tuple[str, ...] = ("signature",)
    certificates: tuple[str, ...] = ()  # pinned SHA-256 fingerprints (lowercase hex)
    certificate_ca: Path | None = None  # a CA whose certificates naming this member count
    revoked_certificates: tuple[str, ...] = ()

    @property
    def region(self) -> str:
        return self.id.split(":", 1)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    code: str
    mode: Mode = "sync"
    allow_async: bool = False
    request_schema: Mapping[str, Any] | bool
    response_schema: Mapping[str, Any] | bool
    callback_schema: Mapping[str, Any] | bool | None = None
    timeout_s: float = 10.0
    max_body_bytes: int | None = None
    max_attempts: int | None = None
    max_age_s: float | None = None
    sensitive: tuple[str, ...] = ()  # JSON Pointers masked in logs and admin views
    # A later decision by callback supersedes the earlier: each is kept, in order, and
    # delivered to the member. Without it a different later decision is callback_conflict.
    supersede: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterConfig:
    name: str
    type: str
    enabled: bool = True
    concurrency: int = 64
    # Consecutive failures that open the circuit, and how long it stays open.
    failure_threshold: int = 5
    reset_timeout_s: float = 5.0
    # Whether its health() counts for /readyz (see gateway/exchange/health.py).
    readiness: bool = True
    # Its URLs came from the federation directory: the outbound policy applies.
    learnt: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    service: str
    adapter: str
    target: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectoryConfig:
    """The federation directory this gateway follows (``gateway/federation/follower.py``)."""

    url: str
    keys: tuple[Mapping[str, Any], ...]  # pinned national directory keys
    refresh_s: float = 30.0
    announce_url: str | None = None
    offers: tuple[str, ...] = ()
    # Past expires_at by more than this, cross-region traffic is refused (directory_stale).
    max_stale_s: float = 86400.0
    # Without a stored copy, a fetched directory below this version is refused.
    min_version: int = 1
    max_bytes: int = 1048576  # the most of a directory body that is read


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    member_id: str
    host: str = "127.0.0.1"
    port: int
    key_path: Path
    jwk_path: Path
    callback_delay_s: float = 0.5
    monitor_every_s: float = 10.0  # the national simulator's central-monitoring pulls


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    base: Path  # the directory relative paths are resolved against
    gateway: GatewayIdentity
    ingress: Listen
    admin: Listen
    store: StoreConfig
    security: SecurityConfig
    delivery: DeliveryConfig
    members: tuple[MemberConfig, ...]
    services: tuple[ServiceConfig, ...]
    adapters: tuple[AdapterConfig, ...]
    routes: tuple[RouteConfig, ...]
    simulators: Mapping[str, SimulatorConfig] = field(default_factory=dict)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    directory: DirectoryConfig | None = None
    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    timestamping: TimestampingConfig | None = None
    local: LocalListen | None = None  # listen.local: off unless configured
    log: LogConfig = field(default_factory=LogConfig)  # archive
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); ValueError if it is not."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def with_listeners(
    config: Config,
    *,
    ingress: tuple[str, int] | None = None,
    admin: tuple[str, int] | None = None,
    local: tuple[str, int] | None = None,
) -> Config:
    """``config`` listening elsewhere (``gateway serve --listen/--admin-listen``), so that
    several instances can share one file. The raw document changes too: the live
    configuration re-parses it on every admin write."""
    raw = copy.deepcopy(dict(config.raw))
    listen = raw.setdefault("listen", {})
    changes: dict[str, Any] = {}
    if local is not None and config.local is None:
        raise ConfigError(["--local-listen: the configuration has no listen.local"])
    for name, address in (("ingress", ingress), ("admin", admin), ("local", local)):
        if address is not None:
            host, port = address
            listen.setdefault(name, {}).update(host=host, port=port)
            changes[name] = dataclasses.replace(getattr(config, name), host=host, port=port)
    if not changes:
        return config
    moved = dataclasses.replace(config, raw=raw, **changes)
    problems = _destination_problems(moved)
    if problems:
        raise ConfigError(problems)
    return moved


def _instant(value: str | None, where: str, r: _Reader) -> float | None:
    """An RFC 3339 date-time with its offset, as Unix time."""
    if value is None:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        r.problems.append(f"{where}: {value!r} is not an RFC 3339 date-time with an offset")
        return None
    return parsed.timestamp()


def jwk_path_for(pem_path: Path) -> Path:
    """``keys/gateway.pem`` → ``keys/gateway.jwk.json``."""
    return pem_path.with_name(pem_path.name.removesuffix(".pem") + ".jwk.json")


def _pointer(path: Sequence[Any]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _config_schema() -> Mapping[str, Any]:
    with (SCHEMA_DIR / "config.schema.json").open(encoding="utf-8") as fh:
        loaded: Mapping[str, Any] = json.load(fh)
    return loaded


class _Reader:
    """Reads referenced files, collecting problems instead of stopping at the first."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[str] = []

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def json_ref(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            return value
        target = self.path(value)
        try:
            return json.loads(target.read_text(encoding="utf-8"))
        except OSError as exc:
            self.problems.append(f"{where}: cannot read {value} ({exc.strerror})")
        except json.JSONDecodeError as exc:
            self.problems.append(f"{where}: {value} is not JSON ({exc.msg} at line {exc.lineno})")
        return None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; raise ``ConfigError`` listing every problem."""
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from exc
    return parse_config(data, base=path.parent, path=path)


def parse_config(data: Any, *, base: Path, path: Path | None = None) -> Config:
    """Validate an already-parsed config document (the file, or an admin export)."""
    validator = jsonschema.Draft202012Validator(_config_schema())
    problems = [
        f"{_pointer(err.absolute_path)}: {err.message}"
        for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path)))
    ]
    if problems:
        raise ConfigError(problems)
    # Secret references ({"env": …}, {"file": …}) resolved for the runtime; ``raw`` keeps
    # them, so the reference is what is stored and shown.
    resolved, problems = resolve_document(data, base)
    if problems:  # the checks below would only repeat them, in other words
        raise ConfigError(problems)
    reader = _Reader(base)
    config = dataclasses.replace(_build(resolved, reader, path), raw=data)
    problems = reader.problems + _cross_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def _build(data: Mapping[str, Any], r: _Reader, path: Path | None) -> Config:
    gw = data["gateway"]
    key_uri, key_path = None, None
    if is_pkcs11_uri(gw["key"]):
        try:
            key_uri = Pkcs11Uri.parse(gw["key"], r.base)
        except ConfigError as exc:
            r.problems.extend(f"/gateway/key: {problem}" for problem in exc.problems)
        name = key_uri.object if key_uri is not None and key_uri.object else "gateway"
        jwk_path = r.path(gw.get("public_jwk", f"keys/{name}.jwk.json"))
    else:
        key_path = r.path(gw["key"])
        jwk_path = r.path(gw["public_jwk"]) if "public_jwk" in gw else jwk_path_for(key_path)
    listen = data.get("listen", {})
    members = tuple(
        MemberConfig(
            id=m["id"],
            kind=m["kind"],
            name=m.get("name", ""),
            enabled=m.get("enabled", True),
            keys=tuple(
                k
                for j, ref in enumerate(m.get("keys", []))
                if (k := r.json_ref(ref, f"/members/{i}/keys/{j}")) is not None
            ),
            services=tuple(m.get("services", [])),
            callback_url=m.get("callback_url"),
            regions=tuple(m.get("regions", [])),
            rate_limit=_rate_limit(m.get("rate_limit")),
            revoked_keys=tuple(m.get("revoked_keys", [])),
            allowed_algs=tuple(m.get("allowed_algs", [])),
            learnt=m.get("learnt", False),
            auth=tuple(m.get("auth", ["signature"])),
            certificates=tuple(m.get("certificates", [])),
            certificate_ca=r.path(m["certificate_ca"]) if "certificate_ca" in m else None,
            revoked_certificates=tuple(m.get("revoked_certificates", [])),
        )
        for i, m in enumerate(data["members"])
    )
    services = tuple(
        ServiceConfig(
            code=s["code"],
            mode=s.get("mode", "sync"),
            allow_async=s.get("allow_async", False),
            supersede=s.get("supersede", False),
            request_schema=_schema(
                r.json_ref(s["request_schema"], f"/services/{i}/request_schema")
            ),
            response_schema=_schema(
                r.json_ref(s["response_schema"], f"/services/{i}/response_schema")
            ),
            callback_schema=(
                r.json_ref(s["callback_schema"], f"/services/{i}/callback_schema")
                if "callback_schema" in s
                else None
            ),
            timeout_s=s.get("timeout_s", 10.0),
            max_body_bytes=s.get("max_body_bytes"),
            max_attempts=s.get("max_attempts"),
            max_age_s=s.get("max_age_s"),
            sensitive=tuple(s.get("sensitive", [])),
        )
        for i, s in enumerate(data["services"])
    )
    sims = {
        name: SimulatorConfig(
            member_id=s["member_id"],
            host=s.get("host", "127.0.0.1"),
            port=s["port"],
            key_path=r.path(s["key"]),
            jwk_path=jwk_path_for(r.path(s["key"])),
            callback_delay_s=s.get("callback_delay_s", 0.5),
            monitor_every_s=s.get("monitor_every_s", 10.0),
        )
        for name, s in data.get("simulators", {}).items()
    }
    return Config(
        path=path,
        base=r.base,
        gateway=GatewayIdentity(
            member_id=gw["member_id"],
            key_path=key_path,
            jwk_path=jwk_path,
            key_uri=key_uri,
            key_expires_at=_instant(gw.get("key_expires_at"), "/gateway/key_expires_at", r),
            public_urls=_public_urls(gw.get("public_url")),
            previous_keys=tuple(
                k
                for j, ref in enumerate(gw.get("previous_keys", []))
                if (k := r.json_ref(ref, f"/gateway/previous_keys/{j}")) is not None
            ),
            key_passphrase_env=gw.get("key_passphrase_env"),
            key_passphrase_file=(
                r.path(gw["key_passphrase_file"]) if "key_passphrase_file" in gw else None
            ),
            client_tls=_client_tls(gw.get("client_tls"), r),
        ),
        ingress=_listen(listen.get("ingress", {}), 8080, r),
        admin=Listen(**{"port": 8081, **listen.get("admin", {})}),
        store=StoreConfig(
            path=r.path(data.get("store", {}).get("path", "var/gateway.db")),
            synchronous=data.get("store", {}).get("synchronous", "normal"),
            url=data.get("store", {}).get("url"),
            checkpoint_interval_s=data.get("store", {}).get("checkpoint_interval_s", 60.0),
        ),
        security=SecurityConfig(
            **{
                **data.get("security", {}),
                "rate_limit": _rate_limit(data.get("security", {}).get("rate_limit")),
            }
        ),
        delivery=DeliveryConfig(**data.get("delivery", {})),
        members=members,
        services=services,
        adapters=tuple(
            AdapterConfig(
                name=a["name"],
                type=a["type"],
                enabled=a.get("enabled", True),
                concurrency=a.get("concurrency", 64),
                failure_threshold=a.get("breaker", {}).get("failure_threshold", 5),
                reset_timeout_s=a.get("breaker", {}).get("reset_timeout_s", 5.0),
                readiness=a.get("readiness", True),
                learnt=a.get("learnt", False),
                config=a.get("config", {}),
            )
            for a in data["adapters"]
        ),
        routes=tuple(
            RouteConfig(service=x["service"], adapter=x["adapter"], target=x.get("target"))
            for x in data["routes"]
        ),
        simulators=sims,
        monitoring=_monitoring(data.get("monitoring", {})),
        logging=LoggingConfig(
            level=str(data.get("logging", {}).get("level", "INFO")).upper(),
            format=data.get("logging", {}).get("format", "text"),
        ),
        tracing=TracingConfig(**data.get("tracing", {})),
        directory=_directory(data.get("directory"), r),
        outbound=_outbound(data.get("outbound", {}), r),
        secrets=_secrets(data.get("secrets", {}), key_path or jwk_path, r),
        timestamping=_timestamping(data.get("timestamping"), r),
        local=_local(listen.get("local"), r),
        log=_log(data.get("log", {}), r),  # archive
        raw=data,
    )


def _timestamping(data: Mapping[str, Any] | None, r: _Reader) -> TimestampingConfig | None:
    if not data:
        return None
    return TimestampingConfig(
        url=data["url"],
        ca=r.path(data["ca"]),
        cert=r.path(data["cert"]) if "cert" in data else None,
        warn_after_s=float(data.get("warn_after", 3600.0)),
        timeout_s=float(data.get("timeout_s", 10.0)),
        retry_base_s=float(data.get("retry_base_s", 1.0)),
        retry_max_s=float(data.get("retry_max_s", 300.0)),
    )


def _outbound(data: Mapping[str, Any], r: _Reader) -> OutboundPolicy:
    try:
        allowed = networks(data.get("allow_networks", []))
    except ValueError as exc:
        r.problems.append(f"/outbound/allow_networks: {exc}")
        allowed = ()
    return OutboundPolicy(allow_http=data.get("allow_http", False), allow_networks=allowed)


def _directory(data: Mapping[str, Any] | None, r: _Reader) -> DirectoryConfig | None:
    if data is None:
        return None
    return DirectoryConfig(
        url=data["url"],
        keys=tuple(
            k
            for j, ref in enumerate(data["keys"])
            if (k := r.json_ref(ref, f"/directory/keys/{j}")) is not None
        ),
        refresh_s=data.get("refresh_s", 30.0),
        announce_url=data.get("announce_url"),
        offers=tuple(data.get("offers", [])),
        max_stale_s=data.get("max_stale_s", 86400.0),
        min_version=data.get("min_version", 1),
        max_bytes=data.get("max_bytes", 1048576),
    )


def _secrets(data: Mapping[str, Any], key_path: Path, r: _Reader) -> SecretsConfig:
    kek = data.get("kek", {})
    env = kek.get("env")
    # Beside the signing key (or, for a key in a token, beside its public JWK).
    stem = key_path.name.removesuffix(".pem").removesuffix(".jwk.json")
    default = key_path.with_name(stem + ".kek")
    return SecretsConfig(
        kek_env=env,
        kek_file=None if env is not None else r.path(kek["file"]) if "file" in kek else default,
        cipher=data.get("cipher"),
    )


def _public_urls(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``gateway.public_url``: one URL or a list, each without its trailing slash."""
    if value is None:
        return ()
    urls = [value] if isinstance(value, str) else list(value)
    return tuple(u.rstrip("/") for u in urls)


def _rate_limit(data: Mapping[str, Any] | None) -> RateLimit | None:
    return RateLimit(**data) if data is not None else None


def _listen(data: Mapping[str, Any], port: int, r: _Reader) -> Listen:
    tls = data.get("tls")
    return Listen(
        host=data.get("host", "127.0.0.1"),
        port=data.get("port", port),
        tls=TlsConfig(
            cert=r.path(tls["cert"]),
            key=r.path(tls["key"]),
            client_ca=r.path(tls["client_ca"]) if "client_ca" in tls else None,
            require_client_cert=tls.get("require_client_cert", False),
        )
        if tls is not None
        else None,
    )


def _local(data: Mapping[str, Any] | None, r: _Reader) -> LocalListen | None:
    if data is None:
        return None
    tls = data["tls"]
    return LocalListen(
        host=data.get("host", "127.0.0.1"),
        port=data["port"],
        cert=r.path(tls["cert"]),
        key=r.path(tls["key"]),
        client_ca=r.path(tls["client_ca"]),
        crl=r.path(tls["crl"]) if "crl" in tls else None,
    )


def _client_tls(data: Mapping[str, Any] | None, r: _Reader) -> ClientTls | None:
    if data is None:
        return None
    return ClientTls(
        cert=r.path(data["cert"]),
        key=r.path(data["key"]),
        ca=r.path(data["ca"]) if "ca" in data else None,
    )


def _schema(loaded: Any) -> Mapping[str, Any] | bool:
    """A loaded schema; one that could not be read (already reported) stands in as {}.
    ``false`` (reject everything) must stay ``false``."""
    schema: Mapping[str, Any] | bool = {} if loaded is None else loaded
    return schema


def _duplicates(values: Sequence[Any]) -> set[Any]:
    seen: set[Any] = set()
    return {v for v in values if v in seen or seen.add(v)}  # type: ignore[func-returns-value]


def _cross_check(config: Config) -> list[str]:
    """Problems the JSON Schema cannot see: references between sections, keys, schemas."""
    from gateway.crypto.keys import (
        VerificationKey,  # local: keys imports errors only, no cycle risk
    )

    problems: list[str] = []
    codes = [s.code for s in config.services]
    names = [a.name for a in config.adapters]
    for dup in _duplicates([m.id for m in config.members]):
        problems.append(f"/members: member {dup} is defined twice")
    for dup in _duplicates(codes):
        problems.append(f"/services: service {dup} is defined twice")
    for dup in _duplicates(names):
        problems.append(f"/adapters: adapter {dup} is defined twice")
    for dup in _duplicates([(r.service, r.target) for r in config.routes]):
        problems.append(f"/routes: route {dup[0]} (target {dup[1]}) is defined twice")
    for i, m in enumerate(config.members):
        kids: list[str] = []
        for j, jwk in enumerate(m.keys):
            try:
                kids.append(VerificationKey.from_jwk(jwk).kid)
            except (ValueError, TypeError, AttributeError) as exc:
                problems.append(f"/members/{i}/keys/{j}: {exc}")
        for dup in _duplicates(kids):
            problems.append(f"/members/{i}/keys: kid {dup} appears twice")
        for kid in kids:
            if kid in m.revoked_keys:
                problems.append(f"/members/{i}/keys: kid {kid} is revoked for this member")
        for j, code in enumerate(m.services):
            if code not in codes:
                problems.append(f"/members/{i}/services/{j}: unknown service {code}")
        for fp in m.certificates:
            if fp in m.revoked_certificates:
                problems.append(f"/members/{i}/certificates: {fp} is revoked for this member")
        if "mtls" in m.auth and m.kind != "system":
            problems.append(f"/members/{i}/auth: only a system may authenticate by mtls")
        if m.kind == "gateway" and not m.regions:
            problems.append(f"/members/{i}/regions: a peer gateway needs the regions it serves")
    for i, s in enumerate(config.services):
        for part in ("request_schema", "response_schema", "callback_schema"):
            schema = getattr(s, part)
            if schema is None:
                continue
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                where = _pointer([*exc.absolute_path])
                problems.append(
                    f"/services/{i}/{part}: not a valid Draft 2020-12 schema at {where}"
                )
        if s.mode == "async" and s.callback_schema is None:
            problems.append(f"/services/{i}/callback_schema: an async service needs one")
    problems += _destination_problems(config)
    tls = config.ingress.tls
    if tls is not None and tls.require_client_cert and tls.client_ca is None:
        problems.append("/listen/ingress/tls: require_client_cert needs a client_ca")
    for i, r in enumerate(config.routes):
        if r.service not in codes:
            problems.append(f"/routes/{i}/service: unknown service {r.service}")
        if r.adapter not in names:
            problems.append(f"/routes/{i}/adapter: unknown adapter {r.adapter}")
    return problems


def _destination_problems(config: Config) -> list[str]:
    """Requests are bound to their destination: beyond loopback, the URL members sign
    (@target-uri) must be configured, not taken from whatever Host a request names."""
    problems = []
    if not config.gateway.public_urls and not is_loopback(config.ingress.host):
        problems.append(
            f"/gateway/public_url: the ingress listens on {config.ingress.host}, beyond "
            "loopback, so it needs the URL(s) members sign as @target-uri (public_url)"
        )
    for j, url in enumerate(config.gateway.public_urls):
        rest = url.split("://", 1)[-1]
        if "?" in rest or "#" in rest or not rest.split("/", 1)[0]:
            problems.append(
                f"/gateway/public_url: {url} must be scheme://host[:port][/path] "
                f"without query or fragment (entry {j})"
            )
    return problems


def warnings_of(config: Config) -> list[str]:
    """Valid but probably unintended: it loads, and the gateway answers for it at runtime."""
    warnings = []
    adapters = {a.name: (i, a) for i, a in enumerate(config.adapters)}
    for i, m in enumerate(config.members):
        if "mtls" in m.auth and not (m.certificates or m.certificate_ca):
            warnings.append(f"/members/{i}: mtls member {m.id} has no certificate (none admitted)")
        if "mtls" in m.auth and config.local is None:
            warnings.append(f"/members/{i}: mtls member {m.id} but no listen.local to come in")
    for i, s in enumerate(config.services):
        if not any(r.service == s.code for r in config.routes):
            warnings.append(f"/services/{i}: service {s.code} has no route (answers 503)")
        if s.mode != "async" and not s.allow_async:
            continue
        # A callback is taken only from the member a message went to: an adapter that
        # names none (http and mock, without ``receiver``) takes no callback at all.
        for route in config.routes:
            found = adapters.get(route.adapter) if route.service == s.code else None
            if found is None:
                continue
            j, adapter = found
            if adapter.type in ("http", "mock") and not adapter.config.get("receiver"):
                warnings.append(
                    f"/adapters/{j}/config: adapter {adapter.name} serves async {s.code} "
                    "but names no receiver: every callback for it answers 404"
                )
    return list(dict.fromkeys(warnings))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _monitoring(data: Mapping[str, Any]) -> MonitoringConfig:
    """``monitoring:``; ``retention`` is seconds or ``<n>s|m|h|d`` (the schema checks)."""
    retention = data.get("retention", "30d")
    if isinstance(retention, str):
        retention = float(retention[:-1]) * _UNITS[retention[-1]]
    return MonitoringConfig(
        enabled=data.get("enabled", True),
        retention_s=float(retention),
        queue_limit=data.get("queue_limit", 10_000),
        batch_size=data.get("batch_size", 500),
        flush_interval_s=data.get("flush_interval_s", 0.5),
        central=tuple(data.get("central", ())),
    )
