"""``gateway serve``'s sites: a start that fails closes what the app had opened."""

from __future__ import annotations

import copy
import errno
import socket
from pathlib import Path

import pytest

from gateway.cli.serve import _run_sites
from gateway.config.model import parse_config
from gateway.exchange.app import SESSION, create_app
from tests.conftest import Keys, config_document


async def test_an_ingress_refused_its_port_closes_what_its_start_up_opened(
    keys: Keys, tmp_path: Path
) -> None:
    """The app's start-up (store, session, delivery) ran before the bind was refused:
    the error is the bind's, and all of it is closed, none left to the GC."""
    doc = config_document(keys, store=tmp_path / "gw.db", national_url="http://127.0.0.1:9")
    app = create_app(parse_config(copy.deepcopy(doc), base=tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        site = (app, "127.0.0.1", taken.getsockname()[1], "gateway ingress")
        with pytest.raises(OSError, match="in use") as refused:
            await _run_sites([site], shutdown_timeout=1, quiet=True)
    assert refused.value.errno == errno.EADDRINUSE
    assert app[SESSION].closed
