"""The gateway's single exception tree.

Every error a client can see carries a stable protocol ``code`` (PROTOCOL.md, "Errors")
and an HTTP ``status``; the problem middleware turns it into RFC 9457 problem+json.
Anything that is not a ``GatewayError`` becomes ``internal`` with details only in the log.

    GatewayError
    ├── ConfigError                    (not an HTTP error: bad config, listed problems)
    ├── DirectoryRefused               (not an HTTP error: a federation directory refused)
    ├── TimestampError                 (not an HTTP error: a TSA unreachable, or a bad stamp)
    ├── StoreError                     500 internal
    │   ├── StoreUnavailable           500 internal (the database cannot be reached)
    │   └── StoreReadOnly              500 internal (the database refuses writes)
    ├── BadRequest                     400
    │   ├── MalformedRequest           malformed_request
    │   ├── MissingHeader              missing_header
    │   ├── DigestMismatch             digest_mismatch
    │   └── RequestTimeout             malformed_request (the body came too slowly)
    ├── Unauthenticated                401
    │   ├── SignatureMissing           signature_missing
    │   ├── SignatureInvalid           signature_invalid
    │   ├── SignatureExpired           signature_expired
    │   ├── KeyUnknown                 key_unknown
    │   ├── CertificateUnknown         certificate_unknown (local listener: not this member's)
    │   ├── CertificateRevoked         certificate_revoked (in the CRL, or revoked by an admin)
    │   ├── CredentialsMissing         signature_missing (admin API: no bearer token)
    │   └── CredentialsInvalid         key_unknown (admin API: unknown or revoked token)
    ├── Forbidden                      403
    │   ├── ClientUnknown              client_unknown
    │   ├── ClientDisabled             client_disabled
    │   └── NotPermitted               forbidden
    ├── NotFound                       404
    │   ├── ServiceUnknown             service_unknown
    │   ├── MessageUnknown             message_unknown
    │   └── ResourceUnknown            resource_unknown (admin API)
    ├── MessageIdReused                409 message_id_reused
    ├── CallbackConflict               409 callback_conflict (differs from the final decision)
    ├── ResourceExists                 409 resource_exists (admin API)
    ├── ResourceChanged                409 resource_changed (admin API: a concurrent write)
    ├── PayloadTooLarge                413 payload_too_large
    ├── UnsupportedMediaType           415 unsupported_media_type
    ├── SchemaInvalid                  422 schema_invalid (with field errors)
    │   └── SecretUnresolved           secret_unresolved (admin API: {"env"|"file"} missing)
    ├── RateLimited                    429 rate_limited (Retry-After)
    ├── UpstreamError                  502 upstream_error
    │   ├── OutboundRefused            upstream_error (a learnt URL the outbound policy refuses)
    │   └── UpstreamUnbound            upstream_unbound (a signed answer not bound to our request)
    ├── Unavailable                    503
    │   ├── AdapterUnavailable         adapter_unavailable (Retry-After)
    │   │   └── DirectoryStale         directory_stale (cross-region refused: directory too old)
    │   ├── Overloaded                 overloaded
    │   └── CallbackEarly              overloaded (Retry-After: the message is being delivered)
    ├── UpstreamTimeout                504 upstream_timeout (also a TimeoutError)
    └── InternalError                  500 internal
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AdapterUnavailable",
    "BadRequest",
    "CallbackConflict",
    "CallbackEarly",
    "CertificateRevoked",
    "CertificateUnknown",
    "ClientDisabled",
    "ClientUnknown",
    "ConfigError",
    "CredentialsInvalid",
    "CredentialsMissing",
    "DigestMismatch",
    "DirectoryRefused",
    "DirectoryStale",
    "FieldError",
    "Forbidden",
    "GatewayError",
    "InternalError",
    "KeyUnknown",
    "MalformedRequest",
    "MessageIdReused",
    "MessageUnknown",
    "MissingHeader",
    "NotFound",
    "NotPermitted",
    "OutboundRefused",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ResourceChanged",
    "ResourceExists",
    "ResourceUnknown",
    "SchemaInvalid",
    "SecretUnresolved",
    "ServiceUnknown",
    "SignatureExpired",
    "SignatureInvalid",
    "SignatureMissing",
    "StoreError",
    "StoreReadOnly",
    "StoreUnavailable",
    "TimestampError",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnbound",
]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One violation: a JSON Pointer into the offending document and what is wrong there."""

    pointer: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"pointer": self.pointer, "message": self.message}


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str = "", *, retry_after: int | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after

    @property
    def errors(self) -> Sequence[FieldError]:
        return ()


