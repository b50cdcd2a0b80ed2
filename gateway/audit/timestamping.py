"""Third-party time: RFC 3161 time stamps on the message log's checkpoints.

A checkpoint is signed by the gateway's own key, so an operator holding that key could
re-sign a rewritten history. With ``timestamping.url`` configured, every checkpoint is
also stamped by a time-stamping authority (TSA): one stamp per checkpoint, whose message
imprint is the SHA-256 of the checkpoint as signed (its compact JWS, ``stamped_data``),
asked with a nonce and with the TSA's certificate in the answer (certReq).

- ``StampTrust``: what stamps are verified against (``timestamping.ca`` and the pinned
  ``timestamping.cert``);
- ``check_stamp``: a stamp against that trust and the data it must cover;
- ``request_stamp``: one request to the TSA, its answer checked before it is kept;
- ``Stamper``: the background task that stamps what is unstamped, retried with backoff.
  A TSA outage never stops exchanges: the unstamped span (how many, the oldest's age) is
  a metric and, past ``timestamping.warn_after``, a ``/readyz`` warning, never a reason.
  Across instances on one PostgreSQL store a checkpoint is claimed by one instance at a
  time (a lease in the store), so one stamps it: normally the one that signed it, which
  is woken right after signing.

The ASN.1 and CMS work is rfc3161-client's (why: docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from rfc3161_client import (
    HashAlgorithm,
    PKIStatus,
    TimestampRequestBuilder,
    TimeStampResponse,
    VerificationError,
    VerifierBuilder,
    decode_timestamp_response,
)

from gateway.backoff import backoff_delay
from gateway.errors import ConfigError, GatewayError, TimestampError
from gateway.store.chain import CheckpointRow

if TYPE_CHECKING:
    from gateway.config.model import TimestampingConfig
    from gateway.observe.metrics import Metrics
    from gateway.store import Store

__all__ = [
    "CLOCK_SKEW_S",
    "QUERY_TYPE",
    "REPLY_TYPE",
    "Stamp",
    "StampTrust",
    "Stamper",
    "StamperState",
    "check_stamp",
    "request_stamp",
    "signer_certificate",
    "stamp_checkpoints",
    "stamped_data",
]

log = logging.getLogger("gateway.audit.timestamping")

QUERY_TYPE = "application/timestamp-query"
REPLY_TYPE = "application/timestamp-reply"
# How far the TSA's clock may be behind ours: a stamp dated more than this before the
# checkpoint it covers was signed is ``untimely`` (it cannot have seen that checkpoint).
CLOCK_SKEW_S = 120.0
_SHA256 = x509.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
MAX_REPLY = 64 * 1024  # a stamp with its certificate is a few KiB


def stamped_data(cp: CheckpointRow) -> bytes:
    """The bytes a checkpoint's stamp covers: the checkpoint as signed, its compact JWS
    (which covers ``{gateway, seq, hash, at}`` and the gateway's signature of them)."""
    return cp.jws.encode("ascii")


@dataclass(frozen=True, slots=True)
class StampTrust:
    """The CA certificates a stamp must chain to, and the TSA certificate pinned (if any)."""

    roots: tuple[x509.Certificate, ...]
    cert: x509.Certificate | None = None

    @classmethod
    def load(cls, ca: Path, cert: Path | None = None) -> StampTrust:
        try:
            roots = tuple(x509.load_pem_x509_certificates(ca.read_bytes()))
            pinned = x509.load_pem_x509_certificate(cert.read_bytes()) if cert else None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [f"/timestamping: cannot load the TSA's certificates: {exc}"]
            ) from exc
        if not roots:
            raise ConfigError([f"/timestamping/ca: {ca} holds no certificate"])
        return cls(roots=roots, cert=pinned)

    @classmethod
    def of(cls, config: TimestampingConfig) -> StampTrust:
        return cls.load(config.ca, config.cert)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamp:
    """A stamp that verified: when the TSA says it saw the data, and who the TSA is."""

    gen_time: float
    serial: int
    tsa_cert: x509.Certificate | None  # the certificate that signed it, from the reply

    @property
    def tsa_cert_pem(self) -> bytes | None:
        return None if self.tsa_cert is None else self.tsa_cert.public_bytes(Encoding.PEM)


