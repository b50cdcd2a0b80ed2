"""The event-loop choice (gateway/serve/eventloop.py): uvloop when installed, else asyncio."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import uvloop

from gateway.serve import eventloop
from tests.conftest import Keys
from tests.test_observability import _serve_config, until_healthy

pytestmark = pytest.mark.integration  # starts gateway processes


def test_auto_picks_uvloop_when_it_is_installed() -> None:
    """uvloop is a dependency on Linux: ``auto`` resolves to it; explicit names stay."""
    assert eventloop.resolve("auto") == "uvloop"
    assert eventloop.resolve("asyncio") == "asyncio"
    assert eventloop.resolve("uvloop") == "uvloop"


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        eventloop.resolve("trio")


@pytest.mark.parametrize(("name", "loop_type"), [("uvloop", uvloop.Loop), ("asyncio", None)])
def test_run_uses_the_chosen_loop(name: str, loop_type: type | None) -> None:
    """The coroutine runs to its result on a loop of the chosen kind."""

    async def which() -> tuple[type, int]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()), 42

    kind, result = eventloop.run(which(), name)
    assert result == 42
    if loop_type is not None:
        assert kind is loop_type
    else:
        assert not issubclass(kind, uvloop.Loop)
        assert issubclass(kind, asyncio.BaseEventLoop)


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
async def test_gateway_serve_runs_on_the_loop_it_was_given(
    name: str, keys: Keys, tmp_path: Path
) -> None:
    """``gateway serve --loop X`` says which loop it runs and answers on it."""
    port = _serve_config(keys, tmp_path / name, {"level": "warning", "format": "text"})
    out_path = tmp_path / "stdout.txt"
    with out_path.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--loop",
                name,
                "--config",
                str(tmp_path / name / "config.yaml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await until_healthy(session, process, port, out_path)
    finally:
        process.terminate()
        assert process.wait(10) == 0
    assert f"({name} event loop)" in out_path.read_text()
