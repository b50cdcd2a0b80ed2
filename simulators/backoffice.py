"""A provincial back-office system (province B), simulated: it handles applications.

``POST /applications/{service}`` takes an application relayed by its own gateway,
verifies the gateway's signature, decides, and answers with the decision, signed by
the back office and bound to the gateway's request. An application without materials
gets ``need_more_materials``; otherwise ``approved``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.crypto.keys import KeyPair, VerificationKey
from gateway.errors import GatewayError
from gateway.signing import Signer, Verifier
from simulators.common import note, problem, signed_json, verify_request

__all__ = ["BackOffice", "create_backoffice_app", "decide"]


@dataclass(slots=True, kw_only=True)
class BackOffice:
    member_id: str
    region: str
    keypair: KeyPair
    gateway_keys: Mapping[str, VerificationKey]
    decided: dict[str, dict[str, Any]] = field(default_factory=dict)
    trail: list[dict[str, Any]] = field(default_factory=list)


BACKOFFICE = web.AppKey("backoffice", BackOffice)


def decide(application: Mapping[str, Any], message_id: str, region: str) -> dict[str, Any]:
    complete = bool(application.get("materials"))
    return {
        "decision": "approved" if complete else "need_more_materials",
        "case_number": f"{region[:2]}{message_id.replace('-', '')[:18].upper()}",
        "handling_region": region,
        "decided_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reason": "材料齐全，符合法定形式，予以办理" if complete else "请补正申请材料",
    }


async def _application(request: web.Request) -> web.Response:
    office = request.app[BACKOFFICE]
    try:
        body, kid = await verify_request(request, office.gateway_keys, Verifier())
    except (GatewayError, web.HTTPUnauthorized, KeyError) as exc:
        return problem(401, "signature_invalid", str(exc))
    message_id = request.headers["Gw-Message-Id"]
    decision = decide(json.loads(body), message_id, office.region)
    office.decided[message_id] = decision
    # The last hop of the relay chain is the gateway that signed this request.
    sender = request.headers.get("Gw-Via", "?").rsplit(",", 1)[-1].strip()
    hop = f"{sender} → {office.member_id}"
    note(office.trail, hop, f"gateway signature, kid {kid}")
    return signed_json(request, Signer(office.keypair), 200, decision)


def create_backoffice_app(office: BackOffice) -> web.Application:
    app = web.Application()
    app[BACKOFFICE] = office
    app.router.add_post("/applications/{service}", _application)
    return app
