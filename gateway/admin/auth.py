"""Admin bearer tokens and what each role may do.

Tokens are shown once, stored only as SHA-256 hashes, compared in constant time. Roles
(docs/security.md, "Threat model: admin roles and secrets", is the policy in words):

- ``admin``: every read and every write;
- ``operator``: reads the configuration, messages with their (masked) bodies, dead
  letters and the audit trail; redelivers dead letters, enables and disables members and
  adapters; does not see the token list;
- ``auditor``: reads the configuration, the audit trail, the token list (who holds
  access) and messages and dead letters without their bodies or headers; writes nothing.

No role reads a secret: views show write-only values as placeholders (gateway/config/secrets.py).
Every admin route names the permission it needs (``gateway/admin/app.py``); a route
without one is refused to everyone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from gateway.errors import CredentialsInvalid, CredentialsMissing, MalformedRequest, NotPermitted
from gateway.store import Store, TokenNameTaken

__all__ = [
    "GRANTS",
    "PERMISSIONS",
    "ROLES",
    "Permission",
    "Principal",
    "authenticate",
    "create_token",
    "token_hash",
]

ROLES = ("admin", "operator", "auditor")
# read: configuration, health, message and dead-letter records, the audit trail;
# read_bodies: messages' (masked) bodies and headers; read_tokens: the token list;
# operate: redeliver, enable and disable; write: every other change.
Permission = Literal["read", "read_bodies", "read_tokens", "operate", "write"]
PERMISSIONS: tuple[Permission, ...] = ("read", "read_bodies", "read_tokens", "operate", "write")
GRANTS: dict[str, frozenset[Permission]] = {
    "admin": frozenset(PERMISSIONS),
    "operator": frozenset({"read", "read_bodies", "operate"}),
    "auditor": frozenset({"read", "read_tokens"}),
}
_PREFIX = "gwa_"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    def may(self, permission: Permission) -> bool:
        return permission in GRANTS.get(self.role, frozenset())

    def require(self, permission: Permission) -> None:
        if not self.may(permission):
            raise NotPermitted(f"role {self.role} may not {permission.replace('_', ' ')}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(store: Store, name: str, role: str) -> str:
    """A new token for ``name``; the caller shows it once, the store keeps its hash."""
    if role not in ROLES:
        raise MalformedRequest(f"role must be one of {', '.join(ROLES)}")
    if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").isalnum():
        raise MalformedRequest("a token name is 1-100 letters, digits, '-' or '_'")
    token = _PREFIX + secrets.token_urlsafe(32)
    try:
        await store.add_token(name, role, token_hash(token))
    except TokenNameTaken as exc:
        raise MalformedRequest(f"a token named {name} exists; revoke it first") from exc
    return token


async def authenticate(store: Store, authorization: str | None) -> Principal:
    if not authorization:
        raise CredentialsMissing("send Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CredentialsMissing("send Authorization: Bearer <token>")
    digest = token_hash(token.strip())
    row = await store.token_by_hash(digest)
    # The lookup is by hash; the comparison that decides is constant time.
    if row is None or not hmac.compare_digest(row.hash, digest):
        raise CredentialsInvalid("the token is unknown or revoked")
    return Principal(name=row.name, role=row.role)