class ConfigError(GatewayError):
    """The configuration has problems; each names its location (``/members/0/id: …``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems) or "invalid configuration")
        self.problems = tuple(problems)


class TimestampError(GatewayError):
    """An RFC 3161 time stamp not had or not good (gateway/audit/timestamping.py); ``reason`` is
    a stable word: ``unavailable`` (the TSA did not answer with a stamp), ``malformed``,
    ``mismatched`` (it covers other data), ``forged`` (its signature or certificate does
    not verify against the configured TSA), ``untimely`` (its time is outside the
    checkpoint's span)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DirectoryRefused(GatewayError):
    """A federation directory that must not be applied; ``reason`` is a stable word
    (``signature``, ``key_unknown``, ``rollback``, ``expired``, ``malformed``, ``issuer``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class StoreError(GatewayError):
    title = "Message store error"


class StoreUnavailable(StoreError):
    """The database cannot be reached (connection refused or lost, shutting down): a
    driver's error translated at the store's seam (gateway/store/sqlite.py, postgres.py)."""


class StoreReadOnly(StoreError):
    """The database refuses writes: a read-only file, a replica, a database in recovery or
    with ``default_transaction_read_only``. Readiness reports it (gateway/exchange/health.py)."""


class InternalError(GatewayError):
    pass


class BadRequest(GatewayError):
    status = 400
    code = "malformed_request"
    title = "Malformed request"


class MalformedRequest(BadRequest):
    pass


class MissingHeader(BadRequest):
    code = "missing_header"
    title = "A required header is missing"


class DigestMismatch(BadRequest):
    code = "digest_mismatch"
    title = "Content-Digest does not match the body"


class RequestTimeout(BadRequest):
    """The body did not arrive in time. 400, not 408: each protocol code has one status."""

    title = "Request timeout"


class Unauthenticated(GatewayError):
    status = 401
    code = "signature_invalid"
    title = "Signature invalid"


class SignatureMissing(Unauthenticated):
    code = "signature_missing"
    title = "The request is not signed"


class SignatureInvalid(Unauthenticated):
    pass


class SignatureExpired(Unauthenticated):
    code = "signature_expired"
    title = "The signature is not fresh"


class KeyUnknown(Unauthenticated):
    code = "key_unknown"
    title = "The signing key is not known for this client"


class CertificateUnknown(Unauthenticated):
    code = "certificate_unknown"
    title = "The client certificate is not known for this client"


class CertificateRevoked(Unauthenticated):
    code = "certificate_revoked"
    title = "The client certificate is revoked"


class CredentialsMissing(Unauthenticated):
    code = "signature_missing"
    title = "Credentials missing"


class CredentialsInvalid(Unauthenticated):
    code = "key_unknown"
    title = "Unknown or revoked credentials"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class ClientUnknown(Forbidden):
    code = "client_unknown"
    title = "Unknown client"


class ClientDisabled(Forbidden):
    code = "client_disabled"
    title = "Client disabled"


class NotPermitted(Forbidden):
    pass


class NotFound(GatewayError):
    status = 404
    code = "service_unknown"
    title = "Not found"


class ServiceUnknown(NotFound):
    title = "Unknown service"


class MessageUnknown(NotFound):
    code = "message_unknown"
    title = "Unknown message"


class ResourceUnknown(NotFound):
    code = "resource_unknown"
    title = "No such resource"


class ResourceExists(GatewayError):
    status = 409
    code = "resource_exists"
    title = "The resource exists already"


class ResourceChanged(GatewayError):
    status = 409
    code = "resource_changed"
    title = "The resource changed meanwhile"


class MessageIdReused(GatewayError):
    status = 409
    code = "message_id_reused"
    title = "Message id reused with a different body"


class CallbackConflict(GatewayError):
    """A callback that differs from the message's final decision (the first is kept)."""

    status = 409
    code = "callback_conflict"
    title = "The message already has a different decision"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class SchemaInvalid(GatewayError):
    status = 422
    code = "schema_invalid"
    title = "The document does not match the service's schema"

    def __init__(self, detail: str, field_errors: Sequence[FieldError]) -> None:
        super().__init__(detail)
        self._errors = tuple(field_errors)

    @property
    def errors(self) -> Sequence[FieldError]:
        return self._errors


class SecretUnresolved(SchemaInvalid):
    """An admin write names a secret by reference (``{"env": …}``, ``{"file": …}``) that
    this gateway cannot read: nothing is written."""

    code = "secret_unresolved"
    title = "A secret reference does not resolve"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"
    title = "Rate limit exceeded"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"
    title = "The upstream failed"


class OutboundRefused(UpstreamError):
    """A learnt URL (or the address it resolves to) that the outbound policy refuses."""

    title = "The destination is not allowed"


class UpstreamUnbound(UpstreamError):
    """A signed answer that covers neither our request's signature nor its message id."""

    code = "upstream_unbound"
    title = "The answer is not bound to the request"


class Unavailable(GatewayError):
    status = 503
    code = "overloaded"
    title = "Service unavailable"


class AdapterUnavailable(Unavailable):
    code = "adapter_unavailable"
    title = "The adapter is unavailable"


class DirectoryStale(AdapterUnavailable):
    """Cross-region traffic refused: the federation directory in force is past its
    ``expires_at`` by more than ``directory.max_stale_s``, so its keys and URLs are not
    trusted any longer (local traffic goes on). An ``AdapterUnavailable``: the outbox
    keeps an asynchronous message waiting without spending an attempt."""

    code = "directory_stale"
    title = "The federation directory is too old for cross-region traffic"


class Overloaded(Unavailable):
    title = "The gateway is overloaded"


class CallbackEarly(Unavailable):
    """The receiver called back before our delivery of the message was committed (it may
    answer and call back at once): retry after ``Retry-After``; nothing is lost."""

    title = "The message is still being delivered"


class UpstreamTimeout(GatewayError, TimeoutError):
    status = 504
    code = "upstream_timeout"
    title = "The upstream did not answer in time"
