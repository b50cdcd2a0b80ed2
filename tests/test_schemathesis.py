"""Schemathesis against the live ingress and admin OpenAPI documents: zero server errors.

The ``st run`` CLI runs as a subprocess (its own event loop and Hypothesis engine) against
the harness's real servers on loopback, while this test's loop keeps serving them."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import Harness

pytestmark = pytest.mark.integration  # starts gateway processes

ST = Path(sys.executable).with_name("st")
ALL_PASSED = re.compile(r"(\d+) generated, \1 passed")
EXAMPLES = "15"  # per operation; both runs together stay well under a minute


async def run_schemathesis(base_url: str, *headers: str, report: Path) -> tuple[int, str]:
    """Run ``st run`` with only the not_a_server_error check; return its exit code and output."""
    args = [
        "run",
        f"{base_url}/openapi.json",
        "--url",
        base_url,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        EXAMPLES,
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--seed",
        "9421",
        "--report-dir",
        str(report),
        "--no-color",
    ]
    for header in headers:
        args += ["--header", header]
    process = await asyncio.create_subprocess_exec(
        str(ST),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": str(ST.parent), "NO_COLOR": "1", "HOME": str(report)},
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode("utf-8", "replace")


async def test_ingress_openapi_has_no_server_errors(harness: Harness, tmp_path: Path) -> None:
    """Every ingress operation, fuzzed unsigned from /openapi.json, never gets a 5xx."""
    code, output = await run_schemathesis(harness.url, report=tmp_path)
    assert code == 0, output[-6000:]
    assert ALL_PASSED.search(output), output[-6000:]


async def test_admin_openapi_has_no_server_errors(harness: Harness, tmp_path: Path) -> None:
    """Every admin operation, fuzzed with a valid admin token, never gets a 5xx."""
    base = str(harness.admin.make_url("")).rstrip("/")
    token = harness.auth("admin")["Authorization"]
    code, output = await run_schemathesis(base, f"Authorization: {token}", report=tmp_path)
    assert code == 0, output[-6000:]
    assert ALL_PASSED.search(output), output[-6000:]
