"""Personal data masking (gateway/masking.py): Gw-User, resident IDs, mobile numbers and
each service's sensitive fields (JSON Pointers) hidden in the one operator view of a
message (admin API, `gateway log show`), errors and logs, while the exchange itself
carries them unchanged."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import STORE
from gateway.cli import main
from gateway.errors import MalformedRequest
from gateway.logs import JsonFormatter, TextFormatter
from gateway.masking import MASK, mask_headers, mask_pointers, masked_body
from gateway.problem import problem_body
from gateway.signing import Signer
from simulators.common import signed_json
from tests.conftest import (
    APPLY_EXAMPLE,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    unused_port,
)

RESIDENT_ID = "11010519491231002X"
MASKED_ID = "110105********002X"
PERSON = {
    **APPLY_EXAMPLE,
    "applicant": {
        "type": "person",
        "resident_id": RESIDENT_ID,
        "name": "张三丰",
        "phone": "13800138000",
    },
    "materials": [
        {"name": "身份证", "ref": "mat://330000/2026/secret-1"},
        {"name": "户口簿", "ref": "mat://330000/2026/secret-2"},
    ],
}
SENSITIVE = ["/applicant/name", "/applicant/phone", "/materials/*/ref"]


# Pointers ------------------------------------------------------------------------------


def test_mask_pointers_hides_exactly_the_pointed_values() -> None:
    """Object members, array indexes, ~0/~1 escapes and the * wildcard; nothing else moves."""
    doc = {
        "a": {"b": 1, "c": 2},
        "list": [{"x": 1, "y": 2}, {"x": 3, "y": 4}],
        "odd/key": "v",
        "tilde~key": "w",
        "map": {"p": {"k": 1}, "q": {"k": 2}},
    }
    original = copy.deepcopy(doc)
    masked = mask_pointers(doc, ["/a/b", "/list/*/x", "/odd~1key", "/tilde~0key", "/map/*/k"])
    assert masked == {
        "a": {"b": MASK, "c": 2},
        "list": [{"x": MASK, "y": 2}, {"x": MASK, "y": 4}],
        "odd/key": MASK,
        "tilde~key": MASK,
        "map": {"p": {"k": MASK}, "q": {"k": MASK}},
    }
    assert doc == original  # the stored document is never changed
    assert mask_pointers(doc, ["/list/1/y"])["list"][1] == {"x": 3, "y": MASK}
    assert mask_pointers(doc, [""]) == MASK  # the whole document


@pytest.mark.parametrize("pointer", ["/absent", "/a/b/deeper", "/list/2/x", "/list/01/x", "/a/-"])
def test_a_pointer_that_does_not_resolve_changes_nothing(pointer: str) -> None:
    """Absent members, indexes out of range or with a leading zero: the document as it was."""
    doc = {"a": {"b": 1}, "list": [{"x": 1}, {"x": 2}]}
    assert mask_pointers(doc, [pointer]) == doc


def test_masked_body_masks_ids_everywhere_and_fields_by_pointer() -> None:
    """JSON: pointers and resident IDs (also in keys); other text: IDs; None stays None."""
    body = json.dumps({"note": f"id {RESIDENT_ID}", RESIDENT_ID: 1, "name": "李四"}).encode()
    assert masked_body(body, ["/name"]) == {"note": f"id {MASKED_ID}", MASKED_ID: 1, "name": MASK}
    assert masked_body(f"not json {RESIDENT_ID}".encode(), ["/name"]) == f"not json {MASKED_ID}"
    assert masked_body(None) is None


def test_mask_headers_hides_the_user_and_credentials() -> None:
    """Gw-User, Authorization and Cookie become ***; resident IDs in other headers are masked."""
    headers = {
        "Gw-User": "inspector-7",
        "authorization": "Bearer x",
        "Cookie": "s=1",
        "Gw-Issue": f"A-{RESIDENT_ID}",
        "Gw-Client": "330000:one-stop-portal",
    }
    assert mask_headers(headers) == {
        "Gw-User": MASK,
        "authorization": MASK,
        "Cookie": MASK,
        "Gw-Issue": f"A-{MASKED_ID}",
        "Gw-Client": "330000:one-stop-portal",
    }


def test_problem_details_never_carry_a_resident_id() -> None:
    """Whatever an error's detail says, its problem+json masks resident IDs."""
    body = problem_body(MalformedRequest(f"bad value {RESIDENT_ID}"))
    assert body["detail"] == f"bad value {MASKED_ID}"


