"""The test harness itself (tests/conftest.py): a start that fails closes what it started."""

from __future__ import annotations

import errno
import socket
from contextlib import AsyncExitStack

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from simulators import national as nat
from simulators import portal as por
from tests.conftest import NATIONAL_ID, PORTAL_ID, Keys, reserve_port, start_on


def _bind(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """aiohttp's default socket factory, but closing its socket when the bind fails."""
    sock = socket.socket(family)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def test_a_start_refused_its_port_closes_its_app_and_those_before_it(keys: Keys) -> None:
    """The portal's port is taken (as by another process between choice and bind): the
    error is the bind's, and both simulators' sessions are closed, none left to the GC."""
    trusted = keys.verification("gateway")
    nat_app = nat.create_national_app(
        nat.NationalPlatform(
            member_id=NATIONAL_ID,
            keypair=keys.pairs["national"],
            trusted=trusted,
            callback_base="http://127.0.0.1:9",
        )
    )
    portal_app = por.create_portal_app(
        por.Portal(
            member_id=PORTAL_ID,
            keypair=keys.pairs["portal"],
            gateway_keys=trusted,
            gateway_url="http://127.0.0.1:9",
        )
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with AsyncExitStack() as stack:
            await start_on(stack, TestServer(nat_app))
            with pytest.raises(OSError, match="in use") as refused:
                await start_on(
                    stack, TestServer(portal_app, port=taken.getsockname()[1], socket_factory=_bind)
                )
            assert refused.value.errno == errno.EADDRINUSE
            # The portal's start-up ran before the bind was refused: its session is open.
            assert not portal_app[por.SESSION].closed
        assert nat_app[nat.SESSION].closed
        assert portal_app[por.SESSION].closed


async def test_a_reserved_port_is_held_until_its_server_takes_it() -> None:
    """Nobody else can bind a reserved port; the server given its socket listens on it."""
    async with AsyncExitStack() as stack:
        port, factory = reserve_port(stack)
        with socket.socket() as other, pytest.raises(OSError, match="in use") as refused:
            other.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
        server = TestServer(web.Application(), port=port, socket_factory=factory)
        await start_on(stack, server)
        assert server.port == port
