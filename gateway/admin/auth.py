"""Admin bearer tokens: shown once, stored only as SHA-256 hashes, compared in constant time.

Roles: ``admin`` reads and writes; ``operator`` reads, redelivers, enables and disables;
``auditor`` only reads.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from gateway.errors import CredentialsInvalid, CredentialsMissing, MalformedRequest, NotPermitted
from gateway.store import Store, TokenNameTaken

__all__ = ["ROLES", "Permission", "Principal", "authenticate", "create_token", "token_hash"]

ROLES = ("admin", "operator", "auditor")
Permission = Literal["read", "operate", "write"]
_GRANTS: dict[str, frozenset[str]] = {
    "admin": frozenset({"read", "operate", "write"}),
    "operator": frozenset({"read", "operate"}),
    "auditor": frozenset({"read"}),
}
_PREFIX = "gwa_"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    def require(self, permission: Permission) -> None:
        if permission not in _GRANTS.get(self.role, frozenset()):
            raise NotPermitted(f"role {self.role} may not {permission}")


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
