"""``gateway admin …`` over the admin HTTP API: aligned tables for people, ``--json`` for
scripts.

Each command is one or a few calls through :class:`AdminClient`. A problem+json answer
becomes :class:`AdminError`, printed as its ``detail`` and each ``errors[]`` pointer and
message on stderr, with exit status 1. ``gateway admin token …`` (:mod:`gateway.cli.tokens`)
stays store-direct: the first token cannot come from an API that needs one.

Connection: ``--url``, else ``http://{listen.admin.host}:{listen.admin.port}`` from
``--config`` (default ``config.yaml`` if present, else the built-in listener default);
``--token``, else the environment variable ``GATEWAY_ADMIN_TOKEN`` (which, unlike an
argument, does not show in the process list).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from gateway.cli._common import plural, read_json, table, width
from gateway.encoding import iso_utc

__all__ = ["TOKEN_ENV", "AdminClient", "AdminError", "Output", "register"]

TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"  # noqa: S105 -- the name of a variable, not a secret
DEFAULT_CONFIG = "config.yaml"
API_PREFIX = "/admin/v1"
_CELL_MAX = 100  # characters of a nested value shown in a table; --json shows everything


class AdminError(Exception):
    """The admin API refused (problem+json), answered nonsense, or could not be reached."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        errors: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.errors = tuple(errors)

    @classmethod
    def from_response(cls, status: int, reason: str | None, raw: bytes) -> AdminError:
        try:
            problem = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = None
        if not isinstance(problem, Mapping) or not isinstance(problem.get("detail"), str):
            text = raw.decode("utf-8", "replace").strip()[:200]
            head = f"HTTP {status} {reason or ''}".rstrip()
            return cls(f"{head}: {text}" if text else head, status=status)
        errors = [
            (str(e.get("pointer", "")), str(e.get("message", "")))
            for e in problem.get("errors") or []
            if isinstance(e, Mapping)
        ]
        code = problem.get("code")
        return cls(
            problem["detail"],
            status=status,
            code=code if isinstance(code, str) else None,
            errors=errors,
        )

    def lines(self) -> list[str]:
        """What a person reads on stderr: the detail, then one line per field error."""
        tag = " ".join(str(p) for p in (self.status, self.code) if p is not None)
        head = f"error: {self.detail}" + (f" ({tag})" if tag else "")
        return [
            head,
            *(f"  {pointer or '(document)'}: {message}" for pointer, message in self.errors),
        ]


class AdminClient:
    """A thin client of ``/admin/v1`` on one ``aiohttp.ClientSession``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.token = token

    def url(self, segments: Sequence[str], query: Mapping[str, str | None] | None = None) -> URL:
        # Each segment is quoted on its own, so an id can never add a path level.
        path = "".join("/" + quote(s, safe=":@") for s in segments)
        params = {k: v for k, v in (query or {}).items() if v is not None}
        text = f"{self.base_url}{API_PREFIX}{path}" + (f"?{urlencode(params)}" if params else "")
        return URL(text, encoded=True)

    async def call(
        self,
        method: str,
        *segments: str,
        body: Any = None,
        query: Mapping[str, str | None] | None = None,
    ) -> Any:
        """The decoded JSON answer (``None`` for an empty one); ``AdminError`` for >= 400."""
        headers = {"Accept": "application/json, application/problem+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        url = self.url(segments, query)
        try:
            async with self.session.request(  # the bearer token goes to the admin listener only
                method, url, data=data, headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status, reason = resp.status, resp.reason
        except aiohttp.ClientConnectionError as exc:
            raise AdminError(f"cannot reach the admin API at {self.base_url}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise AdminError(f"the admin API at {self.base_url} failed: {exc}") from exc
        except TimeoutError as exc:
            raise AdminError(f"no answer from the admin API at {self.base_url} in time") from exc
        if status >= 400:
            raise AdminError.from_response(status, reason, raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdminError(f"{method} {url.path}: the answer is not JSON", status=status) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """A command's result: ``data`` is what ``--json`` prints, ``text`` what a person reads."""

    data: Any
    text: str


Command = Callable[[AdminClient, argparse.Namespace], Awaitable[Output]]


# Rendering ---------------------------------------------------------------------------


