"""The checkpoint signer: signs the message log's head now and then, and at shutdown.

The store does the signing under its own lock (``Store.sign_checkpoint``): two workers
or instances never sign one head twice, and a chain whose signed part changed is never
signed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.audit.jws import sign_jws
from gateway.crypto.keys import KeyPair
from gateway.errors import GatewayError
from gateway.store import Store
from gateway.store.chain import CheckpointRow, Head

__all__ = ["CheckpointSigner", "make_checkpoint"]

log = logging.getLogger("gateway.audit")


async def make_checkpoint(store: Store, keypair: KeyPair, gateway: str) -> CheckpointRow | None:
    """Sign the chain head and store the checkpoint; ``None`` when it is signed already."""

    def sign(head: Head, at: float) -> tuple[str, str]:
        payload = {"gateway": gateway, "seq": head.seq, "hash": head.hash, "at": at}
        return keypair.kid, sign_jws(keypair, payload)

    return await store.sign_checkpoint(sign)


class CheckpointSigner:
    """Signs the chain head every ``interval_s`` when it moved, and once more at shutdown."""

    def __init__(
        self,
        *,
        store: Store,
        keypair: KeyPair,
        gateway: str,
        interval_s: float,
        on_signed: Callable[[CheckpointRow], None] | None = None,
    ) -> None:
        self.store = store
        self.on_signed = on_signed  # told of each checkpoint signed (the TSA stamper)
        self.keypair = keypair
        self.gateway = gateway
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def checkpoint(self) -> CheckpointRow | None:
        made = await make_checkpoint(self.store, self.keypair, self.gateway)
        if made is not None and self.on_signed is not None:
            self.on_signed(made)
        return made

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-checkpoints")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.checkpoint()
            except GatewayError:
                log.warning("could not sign a checkpoint; will retry", exc_info=True)

    async def stop(self) -> None:
        """Stop the timer and sign what the last requests appended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.checkpoint()
        except GatewayError:
            log.warning("could not sign the final checkpoint", exc_info=True)
