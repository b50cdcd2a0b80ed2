"""Free ports for started processes (gateway/serve/ports.py): bindable, never ephemeral."""

from __future__ import annotations

import socket

from gateway.serve.ports import _ephemeral_range, free_port


def test_free_ports_are_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # chosen at random, not one port over and over
    for port in ports:
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_an_outgoing_connection_never_takes_a_port_it_returns() -> None:
    """The kernel picks local ports of outgoing connections from the ephemeral range."""
    low, high = _ephemeral_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        clients = [socket.create_connection(server.getsockname()) for _ in range(20)]
        try:
            assert all(low <= c.getsockname()[1] <= high for c in clients)
        finally:
            for c in clients:
                c.close()