# End to end ----------------------------------------------------------------------------


def _sensitive(doc: dict[str, Any]) -> None:
    doc["services"][1]["sensitive"] = SENSITIVE


async def _send_person(h: Harness) -> str:
    reply = await h.client("portal").exchange(
        "crossregion.apply", PERSON, headers={"Gw-User": "inspector-7"}
    )
    assert reply.status == 202, reply.body
    message_id: str = reply.json()["message_id"]
    return message_id


def _config_file(keys: Keys, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """The harness's config as a file, for the command line (same store, same edits)."""
    doc = config_document(keys, store=tmp_path / "gateway.db", national_url="http://127.0.0.1:9")
    edit(doc)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return str(config)


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command as `gateway` does; its own event loop runs in a thread beside this one."""
    assert await asyncio.to_thread(main, list(argv)) == 0
    return capsys.readouterr().out


def _assert_masked(view: Any) -> None:
    text = json.dumps(view, ensure_ascii=False)
    for secret in (RESIDENT_ID, "张三丰", "13800138000", "secret-1", "secret-2", "inspector-7"):
        assert secret not in text, secret


async def test_admin_views_mask_sensitive_fields_ids_and_the_user(
    make_harness: HarnessFactory,
) -> None:
    """GET /admin/v1/messages/{id} and the search: pointers, IDs and Gw-User masked."""
    h = await make_harness(_sensitive)
    message_id = await _send_person(h)
    async with h.admin.get(f"/admin/v1/messages/{message_id}", headers=h.auth()) as resp:
        view = await resp.json()
    applicant = view["request"]["applicant"]
    assert applicant == {
        "type": "person",
        "resident_id": MASKED_ID,
        "name": MASK,
        "phone": MASK,
    }
    assert [m["ref"] for m in view["request"]["materials"]] == [MASK, MASK]
    assert [m["name"] for m in view["request"]["materials"]] == ["身份证", "户口簿"]
    assert view["request_headers"]["Gw-User"] == MASK
    _assert_masked(view)
    async with h.admin.get("/admin/v1/messages?service=crossregion.apply", headers=h.auth()) as r:
        _assert_masked(await r.json())


async def test_the_stored_document_is_not_masked(make_harness: HarnessFactory) -> None:
    """Masking is for views only: the stored body (what is delivered) is untouched."""
    h = await make_harness(_sensitive)
    message_id = await _send_person(h)
    record = await h.app[STORE].get_message("330000:one-stop-portal", message_id)
    assert record is not None
    assert record.request_body is not None
    assert json.loads(record.request_body)["applicant"]["name"] == "张三丰"


async def test_log_show_masks_sensitive_fields(
    make_harness: HarnessFactory,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`gateway log show` prints the exchange with the service's sensitive fields masked."""
    h = await make_harness(_sensitive)
    message_id = await _send_person(h)
    config = _config_file(keys, tmp_path, _sensitive)
    shown = json.loads(await _cli(capsys, "log", "show", message_id, "--config", config))
    request = shown["request"]
    assert request["applicant"]["name"] == MASK
    assert request["applicant"]["resident_id"] == MASKED_ID
    assert shown["request_headers"]["Gw-User"] == MASK
    _assert_masked(shown)


async def test_schema_errors_and_logs_never_echo_personal_data(
    make_harness: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected document's problem names pointers, not values; the exchange log line
    carries neither the user nor the document."""
    h = await make_harness(_sensitive)
    bad = {**PERSON, "applicant": {**PERSON["applicant"], "phone": "99-张三丰"}}
    with caplog.at_level(logging.INFO):
        reply = await h.client("portal").exchange(
            "crossregion.apply", bad, headers={"Gw-User": "inspector-7"}
        )
    assert (reply.status, reply.json()["code"]) == (422, "schema_invalid")
    assert "/applicant" in {e["pointer"] for e in reply.json()["errors"]}
    _assert_masked(reply.json())
    assert "99-张三丰" not in reply.body.decode()
    assert any(r.name == "gateway.exchange" for r in caplog.records)
    _assert_masked(caplog.text)


# An upstream's own words -----------------------------------------------------------

PHONE = "13800138000"
MASKED_PHONE = "138****8000"
REFUSAL = f"申请人 {RESIDENT_ID}（手机 {PHONE}）已有在办申请"


async def _refusing_platform(keys: Keys) -> TestServer:
    """A national platform on loopback that refuses every exchange, in a signed answer
    whose free-text message names the applicant."""
    signer = Signer(keys.pairs["national"], label="sig1")

    async def exchange(request: web.Request) -> web.Response:
        await request.read()
        return signed_json(request, signer, 200, {"code": "E409", "message": REFUSAL})

    app = web.Application()
    app.router.add_post("/api/v1/exchange", exchange)
    server = TestServer(app, port=unused_port())
    await server.start_server()
    return server


def _via_platform(url: str, keys: Keys) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["adapters"].append(
            {
                "name": "platform",
                "type": "national_platform",
                "config": {"base_url": url, "platform_keys": [keys.jwk_file("national")]},
            }
        )
        doc["routes"] = [{"service": "crossregion.apply", "adapter": "platform"}]
        _sensitive(doc)

    return edit


async def test_an_upstream_error_naming_a_person_is_masked_in_every_view(
    make_harness: HarnessFactory,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real platform refuses with the applicant's resident ID and phone in its message:
    the admin API, `log show`, `dead-letters list` and the log lines show them masked,
    and `log show` prints the admin API's view (same fields, same values)."""
    platform = await _refusing_platform(keys)
    try:
        edit = _via_platform(str(platform.make_url("")).rstrip("/"), keys)
        h = await make_harness(edit)
        with caplog.at_level(logging.INFO):
            message_id = await _send_person(h)

            async def dead() -> bool:
                return await h.state_of(message_id) == "dead"

            await h.wait_for(dead)
    finally:
        await platform.close()
    record = await h.app[STORE].get_message("330000:one-stop-portal", message_id)
    assert record is not None
    assert record.error is not None
    assert RESIDENT_ID in record.error
    assert PHONE in record.error
    masked = f"申请人 {MASKED_ID}（手机 {MASKED_PHONE}）已有在办申请"

    async with h.admin.get(f"/admin/v1/messages/{message_id}", headers=h.auth()) as resp:
        view = await resp.json()
    assert view["error"].endswith(masked)
    _assert_masked(view)
    async with h.admin.get("/admin/v1/dead-letters", headers=h.auth()) as resp:
        (letter,) = (await resp.json())["dead_letters"]
    assert letter["error"].endswith(masked)

    config = _config_file(keys, tmp_path, edit)
    shown = json.loads(await _cli(capsys, "log", "show", message_id, "--config", config))
    assert shown["error"] == view["error"]
    _assert_masked(shown)
    times = ("created_at", "updated_at")
    assert {k: v for k, v in shown.items() if k not in times} == {
        k: v for k, v in view.items() if k not in times
    }
    table = await _cli(capsys, "dead-letters", "list", "--config", config)
    assert MASKED_PHONE in table
    assert MASKED_ID in table
    _assert_masked(table)

    delivery = [r for r in caplog.records if getattr(r, "event", None) == "delivery"]
    assert delivery
    assert all(PHONE in str(getattr(r, "error", "")) for r in delivery)
    for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
        lines = [formatter.format(r) for r in delivery]
        assert all(MASKED_PHONE in line and MASKED_ID in line for line in lines)
        _assert_masked("\n".join(lines))
