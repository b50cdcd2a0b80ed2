"""HTTP Message Signatures (RFC 9421) and Content-Digest (RFC 9530), as PROTOCOL.md uses them.

The signature base, structured fields and most algorithms come from the
``http-message-signatures`` library; this package adds the protocol's policy: which
components must be covered, freshness, ``alg`` pinned to the key's type, one key per
``keyid`` belonging to the claimed member, and the Content-Digest check the library
leaves to its caller. One module per concern:

- ``digest``: Content-Digest values, written and checked;
- ``fields``: the ``Signature-Input`` / ``Signature`` structured fields, read fast;
- ``base``: signature bases and the message views the library needs;
- ``algorithms``: which primitive signs and verifies each algorithm;
- ``verifier`` and ``signer``: the two roles.

The public names are importable from here (``from gateway.signing import Signer``).
"""

from gateway.signing.base import (
    OPTIONAL_REQUEST_HEADERS,
    REQUEST_COMPONENTS,
    RESPONSE_COMPONENTS,
    RequestView,
    ResponseView,
    request_components,
)
from gateway.signing.digest import check_content_digest, content_digest
from gateway.signing.fields import SignatureInput, parse_signature_input
from gateway.signing.signer import Signer
from gateway.signing.verifier import VerifiedSignature, Verifier

__all__ = [
    "OPTIONAL_REQUEST_HEADERS",
    "REQUEST_COMPONENTS",
    "RESPONSE_COMPONENTS",
    "RequestView",
    "ResponseView",
    "SignatureInput",
    "Signer",
    "VerifiedSignature",
    "Verifier",
    "check_content_digest",
    "content_digest",
    "parse_signature_input",
    "request_components",
]
