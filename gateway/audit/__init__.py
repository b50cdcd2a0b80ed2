"""Tamper evidence for the message log: signed checkpoints, verification, evidence bundles.

The store appends one hash-chained record per evidential event (``gateway/store/chain.py``);
this package works on it through the store, on either backend:

- ``jws``: checkpoints, compact JWS over ``{gateway, seq, hash, at}`` with the gateway's
  key, verifiable with its JWKS;
- ``verify``: walks a store's chain in one snapshot and names the first break;
- ``bundle``: exports one message as an evidence bundle, and checks one offline;
- ``signer``: the task that signs the head now and then, and at shutdown (and tells the
  TSA stamper, gateway/audit/timestamping.py, of each checkpoint it signed).

Formats and the reasoning behind them: ``docs/audit.md``.
"""

from __future__ import annotations

from gateway.audit.bundle import (
    BUNDLE_FORMAT,
    BundleReport,
    canonical_bundle,
    check_bundle,
    export_bundle,
    stamp_files,
)
from gateway.audit.jws import CHECKPOINT_TYPE, JwsInvalid, jwks_from, sign_jws, verify_jws
from gateway.audit.signer import CheckpointSigner, make_checkpoint
from gateway.audit.verify import KINDS, Finding, Report, verify_chain, verify_store

__all__ = [
    "BUNDLE_FORMAT",
    "CHECKPOINT_TYPE",
    "KINDS",
    "BundleReport",
    "CheckpointSigner",
    "Finding",
    "JwsInvalid",
    "Report",
    "canonical_bundle",
    "check_bundle",
    "export_bundle",
    "jwks_from",
    "make_checkpoint",
    "sign_jws",
    "stamp_files",
    "verify_chain",
    "verify_jws",
    "verify_store",
]