def _when(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return iso_utc(value)
    return "-" if value is None else str(value)


def _is_jwk(value: Any) -> bool:
    return isinstance(value, Mapping) and "kid" in value and "kty" in value


def _cell(value: Any) -> str:
    return _shown(value)[0]


def _shown(value: Any) -> tuple[str, bool]:
    """A value as one table cell, and whether it had to be shortened."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value) or "-", False
    if isinstance(value, list) and value and all(_is_jwk(v) for v in value):
        return ", ".join(f"{v['kid']} ({v['kty']})" for v in value), False
    if isinstance(value, Mapping | list):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if len(text) > _CELL_MAX:
            return text[: _CELL_MAX - 1] + "…", True
        return text, False
    return str(value), False


def fields(item: Mapping[str, Any], *, times: Sequence[str] = ()) -> str:
    """One resource as aligned ``key  value`` lines."""
    shown = {key: (_when(v), False) if key in times else _shown(v) for key, v in item.items()}
    widest = max(map(width, shown), default=0)
    lines = [f"{k}{' ' * (widest - width(k))}  {text}" for k, (text, _) in shown.items()]
    if any(cut for _, cut in shown.values()):
        lines.append("(… shortened; --json shows everything)")
    return "\n".join(lines)


def _enabled(item: Mapping[str, Any]) -> str:
    return _cell(item.get("enabled", True))


# Input files -------------------------------------------------------------------------


def _public_jwk(jwk: Any, where: str) -> Any:
    # A private key has no business on the wire; the API only ever needs the public half.
    if isinstance(jwk, Mapping) and "d" in jwk:
        raise AdminError(f"{where}: this JWK holds a private key; give its public JWK")
    return jwk


def _member_document(path: str) -> Any:
    """A member from a file; a key given as a string is a JWK file beside it (as in
    ``config.yaml``), read in here because the API takes only JWK objects."""
    member = read_json(path, AdminError)
    if isinstance(member, dict) and isinstance(member.get("keys"), list):
        base = Path.cwd() if path == "-" else Path(path).parent
        member["keys"] = [
            _public_jwk(
                read_json(str(base / k), AdminError) if isinstance(k, str) else k,
                f"{path}: /keys/{i}",
            )
            for i, k in enumerate(member["keys"])
        ]
    return member


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# Adapters ----------------------------------------------------------------------------


async def adapters_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "adapters")
    rows = [
        [
            a.get("name", ""),
            a.get("type", ""),
            _enabled(a),
            _cell(a.get("concurrency")),
            _cell((a.get("config") or {}).get("url")),
        ]
        for a in data.get("adapters", [])
    ]
    headers = ("NAME", "TYPE", "ENABLED", "CONCURRENCY", "URL")
    return Output(data=data, text=table(headers, rows, ("adapter", "adapters")))


async def adapters_get(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "adapters", args.name)
    return Output(data=data, text=fields(data))


async def adapters_add(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("POST", "adapters", body=read_json(args.file, AdminError))
    return Output(data=data, text=f"created adapter {data['name']} (type {data['type']})")


def _adapter_switch(enabled: bool) -> Command:
    async def switch(api: AdminClient, args: argparse.Namespace) -> Output:
        data = await api.call("PATCH", "adapters", args.name, body={"enabled": enabled})
        return Output(data=data, text=f"adapter {args.name} {'enabled' if enabled else 'disabled'}")

    return switch


async def adapters_health(api: AdminClient, args: argparse.Namespace) -> Output:
    names: list[str] = (
        [args.name]
        if args.name
        else [a["name"] for a in (await api.call("GET", "adapters")).get("adapters", [])]
    )
    reports = await asyncio.gather(*(api.call("GET", "adapters", n, "health") for n in names))
    rows = [
        [
            r.get("name", ""),
            r.get("type", ""),
            _cell(r.get("enabled")),
            _cell(r.get("healthy")),
            r.get("circuit", ""),
            _cell(r.get("detail")),
        ]
        for r in reports
    ]
    headers = ("NAME", "TYPE", "ENABLED", "HEALTHY", "CIRCUIT", "DETAIL")
    data = reports[0] if args.name else {"health": list(reports)}
    return Output(data=data, text=table(headers, rows, ("adapter", "adapters")))


async def adapters_types(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "adapter-types")
    rows = []
    for t in data.get("adapter_types", []):
        schema = t.get("config_schema") or {}
        required = list(schema.get("required", []))
        optional = [p for p in schema.get("properties", {}) if p not in required]
        rows.append([t.get("type", ""), _cell(required), _cell(optional)])
    headers = ("TYPE", "REQUIRED CONFIG", "OPTIONAL CONFIG")
    return Output(data=data, text=table(headers, rows, ("adapter type", "adapter types")))


# Members and keys --------------------------------------------------------------------


async def members_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "members")
    rows = [
        [
            m.get("id", ""),
            m.get("kind", ""),
            _enabled(m),
            str(len(m.get("keys", []))),
            _cell(m.get("services", [])),
            _cell(m.get("regions", [])),
            _cell(m.get("callback_url")),
            _cell(m.get("name")),
        ]
        for m in data.get("members", [])
    ]
    headers = ("ID", "KIND", "ENABLED", "KEYS", "SERVICES", "REGIONS", "CALLBACK", "NAME")
    return Output(data=data, text=table(headers, rows, ("member", "members")))


async def members_get(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "members", args.id)
    return Output(data=data, text=fields(data))


async def members_add(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("POST", "members", body=_member_document(args.file))
    keys = len(data.get("keys", []))
    return Output(
        data=data,
        text=f"created member {data['id']} ({plural(keys, ('key', 'keys'))}; "
        f"services: {_cell(data.get('services', []))})",
    )


def _member_switch(enabled: bool) -> Command:
    async def switch(api: AdminClient, args: argparse.Namespace) -> Output:
        data = await api.call("PATCH", "members", args.id, body={"enabled": enabled})
        return Output(data=data, text=f"member {args.id} {'enabled' if enabled else 'disabled'}")

    return switch


async def keys_add(api: AdminClient, args: argparse.Namespace) -> Output:
    jwk = _public_jwk(read_json(args.jwk, AdminError), args.jwk)
    query = {"reinstate": "true"} if args.reinstate else None
    data = await api.call("POST", "members", args.member, "keys", body=jwk, query=query)
    return Output(data=data, text=f"added key {_cell(data.get('kid'))} to {args.member}")


async def keys_revoke(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("DELETE", "members", args.member, "keys", args.kid)
    return Output(data=data, text=f"revoked key {args.kid} of {args.member}")


# Services, routes, ACL ---------------------------------------------------------------


async def services_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "services")
    rows = [
        [
            s.get("code", ""),
            s.get("mode", "sync"),
            _cell(s.get("allow_async", False)),
            _cell(s.get("timeout_s")),
            _cell(s.get("max_body_bytes")),
        ]
        for s in data.get("services", [])
    ]
    headers = ("CODE", "MODE", "ALLOW ASYNC", "TIMEOUT S", "MAX BODY BYTES")
    return Output(data=data, text=table(headers, rows, ("service", "services")))


async def services_get(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "services", args.code)
    return Output(data=data, text=fields(data))


async def services_add(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("POST", "services", body=read_json(args.file, AdminError))
    return Output(data=data, text=f"created service {data['code']} ({data.get('mode', 'sync')})")


async def routes_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "routes")
    rows = [
        [r.get("service", ""), r.get("target") or "*", r.get("adapter", "")]
        for r in data.get("routes", [])
    ]
    return Output(
        data=data, text=table(("SERVICE", "TARGET", "ADAPTER"), rows, ("route", "routes"))
    )


async def routes_add(api: AdminClient, args: argparse.Namespace) -> Output:
    route = {"service": args.service, "adapter": args.adapter}
    if args.target:
        route["target"] = args.target
    data = await api.call("POST", "routes", body=route)
    return Output(
        data=data, text=f"route {args.service} (target {args.target or '*'}) → {args.adapter}"
    )


async def routes_delete(api: AdminClient, args: argparse.Namespace) -> Output:
    segments = ["routes", args.service, *([args.target] if args.target else [])]
    data = await api.call("DELETE", *segments)
    return Output(data=data, text=f"deleted route {args.service} (target {args.target or '*'})")


async def acl_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "acl")
    rows = [[a.get("member", ""), _cell(a.get("services", []))] for a in data.get("acl", [])]
    return Output(data=data, text=table(("MEMBER", "SERVICES"), rows, ("member", "members")))


async def acl_set(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("PUT", "acl", args.member, body={"services": _names(args.services)})
    return Output(data=data, text=f"{args.member} may call: {_cell(data.get('services', []))}")


# Messages, dead letters, audit, tokens -----------------------------------------------


async def messages_search(api: AdminClient, args: argparse.Namespace) -> Output:
    query = {
        "client": args.client,
        "service": args.service,
        "state": args.state,
        "since": args.since,
        "limit": str(args.limit),
    }
    data = await api.call("GET", "messages", query=query)
    rows = [
        [
            m.get("message_id", ""),
            m.get("client", ""),
            m.get("service", ""),
            m.get("mode", ""),
            m.get("state", ""),
            _cell(m.get("status")),
            _cell(m.get("attempts")),
            _when(m.get("created_at")),
        ]
        for m in data.get("messages", [])
    ]
    headers = ("MESSAGE ID", "CLIENT", "SERVICE", "MODE", "STATE", "STATUS", "ATTEMPTS", "CREATED")
    return Output(data=data, text=table(headers, rows, ("message", "messages")))


async def messages_show(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "messages", args.id)
    return Output(data=data, text=fields(data, times=("created_at", "updated_at")))


async def dead_letters_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "dead-letters", query={"limit": str(args.limit)})
    rows = [
        [
            d.get("message_id", ""),
            d.get("kind", ""),
            d.get("client", ""),
            d.get("service", ""),
            _cell(d.get("attempts")),
            _when(d.get("updated_at")),
            _cell(d.get("error")),
        ]
        for d in data.get("dead_letters", [])
    ]
    headers = ("MESSAGE ID", "KIND", "CLIENT", "SERVICE", "ATTEMPTS", "UPDATED", "ERROR")
    return Output(data=data, text=table(headers, rows, ("dead letter", "dead letters")))


async def dead_letters_redeliver(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("POST", "dead-letters", args.id, "redeliver")
    return Output(data=data, text=f"{data.get('kind', 'message')} {args.id} queued for redelivery")


def _changed(entry: Mapping[str, Any]) -> str:
    before, after = entry.get("before"), entry.get("after")
    if before is None:
        return "(new)"
    if after is None:
        return "(removed)"
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        keys = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
        return ", ".join(keys) or "(no change)"
    return "(changed)"


async def audit(api: AdminClient, args: argparse.Namespace) -> Output:
    query = {"kind": args.kind, "since": args.since, "limit": str(args.limit)}
    data = await api.call("GET", "audit", query=query)
    rows = [
        [
            _when(e.get("at")),
            e.get("actor", ""),
            e.get("role", ""),
            e.get("action", ""),
            e.get("kind", ""),
            e.get("resource_id", ""),
            _changed(e),
        ]
        for e in data.get("audit", [])
    ]
    headers = ("WHEN", "ACTOR", "ROLE", "ACTION", "KIND", "ID", "CHANGED")
    return Output(data=data, text=table(headers, rows, ("entry", "entries")))


async def tokens_list(api: AdminClient, args: argparse.Namespace) -> Output:
    data = await api.call("GET", "tokens")
    rows = [
        [
            t.get("name", ""),
            t.get("role", ""),
            _when(t.get("created_at")),
            _when(t.get("revoked_at")),
        ]
        for t in data.get("tokens", [])
    ]
    headers = ("NAME", "ROLE", "CREATED", "REVOKED")
    return Output(data=data, text=table(headers, rows, ("token", "tokens")))


# Running a command -------------------------------------------------------------------


def default_url(config: str | None) -> str:
    """``http://{listen.admin.host}:{listen.admin.port}`` of a config file; without
    ``--config``, of ``config.yaml`` if there is one, else the built-in default."""
    import yaml

    path = Path(config or DEFAULT_CONFIG)
    listen: Any = {}
    if config is not None or path.exists():
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise AdminError(f"{path}: {exc}") from exc
        listen = ((doc or {}).get("listen") or {}).get("admin") or {}
        if not isinstance(listen, Mapping):
            raise AdminError(f"{path}: /listen/admin is not a mapping")
    host = str(listen.get("host", "127.0.0.1"))
    # A wildcard bind is reached on loopback; an IPv6 literal goes in brackets.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.get('port', 8081)}"


async def _execute(
    command: Command, args: argparse.Namespace, url: str, token: str | None
) -> Output:
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await command(AdminClient(session, url, token), args)


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen command; print its table or JSON; problems on stderr with exit 1."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        url = args.url or default_url(args.config)
        output = asyncio.run(_execute(args.admin_command, args, url, token))
    except AdminError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        if exc.status == 401 and token is None:
            print(f"hint: pass --token or set {TOKEN_ENV}", file=sys.stderr)
        return 1
    if args.json:
        if output.data is not None:  # a 204 answer has no JSON to print
            print(json.dumps(output.data, ensure_ascii=False, indent=2))
    else:
        print(output.text)
    return 0


# The parser --------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument(
        "--url",
        help="admin API base URL (default: http://HOST:PORT of listen.admin in --config)",
    )
    conn.add_argument(
        "--config", help=f"config file naming the admin listener (default {DEFAULT_CONFIG})"
    )
    conn.add_argument("--token", help=f"admin bearer token (default: ${TOKEN_ENV}, preferred)")
    conn.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per command (default 30)"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON, not a table")
    return common


def register(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the API-backed areas (adapters, members, keys, …) beside ``gateway admin token``."""
    common = _common()

    def area(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = admin.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(
        actions: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_text: str,
        command: Command,
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        parser.set_defaults(func=run_command, admin_command=command)
        return parser

    ad = area("adapters", "adapters the gateway routes to (via the API)")
    leaf(ad, "list", "list adapters", adapters_list)
    leaf(ad, "get", "show one adapter", adapters_get).add_argument("name")
    leaf(ad, "add", "register an adapter from a JSON file", adapters_add).add_argument(
        "--file", required=True, help="{name, type, config} as JSON; - reads stdin"
    )
    leaf(ad, "enable", "enable an adapter", _adapter_switch(True)).add_argument("name")
    leaf(ad, "disable", "disable an adapter", _adapter_switch(False)).add_argument("name")
    leaf(ad, "health", "health of one adapter, or of all", adapters_health).add_argument(
        "name", nargs="?"
    )
    leaf(ad, "types", "installed adapter types and their config", adapters_types)

    me = area("members", "systems, peer gateways and platforms that exchange (via the API)")
    leaf(me, "list", "list members", members_list)
    leaf(me, "get", "show one member", members_get).add_argument("id")
    leaf(me, "add", "register a member from a JSON file", members_add).add_argument(
        "--file",
        required=True,
        help="{id, kind, keys, services, …} as JSON; a key may be a JWK file path; - reads stdin",
    )
    leaf(me, "enable", "enable a member", _member_switch(True)).add_argument("id")
    leaf(
        me, "disable", "disable a member (its requests get 403)", _member_switch(False)
    ).add_argument("id")

    ke = area("keys", "members' public keys (via the API)")
    add = leaf(ke, "add", "add a public JWK to a member", keys_add)
    add.add_argument("member")
    add.add_argument("--jwk", required=True, help="public JWK file (gateway keygen writes one)")
    add.add_argument(
        "--reinstate", action="store_true", help="allow a key this member had revoked back"
    )
    revoke = leaf(ke, "revoke", "revoke a member's key (its requests get 401)", keys_revoke)
    revoke.add_argument("member")
    revoke.add_argument("kid")

    se = area("services", "exchange services and their schemas (via the API)")
    leaf(se, "list", "list services", services_list)
    leaf(se, "get", "show one service", services_get).add_argument("code")
    leaf(se, "add", "register a service from a JSON file", services_add).add_argument(
        "--file", required=True, help="{code, mode, request_schema, …} as JSON; - reads stdin"
    )

    ro = area("routes", "which adapter serves which service (via the API)")
    leaf(ro, "list", "list routes", routes_list)
    radd = leaf(ro, "add", "route a service (for one target, or all) to an adapter", routes_add)
    radd.add_argument("--service", required=True)
    radd.add_argument("--adapter", required=True)
    radd.add_argument("--target", help="only requests with this Gw-Target (default: all)")
    rdel = leaf(ro, "delete", "delete a route", routes_delete)
    rdel.add_argument("--service", required=True)
    rdel.add_argument("--target", help="the route's target (default: the catch-all route)")

    ac = area("acl", "which member may call which service (via the API)")
    leaf(ac, "list", "list every member's services", acl_list)
    aset = leaf(ac, "set", "replace a member's services", acl_set)
    aset.add_argument("member")
    aset.add_argument("--services", required=True, help="comma-separated codes; '' for none")

    ms = area("messages", "the message log (via the API; personal data masked)")
    search = leaf(ms, "search", "search messages, newest first", messages_search)
    search.add_argument("--client")
    search.add_argument("--service")
    search.add_argument("--state", help="accepted, delivered, answered, dead, …")
    search.add_argument("--since", help="Unix time or YYYY-MM-DDTHH:MM:SS (UTC)")
    search.add_argument("--limit", type=int, default=100)
    leaf(ms, "show", "one message's record", messages_show).add_argument("id")

    dl = area("dead-letters", "messages and callbacks that ran out of attempts (via the API)")
    leaf(dl, "list", "list dead letters", dead_letters_list).add_argument(
        "--limit", type=int, default=100
    )
    leaf(
        dl, "redeliver", "put a dead letter back in the outbox", dead_letters_redeliver
    ).add_argument("id", help="message id")

    au = admin.add_parser(
        "audit", help="who changed what, when (via the API)", parents=[common],
        description="The audit trail of admin writes, newest first.",
    )  # fmt: skip
    au.add_argument("--kind", help="adapters, members, services, routes, tokens, …")
    au.add_argument("--since", help="Unix time or YYYY-MM-DDTHH:MM:SS (UTC)")
    au.add_argument("--limit", type=int, default=100)
    au.set_defaults(func=run_command, admin_command=audit)

    to = area("tokens", "admin tokens as the API sees them (create and revoke: admin token …)")
    leaf(to, "list", "list tokens (never their values)", tokens_list)
