"""The message log's retention: archive old records now (``gateway log archive``) or in
the background (``log.retention`` in config.yaml), with a transfer hook per archive.

The background task runs every ``interval_s`` and archives only while this process holds
the store's ``log.retention`` lock (``Store.exclusive``): one archiver at a time across
every instance and worker on the store, and the lock goes when its holder dies. The
archiving itself (format, fsync, verify before delete) is ``gateway.audit.archive``.

Metrics (on the gateway's registry): ``gateway_log_archived_records_total`` (chain
records archived), ``gateway_log_archived_rows_total``, ``gateway_log_archive_bytes_total``,
``gateway_log_archive_last_run_timestamp_seconds`` (the last run that held the lock and
finished), ``gateway_log_archive_failures_total`` (runs or transfers that failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.audit import make_checkpoint
from gateway.audit.archive import ArchiveRun, write_archives
from gateway.config.model import RetentionConfig
from gateway.crypto.keys import KeyPair
from gateway.errors import GatewayError
from gateway.store import Store

__all__ = ["LOCK", "Retention", "archive_now", "run_hook"]

log = logging.getLogger("gateway.audit.retention")

LOCK = "log.retention"  # the store-wide lock the archiver holds while it runs


def run_hook(command: str, path: Path, attempts: int = 3, pause_s: float = 1.0) -> bool:
    """The transfer hook: ``COMMAND FILE`` without a shell, retried with a doubling pause;
    True once it exits 0. The archive stays where it is either way."""
    argv = [*shlex.split(command), str(path)]
    for attempt in range(attempts):
        try:
            # The operator's own command, from config or the command line, with no shell.
            done = subprocess.run(argv, capture_output=True, timeout=600, check=False)  # noqa: S603
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("transfer hook failed for %s: %s", path.name, exc)
        else:
            if done.returncode == 0:
                return True
            log.warning(
                "transfer hook exited %d for %s: %s",
                done.returncode,
                path.name,
                done.stderr.decode(errors="replace").strip()[:200],
            )
        if attempt + 1 < attempts:
            time.sleep(pause_s * 2**attempt)
    return False


async def archive_now(
    store: Store,
    keypair: KeyPair,
    jwks: Mapping[str, Any],
    *,
    gateway: str,
    to: Path,
    older_than_s: float,
    max_bytes: int,
    now: float | None = None,
) -> ArchiveRun:
    """Sign the head (a checkpoint must cover what is archived), then archive."""
    now = time.time() if now is None else now
    await make_checkpoint(store, keypair, gateway)
    return await write_archives(
        store,
        keypair,
        jwks,
        gateway=gateway,
        to=to,
        cutoff=now - older_than_s,
        now=now,
        max_bytes=max_bytes,
    )


class Retention:
    """Archives in the background while this process holds the retention lock."""

    def __init__(
        self,
        *,
        store: Store,
        keypair: KeyPair,
        jwks: Mapping[str, Any],
        gateway: str,
        config: RetentionConfig,
        registry: CollectorRegistry,
    ) -> None:
        self.store, self.keypair, self.jwks = store, keypair, jwks
        self.gateway, self.config = gateway, config
        self._task: asyncio.Task[None] | None = None
        self.records = Counter(
            "gateway_log_archived_records_total",
            "Message log chain records moved to archive files.",
            registry=registry,
        )
        self.rows = Counter(
            "gateway_log_archived_rows_total",
            "Messages, callbacks and rejections moved to archive files.",
            registry=registry,
        )
        self.bytes = Counter(
            "gateway_log_archive_bytes_total",
            "Bytes of archive files written.",
            registry=registry,
        )
        self.last_run = Gauge(
            "gateway_log_archive_last_run_timestamp_seconds",
            "When the archiver last finished a run (this instance held the lock).",
            registry=registry,
            multiprocess_mode="max",
        )
        self.failures = Counter(
            "gateway_log_archive_failures_total",
            "Archive runs or transfers that failed.",
            registry=registry,
        )

    async def run_once(self) -> ArchiveRun | None:
        """One run, if this process holds the lock; None when another one does."""
        async with self.store.exclusive(LOCK) as leader:
            if not leader:
                return None
            done = await archive_now(
                self.store,
                self.keypair,
                self.jwks,
                gateway=self.gateway,
                to=self.config.to,
                older_than_s=self.config.older_than_s,
                max_bytes=self.config.max_bytes,
            )
            if done.cut:
                self.records.inc(done.records)
                self.rows.inc(done.rows)
                self.bytes.inc(done.bytes)
                log.info(
                    "archived %d records (%d rows) into %d file(s)",
                    done.records,
                    done.rows,
                    len(done.files),
                )
                for path in done.files if self.config.hook else ():
                    assert self.config.hook is not None
                    if not await asyncio.to_thread(run_hook, self.config.hook, path):
                        self.failures.inc()
            self.last_run.set(time.time())
            return done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-retention")

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except (GatewayError, OSError):
                self.failures.inc()
                log.warning("archiving the message log failed; will retry", exc_info=True)
            await asyncio.sleep(self.config.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