def _decode(tsr: bytes) -> TimeStampResponse:
    try:
        return decode_timestamp_response(tsr)
    except (ValueError, TypeError) as exc:
        raise TimestampError("malformed", f"not an RFC 3161 time-stamp response: {exc}") from exc


def signer_certificate(resp: TimeStampResponse) -> x509.Certificate | None:
    """The certificate in a stamp that signed it (a stamp asked with certReq has it)."""
    infos = list(resp.signed_data.signer_infos)
    for der in resp.signed_data.certificates:
        cert = x509.load_der_x509_certificate(der)
        if (
            infos
            and cert.issuer == infos[0].issuer
            and cert.serial_number == infos[0].serial_number
        ):
            return cert
    return None


def check_stamp(
    tsr: bytes,
    data: bytes,
    trust: StampTrust,
    *,
    nonce: int | None = None,
    not_before: float | None = None,
    not_after: float | None = None,
) -> Stamp:
    """``tsr`` (a DER TimeStampResp) is a granted stamp of SHA-256(``data``), signed by a
    TSA certificate (critical EKU timeStamping) that chains to ``trust`` (and is the pinned
    one), with ``nonce`` if given, dated within [not_before − CLOCK_SKEW_S, not_after];
    else ``TimestampError`` with the reason."""
    resp = _decode(tsr)
    if PKIStatus(resp.status) not in (PKIStatus.GRANTED, PKIStatus.GRANTED_WITH_MODS):
        raise TimestampError("malformed", f"the TSA did not grant the stamp (status {resp.status})")
    try:
        info = resp.tst_info
        imprint = info.message_imprint
    except ValueError as exc:
        raise TimestampError("malformed", f"the stamp has no readable TSTInfo: {exc}") from exc
    if imprint.hash_algorithm != _SHA256:
        raise TimestampError("mismatched", "the stamp's imprint is not SHA-256")
    if imprint.message != hashlib.sha256(data).digest():
        raise TimestampError("mismatched", "the stamp covers other data (its imprint differs)")
    verifier = VerifierBuilder(roots=list(trust.roots), tsa_certificate=trust.cert, nonce=nonce)
    try:
        verifier.build().verify(resp, imprint.message)
    except (VerificationError, ValueError) as exc:
        raise TimestampError("forged", f"the stamp does not verify against the TSA: {exc}") from exc
    gen = info.gen_time
    if gen.tzinfo is None:
        gen = gen.replace(tzinfo=dt.UTC)
    at = gen.timestamp()
    if not_before is not None and at < not_before - CLOCK_SKEW_S:
        raise TimestampError(
            "untimely", f"the stamp's time {gen.isoformat()} is before the checkpoint was signed"
        )
    if not_after is not None and at > not_after + CLOCK_SKEW_S:
        raise TimestampError("untimely", f"the stamp's time {gen.isoformat()} is in the future")
    return Stamp(
        gen_time=at, serial=info.serial_number, tsa_cert=signer_certificate(resp) or trust.cert
    )


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, refused past MAX_REPLY bytes (and then never read in full)."""
    too_long = TimestampError("malformed", f"the TSA's answer exceeds {MAX_REPLY} bytes")
    if resp.content_length is not None and resp.content_length > MAX_REPLY:
        raise too_long
    body = bytearray()
    while chunk := await resp.content.read(MAX_REPLY + 1 - len(body)):
        body += chunk
        if len(body) > MAX_REPLY:
            raise too_long
    return bytes(body)


async def request_stamp(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes,
    trust: StampTrust,
    *,
    timeout_s: float,
    not_before: float | None = None,
) -> tuple[bytes, Stamp]:
    """Ask the TSA at ``url`` to stamp ``data``; the DER reply and what it says, checked
    (imprint, nonce, signature, time) before anyone keeps it."""
    request = (
        TimestampRequestBuilder()
        .data(data)
        .hash_algorithm(HashAlgorithm.SHA256)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )
    try:
        async with session.post(
            url,
            data=request.as_bytes(),
            headers={"Content-Type": QUERY_TYPE, "Accept": REPLY_TYPE},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,  # outbound requests go only where configured
        ) as resp:
            if resp.status != 200:
                raise TimestampError("unavailable", f"the TSA answered HTTP {resp.status}")
            tsr = await _read_capped(resp)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TimestampError("unavailable", f"the TSA did not answer: {exc!r}") from exc
    stamp = check_stamp(
        tsr, data, trust, nonce=request.nonce, not_before=not_before, not_after=time.time()
    )
    return tsr, stamp


async def stamp_checkpoints(
    store: Store,
    session: aiohttp.ClientSession,
    config: TimestampingConfig,
    trust: StampTrust,
    *,
    lease_s: float,
    limit: int = 20,
) -> int:
    """Claim the unstamped checkpoints (a lease: no other instance asks meanwhile), stamp
    each and store the stamp with it; how many were stamped. The first TSA failure raises
    ``TimestampError`` (the rest stay claimed by us and are retried)."""
    done = 0
    for cp in await store.claim_unstamped(time.time(), lease_s, limit):
        tsr, stamp = await request_stamp(
            session,
            config.url,
            stamped_data(cp),
            trust,
            timeout_s=config.timeout_s,
            not_before=cp.at,
        )
        if await store.save_stamp(cp.id, tsr, stamp.gen_time, time.time()):
            done += 1
    return done


class StamperState(enum.Enum):
    IDLE = "idle"  # created, not started
    RUNNING = "running"  # stamping what is unstamped, waiting for the next checkpoint
    RETRYING = "retrying"  # the TSA failed: backing off before the next try
    STOPPED = "stopped"  # stopped; unstamped checkpoints wait for the next start


class Stamper:
    """Stamps every checkpoint in the background, retried with backoff; never in the way."""

    def __init__(
        self,
        *,
        store: Store,
        config: TimestampingConfig,
        trust: StampTrust,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics | None = None,
        poll_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.trust = trust
        self.session = session
        self.metrics = metrics
        self.poll_s = poll_s
        self.rng = rng or random.Random()  # noqa: S311 (backoff jitter, not a secret)
        # Long enough for a whole backoff round: no other instance asks the TSA meanwhile.
        self.lease_s = max(60.0, 2 * config.retry_max_s + 2 * config.timeout_s)
        self.state = StamperState.IDLE
        self.unstamped = 0
        self.oldest_at: float | None = None  # when the oldest unstamped checkpoint was signed
        self.last_error: str | None = None
        self.attempt = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.state = StamperState.RUNNING
        self._task = asyncio.create_task(self._run(), name="audit-timestamps")

    def wake(self) -> None:
        """A checkpoint was just signed: stamp it now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.state = StamperState.STOPPED

    async def round(self) -> int:
        """One round: stamp what is unstamped, then read the backlog; raises on a TSA
        failure after reading it."""
        failure: TimestampError | None = None
        done = 0
        try:
            done = await stamp_checkpoints(
                self.store, self.session(), self.config, self.trust, lease_s=self.lease_s
            )
        except TimestampError as exc:
            failure = exc
        await self.refresh()
        if failure is not None:
            raise failure
        return done

    async def refresh(self) -> None:
        self.unstamped, self.oldest_at = await self.store.stamp_backlog()
        if self.metrics is not None:
            self.metrics.set_stamp_backlog(self.unstamped, self.oldest_at)

    async def _run(self) -> None:
        while True:
            delay = self.poll_s
            self._wake.clear()  # a checkpoint signed from here on is seen by this round
            try:
                await self.round()
                self.attempt, self.last_error = 0, None
                self.state = StamperState.RUNNING
            except TimestampError as exc:
                self.attempt += 1
                self.last_error = f"{exc.reason}: {exc.detail}"
                self.state = StamperState.RETRYING
                delay = backoff_delay(
                    self.attempt, self.config.retry_base_s, self.config.retry_max_s, self.rng
                )
                log.warning("could not stamp a checkpoint (%s); retrying", self.last_error)
            except GatewayError:
                log.warning("could not read the checkpoints to stamp; will retry", exc_info=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def warning(self, now: float | None = None) -> str | None:
        """The ``/readyz`` warning: checkpoints unstamped past ``warn_after``, or None."""
        if not self.unstamped or self.oldest_at is None:
            return None
        age = (time.time() if now is None else now) - self.oldest_at
        if age <= self.config.warn_after_s:
            return None
        why = f"; last error: {self.last_error}" if self.last_error else ""
        return (
            f"timestamping: {self.unstamped} checkpoint(s) without a TSA stamp, the oldest "
            f"signed {age:.0f} s ago (warn_after {self.config.warn_after_s:g} s){why}"
        )
