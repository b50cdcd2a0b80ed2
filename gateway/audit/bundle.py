"""Evidence bundles: one message's records and the chain to a signed checkpoint.

``export_bundle`` reads them from a store snapshot; ``check_bundle`` checks a bundle
offline with nothing but a trusted JWKS. The records of other messages in the stretch
appear only as digests and hashes. When the checkpoint was time-stamped by a TSA, the
bundle carries the stamp and the TSA's certificate (``stamp_files``: what
``openssl ts -verify`` needs). Format: ``docs/audit.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from rfc3161_client import decode_timestamp_response

from gateway.audit.jws import JwsInvalid, verify_jws
from gateway.audit.timestamping import CLOCK_SKEW_S, signer_certificate
from gateway.audit.verify import body_matches, text_sha
from gateway.config.secretstore import SecretBox
from gateway.errors import StoreError
from gateway.store import ChainSnapshot, chain
from gateway.store.bodies import opened_dict
from gateway.store.chain import link

__all__ = [
    "BUNDLE_FORMAT",
    "BundleReport",
    "canonical_bundle",
    "check_bundle",
    "export_bundle",
    "stamp_files",
]

BUNDLE_FORMAT = "gw-evidence/1"


def canonical_bundle(bundle: Mapping[str, Any]) -> bytes:
    """The one byte sequence a bundle is written as (``check`` insists on it)."""
    return (json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


async def export_bundle(
    snap: ChainSnapshot,
    message: Mapping[str, Any],
    jwks: Mapping[str, Any],
    box: SecretBox | None = None,
) -> dict[str, Any]:
    """One message's records and the chain from its first record to a signed checkpoint.

    The records of other messages in that stretch appear only as digests and hashes.
    ``message`` is a row from ``snap.messages_by_id``. The caller makes sure a checkpoint
    covers the message (``make_checkpoint``) before calling.
    """
    seq = int(message["seq"])
    # Bodies sealed at rest are opened with the store's data keys (gateway/store/bodies.py).
    message = await opened_dict(box, message)
    callbacks = [await opened_dict(box, c) for c in await snap.callbacks_of(seq)]
    span = await snap.own_events(seq, [int(c["seq"]) for c in callbacks])
    if span is None:
        raise StoreError(f"message {message['message_id']} predates the chain")
    cp = await snap.checkpoint_covering(span[1])
    if cp is None:
        raise StoreError("no signed checkpoint covers this message yet")
    own_callbacks = {int(c["seq"]) for c in callbacks}
    rows = []
    async for r in snap.chain_rows(span[0], cp.seq):
        entry: dict[str, Any] = {
            "seq": r.seq,
            "content_digest": r.content_digest,
            "prev_hash": r.prev_hash,
            "hash": r.hash,
        }
        if (r.kind.startswith("message.") and r.ref == seq) or (
            r.kind.startswith("callback.") and r.ref in own_callbacks
        ):
            entry["facts"] = r.facts
        rows.append(entry)
    header, payload = verify_jws(cp.jws, jwks)
    key = [k for k in jwks["keys"] if k.get("kid") == header["kid"]]
    bundle: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "gateway": payload.get("gateway"),
        "message": {
            "seq": seq,
            "request_headers": message["request_headers"],
            "request_body": _b64(message["request_body"]),
            "response_body": _b64(message["response_body"]),
            "result": _b64(message["result"]),
        },
        "callbacks": [
            {"seq": int(c["seq"]), "headers": c["headers"], "body": _b64(c["body"] or None)}
            for c in callbacks
        ],
        "chain": rows,
        "checkpoint": {"seq": cp.seq, "hash": cp.hash, "at": cp.at, "kid": cp.kid, "jws": cp.jws},
        "jwks": {"keys": key},
    }
    tsr = (await snap.stamps()).get(cp.id)
    if tsr is not None:
        bundle["timestamp"] = {"tsr": _b64(tsr), "tsa_cert": _tsa_cert(tsr)}
    return bundle


def _tsa_cert(tsr: bytes) -> str | None:
    """The certificate that signed a stamp, PEM, from the stamp itself (certReq was on)."""
    cert = signer_certificate(decode_timestamp_response(tsr))
    return None if cert is None else cert.public_bytes(Encoding.PEM).decode("ascii")


def stamp_files(bundle: Mapping[str, Any]) -> dict[str, bytes]:
    """What ``openssl ts -verify`` needs beside a bundle: ``.tsr`` (the stamp, DER),
    ``.stamped`` (the bytes it covers: the checkpoint's JWS) and ``.tsa.pem`` (the TSA's
    certificate); empty when the bundle carries no stamp."""
    stamp = bundle.get("timestamp")
    if not isinstance(stamp, dict):
        return {}
    files = {
        ".tsr": base64.b64decode(stamp["tsr"]),
        ".stamped": str(bundle["checkpoint"]["jws"]).encode("ascii"),
    }
    if stamp.get("tsa_cert"):
        files[".tsa.pem"] = str(stamp["tsa_cert"]).encode("ascii")
    return files


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleReport:
    ok: bool
    trusted: bool  # verified against a JWKS given by the caller, not the bundle's own
    problem: str | None
    summary: tuple[str, ...]


class _Bad(Exception):
    """The first thing wrong with a bundle."""


def _object(
    value: Any, keys: set[str], where: str, optional: set[str] | None = None
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is not an object")
    allowed = keys | (optional or set())
    if not keys <= set(value) <= allowed:
        raise _Bad(f"{where} has fields {sorted(value)}, expected {sorted(allowed)}")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{where} is not an integer")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is not a string")
    return value


def _body(value: Any, where: str) -> bytes | None:
    if value is None:
        return None
    text = _str(value, where)
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise _Bad(f"{where} is not base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise _Bad(f"{where} is not canonical base64")
    return data


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_bundle(raw: bytes, trusted: Mapping[str, Any] | None) -> BundleReport:
    """Check an evidence bundle offline; ``trusted`` is the JWKS to believe (else its own)."""
    summary: list[str] = []
    try:
        _check(raw, trusted, summary)
    except _Bad as exc:
        return BundleReport(ok=False, trusted=False, problem=str(exc), summary=tuple(summary))
    return BundleReport(ok=True, trusted=trusted is not None, problem=None, summary=tuple(summary))


def _check(raw: bytes, trusted: Mapping[str, Any] | None, summary: list[str]) -> None:
    try:
        data = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Bad(f"not a JSON bundle: {exc}") from exc
    doc = _object(
        data,
        {"format", "gateway", "message", "callbacks", "chain", "checkpoint", "jwks"},
        "bundle",
        {"timestamp"},
    )
    if canonical_bundle(doc) != raw:
        raise _Bad("the file is not byte for byte what export writes (it was edited)")
    if doc["format"] != BUNDLE_FORMAT:
        raise _Bad(f"unknown format {doc['format']!r}")
    gateway = _str(doc["gateway"], "gateway")

    # The signed checkpoint, against the trusted key.
    cp = _object(doc["checkpoint"], {"seq", "hash", "at", "kid", "jws"}, "checkpoint")
    embedded = _object(doc["jwks"], {"keys"}, "jwks")["keys"]
    if not isinstance(embedded, list) or len(embedded) != 1 or not isinstance(embedded[0], dict):
        raise _Bad("jwks must hold exactly the checkpoint's key")
    key = embedded[0]
    if trusted is not None:
        mine = [k for k in trusted.get("keys", []) if k.get("kid") == cp["kid"]]
        if not mine:
            raise _Bad(f"the trusted JWKS has no key {cp['kid']!r}")
        if mine[0] != key:
            raise _Bad("the bundle's key differs from the trusted key with the same kid")
    try:
        header, payload = verify_jws(_str(cp["jws"], "checkpoint.jws"), {"keys": [key]})
    except JwsInvalid as exc:
        raise _Bad(f"checkpoint: {exc}") from exc
    signed = {"gateway": gateway, "seq": cp["seq"], "hash": cp["hash"], "at": cp["at"]}
    if payload != signed or header.get("kid") != cp["kid"]:
        raise _Bad("the checkpoint fields differ from what was signed")

    # The chain: consecutive, linked, ending at the signed hash.
    rows = doc["chain"]
    if not isinstance(rows, list) or not rows:
        raise _Bad("chain is empty")
    full = {"seq", "content_digest", "prev_hash", "hash"}
    own: list[dict[str, Any]] = []
    first = _int(_object(rows[0], full, "chain[0]", {"facts"})["seq"], "chain[0].seq")
    for i, entry in enumerate(rows):
        where = f"chain record {first + i}"
        e = _object(entry, full, where, {"facts"})
        if _int(e["seq"], where) != first + i:
            raise _Bad(f"{where}: out of sequence")
        digest = _str(e["content_digest"], where)
        if i and e["prev_hash"] != rows[i - 1]["hash"]:
            raise _Bad(f"{where}: does not link to the record before it")
        if link(_str(e["prev_hash"], where), digest) != e["hash"]:
            raise _Bad(f"{where}: its hash does not hold")
        if "facts" in e:
            text = _str(e["facts"], where)
            if chain.content_digest(text) != digest:
                raise _Bad(f"{where}: its facts do not match its content digest")
            facts = json.loads(text)
            if not isinstance(facts, dict) or facts.get("seq") != e["seq"]:
                raise _Bad(f"{where}: its facts name another place in the chain")
            own.append(facts)
    if rows[-1]["seq"] != cp["seq"] or rows[-1]["hash"] != cp["hash"]:
        raise _Bad("the chain does not end at the signed checkpoint")

    # The message's own records: every one about this message, bodies matching digests.
    message = _object(
        doc["message"],
        {"seq", "request_headers", "request_body", "response_body", "result"},
        "message",
    )
    mseq = _int(message["seq"], "message.seq")
    if not own or own[0].get("kind") != "message.accepted" or own[0].get("ref") != mseq:
        raise _Bad("the chain does not start with the message's acceptance")
    if own[0].get("seq") != first:
        raise _Bad("the chain does not start with the message's acceptance")
    accepted = own[0]
    callbacks = doc["callbacks"]
    if not isinstance(callbacks, list):
        raise _Bad("callbacks is not a list")
    cb_docs = {}
    for i, c in enumerate(callbacks):
        cbd = _object(c, {"seq", "headers", "body"}, f"callbacks[{i}]")
        cb_docs[_int(cbd["seq"], f"callbacks[{i}].seq")] = cbd
    cb_facts: dict[int, dict[str, Any]] = {}
    response: str | None = None
    result: str | None = None
    timeline = []
    for facts in own:
        kind, ref = facts.get("kind"), facts.get("ref")
        if kind == "callback.accepted" and facts.get("original_seq") == mseq and ref in cb_docs:
            cb_facts[ref] = facts
            result = facts.get("body_digest")
        elif kind in ("callback.finished", "callback.redelivered") and ref in cb_facts:
            pass
        elif str(kind).startswith("message.") and ref == mseq:
            if kind == "message.finished":
                response = facts.get("response_digest")
            if "result_digest" in facts:
                result = facts["result_digest"]
            if kind == "message.accepted" and facts is not accepted:
                raise _Bad(f"chain record {facts.get('seq')}: a second acceptance")
        else:
            raise _Bad(f"chain record {facts.get('seq')} is not about this message")
        timeline.append(
            f"  seq {facts.get('seq')}  {_iso(facts.get('at'))}  {kind}  "
            f"{facts.get('state') or ''}".rstrip()
        )
    if set(cb_facts) != set(cb_docs):
        raise _Bad("the callbacks and their chain records do not correspond")
    if text_sha(_str(message["request_headers"], "message.request_headers")) != accepted.get(
        "headers_digest"
    ):
        raise _Bad("the request headers do not match their chained digest")
    _match(
        _body(message["request_body"], "message.request_body"),
        accepted.get("request_digest"),
        "request body",
    )
    _match(_body(message["response_body"], "message.response_body"), response, "response body")
    _match(_body(message["result"], "message.result"), result, "result")
    for cseq, cbd in cb_docs.items():
        if text_sha(_str(cbd["headers"], "callback headers")) != cb_facts[cseq].get(
            "headers_digest"
        ):
            raise _Bad(f"callback {cseq}: its headers do not match their chained digest")
        _match(
            _body(cbd["body"], "callback body"),
            cb_facts[cseq].get("body_digest"),
            f"callback {cseq} body",
        )

    summary.append(
        f"message {accepted.get('message_id')} from {accepted.get('client')} "
        f"({accepted.get('service')}), accepted {_iso(accepted.get('at'))} by {gateway}"
    )
    summary.extend(timeline)
    summary.append(
        f"sealed by checkpoint at seq {cp['seq']} ({_iso(cp['at'])}), key {cp['kid']}, "
        f"{len(rows)} chain records"
    )
    if "timestamp" in doc:
        summary.append(_timestamp(doc["timestamp"], cp))


def _timestamp(value: Any, cp: Mapping[str, Any]) -> str:
    """The stamp covers the checkpoint as signed; its signature and certificate are for
    ``openssl ts -verify`` against the TSA's CA, which a bundle cannot vouch for itself."""
    stamp = _object(value, {"tsr", "tsa_cert"}, "timestamp")
    tsr = _body(stamp["tsr"], "timestamp.tsr")
    if tsr is None:
        raise _Bad("timestamp.tsr is missing")
    if stamp["tsa_cert"] is not None:
        _str(stamp["tsa_cert"], "timestamp.tsa_cert")
    try:
        info = decode_timestamp_response(tsr).tst_info
        imprint = info.message_imprint
    except ValueError as exc:
        raise _Bad(f"timestamp: not an RFC 3161 time-stamp response: {exc}") from exc
    jws = _str(cp["jws"], "checkpoint.jws").encode("ascii")
    if imprint.message != hashlib.sha256(jws).digest():
        raise _Bad("timestamp: the stamp covers other data than the checkpoint")
    gen = info.gen_time if info.gen_time.tzinfo else info.gen_time.replace(tzinfo=dt.UTC)
    if gen.timestamp() < float(cp["at"]) - CLOCK_SKEW_S:
        raise _Bad("timestamp: the stamp is dated before the checkpoint was signed")
    return (
        f"time-stamped by a TSA at {gen.strftime('%Y-%m-%dT%H:%M:%SZ')} (check its signature "
        "with openssl ts -verify against the TSA's CA: docs/audit.md)"
    )


def _match(body: bytes | None, digest: Any, what: str) -> None:
    if body is None:
        return  # purged, or never there: the digest alone is the evidence
    if digest is None or not body_matches(body, digest):
        raise _Bad(f"the {what} does not match its chained digest")
