"""Factories the test modules share: what several tests build alike, built one way (the
fixtures that start servers stay in tests/conftest.py)."""

from __future__ import annotations

import functools
import json
import uuid
from typing import Any

from multidict import CIMultiDict

from gateway.crypto.keys import KeyType, PrivateKey, generate
from gateway.signing import Signer
from tests.conftest import APPLY_EXAMPLE, NATIONAL_ID, Harness


@functools.cache
def private_key(kind: KeyType, n: int = 0) -> PrivateKey:
    """Key number ``n`` of ``kind``, made once a session (a 3072-bit RSA key takes about half
    a second): for a test that needs a key of a type, not a key made by the test itself."""
    del n  # part of the cache key only: 0 and 1 are two different keys
    return generate(kind)


# Asynchronous exchanges on a harness: the application, its state, the platform's decision.

APPROVED = {
    "decision": "approved",
    "case_number": "CR2026112600000001",
    "handling_region": "440000",
    "decided_at": "2026-11-26T10:00:00Z",
}


async def send_application(h: Harness) -> str:
    """The portal's crossregion.apply, accepted (202 with its Location): its message id."""
    reply = await h.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert reply.status == 202, reply.body
    assert reply.headers["Location"].endswith(reply.json()["message_id"])
    message_id: str = reply.json()["message_id"]
    return message_id


async def until_state(h: Harness, message_id: str, state: str, within_s: float = 10) -> None:
    """Wait until the portal's message ``message_id`` is in ``state``."""

    async def reached() -> bool:
        return await h.state_of(message_id) == state

    await h.wait_for(reached, within_s)


async def post_callback(
    h: Harness,
    correlation: str,
    body: Any = None,
    *,
    key: str = "national",
    member: str = NATIONAL_ID,
    message_id: str | None = None,
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    """A callback for message ``correlation`` (the approval unless ``body``), signed with
    key ``key`` as ``member``: the status, the JSON answer and the headers."""
    url = f"{h.url}/v1/callbacks/crossregion.apply"
    data = json.dumps(APPROVED if body is None else body).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        {
            "Content-Type": "application/json",
            "Gw-Client": member,
            "Gw-Message-Id": message_id or str(uuid.uuid4()),
            "Gw-Correlation-Id": correlation,
        }
    )
    Signer(h.keys.pairs[key]).sign_request("POST", url, headers, data)
    async with h.gateway.session.post(url, data=data, headers=headers) as resp:
        return resp.status, json.loads(await resp.read()), CIMultiDict(resp.headers)
