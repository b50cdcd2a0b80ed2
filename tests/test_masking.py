"""Personal data masking (gateway/masking.py): Gw-User, resident IDs (18 and 15 digits),
mobile numbers (separators, prefixes) as text, keys and JSON numbers, and each service's
sensitive fields (JSON Pointers) hidden in every view (admin API, console, `gateway log
show`, dead letters, problems, log lines, spans), while the exchange, the store and the
evidence carry them unchanged; what is not personal data (UUIDs, trace ids, times,
amounts, USCCs) stays as it is. Property tests generate the forms."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.cli import main
from gateway.config.model import TracingConfig
from gateway.errors import FieldError, MalformedRequest, SchemaInvalid
from gateway.exchange.app import STORE
from gateway.formats import resident_id_check_char
from gateway.masking import MASK, mask_headers, mask_personal, mask_pointers, masked_body
from gateway.observe.logs import JsonFormatter, TextFormatter
from gateway.observe.tracing import create_tracing
from gateway.problem import problem_body
from gateway.signing import Signer
from simulators.common import signed_json
from tests.conftest import (
    APPLY_EXAMPLE,
    PORTAL_ID,
    Harness,
    HarnessFactory,
    Keys,
    config_document,
    examples,
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


def test_problem_pointers_never_carry_a_phone_number() -> None:
    """A property named by a phone number is masked in the problem's pointers too."""
    error = SchemaInvalid("the document is invalid", [FieldError("/13800138000", "is not allowed")])
    assert problem_body(error)["errors"] == [
        {"pointer": "/138****8000", "message": "is not allowed"}
    ]


# Every form of personal data ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("330106198001011234", "330106********1234"),
        ("13912345678", "139****5678"),
        ("137-2222-3333", "137-****-3333"),
        ("+86 136 4444 5555", "+86 136 **** 5555"),
        ("135 6666 7777", "135 **** 7777"),
        ("138.0013.8000", "138.****.8000"),
        ("330106800101123", "330106******123"),
        ("0086 138 0013 8000", "0086 138 **** 8000"),
        ("008613800138000", "0086138****8000"),
        ("8613800138000", "86138****8000"),
        ("+86-13800138000", "+86-138****8000"),
        ("Tel13800138000", "Tel138****8000"),
        (
            "电话：137-2222-3333，身份证330106800101123。",
            "电话：137-****-3333，身份证330106******123。",
        ),
        # JSON-escaped text (ensure_ascii): 机 is \u673a, 朱 is \u6731 (a digit before).
        ("\\u673a13800138000", "\\u673a138****8000"),
        ("\\u6731330106198001011234", "\\u6731330106********1234"),
        ("first\\n13800138000", "first\\n138****8000"),
    ],
)
def test_mask_personal_masks_every_form_found_today(text: str, expected: str) -> None:
    """IDs of 18 and 15 digits, mobiles with separators and prefixes, escaped text."""
    assert mask_personal(text) == expected


def test_json_numbers_are_masked_in_documents() -> None:
    """A resident ID or a mobile number sent as a JSON number is shown masked (a string)."""
    body = b'{"id": 330106198001011234, "phone": 13912345678, "list": [8613800138000, 42]}'
    assert masked_body(body) == {
        "id": "330106********1234",
        "phone": "139****5678",
        "list": ["86138****8000", 42],
    }


@pytest.mark.parametrize(
    "text",
    [
        "91350100M000100Y43",  # a unified social credit code (public)
        "913301067048123481",  # an all-digit one (its check character is a digit)
        "2026-12-04T19:34:46.123Z",
        "2026-12-04T19:34:46+08:00",
        "20261204T193446Z",
        "1733338486123",  # a Unix time in ms
        "f47ac10b-58cc-4372-a567-a13812345678",  # a UUID
        "F47AC10B-58CC-4372-A567-A13812345678",
        "4bf92f3577b34da6a13800138000e473",  # a trace id
        "00-4bf92f3577b34da6a13800138000e473-00f067aa0ba902b7-01",  # a traceparent
        "13800138000.00",  # an amount
        "0.13800138000",
        "1380013.8000",
        "12800138000",  # no mobile prefix 12
        "330106198013011234",  # month 13
        "186753123456789012",  # a snowflake id
        "order 2026 item 42 seq 1733338486",
    ],
)
def test_mask_personal_leaves_what_is_not_personal_data(text: str) -> None:
    """USCCs, timestamps, UUIDs, trace ids, amounts and ids that are no date: unchanged."""
    assert mask_personal(text) == text


# Generated forms ---------------------------------------------------------------------

PROVINCES = ["11", "12", "13", "31", "33", "44", "46", "50", "54", "65", "71", "81", "82"]
MOBILE_PREFIXES = ["", "+86", "0086", "86", "+86 ", "0086 ", "86 ", "+86-", "0086-"]
SEPARATORS = ["", " ", "-", "."]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Form:
    """One piece of personal data as written, and as every view must show it."""

    text: str
    masked: str
    number: bool  # can also be sent as a JSON number


@st.composite
def resident_ids(draw: st.DrawFn) -> Form:
    """18 digits (valid or wrong check character, X or x) or the old 15."""
    region = draw(st.sampled_from(PROVINCES)) + draw(st.from_regex(r"[0-9]{4}", fullmatch=True))
    born = draw(st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(2026, 1, 1)))
    seq = draw(st.from_regex(r"[0-9]{3}", fullmatch=True))
    if draw(st.booleans()):
        head = region + born.strftime("%Y%m%d") + seq
        good = resident_id_check_char(head)
        check = good if draw(st.booleans()) else draw(st.sampled_from("0123456789Xx"))
        text = head + check
        return Form(text=text, masked=f"{region}********{seq}{check}", number=check.isdigit())
    text = region + born.strftime("%y%m%d") + seq
    return Form(text=text, masked=f"{region}******{seq}", number=True)


@st.composite
def mobiles(draw: st.DrawFn) -> Form:
    """Mainland mobile numbers with each prefix and each separator."""
    prefix = draw(st.sampled_from(MOBILE_PREFIXES))
    sep = draw(st.sampled_from(SEPARATORS))
    first = draw(st.from_regex(r"1[3-9][0-9]", fullmatch=True))
    middle, last = (draw(st.from_regex(r"[0-9]{4}", fullmatch=True)) for _ in range(2))
    text = f"{prefix}{first}{sep}{middle}{sep}{last}"
    number = not sep and prefix in ("", "86")
    return Form(text=text, masked=f"{prefix}{first}{sep}****{sep}{last}", number=number)


FORMS = resident_ids() | mobiles()
# Text around a form: no digit, hex letter, dot or backslash next to it (those would make
# it part of a longer number, an amount, a hex identifier or an escape).
AROUND = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cs", "Nd"), exclude_characters="abcdefABCDEF.\\"
    )
    | st.sampled_from("申请人手机身份证，。：（）"),
    max_size=12,
)
NOT_PERSONAL = st.one_of(
    st.uuids().map(str),
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.datetimes().map(lambda t: t.isoformat() + "Z"),
    st.integers(0, 10**9),
    st.decimals(min_value=0, max_value=10**12, places=2, allow_nan=False).map(str),
    st.floats(min_value=0, max_value=1e12, allow_nan=False).filter(lambda f: not f.is_integer()),
    st.just("91350100M000100Y43"),
    st.just("913301067048123481"),
)


@settings(max_examples=examples(500), deadline=None)
@given(form=FORMS, left=AROUND, right=AROUND)
def test_every_generated_form_is_masked_in_text(form: Form, left: str, right: str) -> None:
    """An ID or a mobile number, alone or inside free text, is masked and nothing else moves."""
    assert mask_personal(left + form.text + right) == left + form.masked + right


@settings(max_examples=examples(300), deadline=None)
@given(value=NOT_PERSONAL, left=AROUND, right=AROUND)
def test_what_is_not_personal_data_is_left_alone(value: object, left: str, right: str) -> None:
    """UUIDs, trace ids, ISO times, sequence numbers, amounts and USCCs stay as they are."""
    text = left + str(value) + right
    assert mask_personal(text) == text
    assert masked_body(json.dumps({"v": value, "t": text}).encode()) == {"v": value, "t": text}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Doc:
    """A generated document, the document every view must show, and the forms in it."""

    doc: Any
    shown: Any
    forms: tuple[Form, ...]


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    """A nested JSON document holding forms (as strings, numbers, in text, as a key) and
    values that are not personal data."""
    leaves: list[tuple[Any, Any]] = []
    forms: list[Form] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            value = draw(NOT_PERSONAL)
            leaves.append((value, value))
            continue
        form = draw(FORMS)
        forms.append(form)
        how = draw(st.sampled_from(["string", "number", "text"]))
        if how == "number" and form.number:
            leaves.append((int(form.text), form.masked))
        elif how == "text":
            left, right = draw(AROUND), draw(AROUND)
            leaves.append((left + form.text + right, left + form.masked + right))
        else:
            leaves.append((form.text, form.masked))
    doc: Any = {}
    shown: Any = {}
    for n, (value, masked) in enumerate(leaves):
        doc[f"f{n}"], shown[f"f{n}"] = value, masked
        if draw(st.booleans()):  # one level deeper, in a list
            doc, shown = {"items": [doc]}, {"items": [shown]}
    key = draw(FORMS)
    doc[key.text], shown[key.masked] = "by key", "by key"
    return Doc(doc=doc, shown=shown, forms=(*forms, key))


@settings(max_examples=examples(300), deadline=None)
@given(gen=documents(), ascii_only=st.booleans())
def test_every_generated_form_is_masked_in_documents(gen: Doc, ascii_only: bool) -> None:
    """Nested anywhere, as a string, a number, inside text or as a key: masked."""
    assert masked_body(json.dumps(gen.doc, ensure_ascii=ascii_only).encode()) == gen.shown


@settings(max_examples=examples(200), deadline=None)
@given(gen=documents(), form=FORMS, left=AROUND)
def test_every_generated_form_is_masked_in_log_lines(gen: Doc, form: Form, left: str) -> None:
    """JSON lines (message, text, number and nested extras) and text lines: masked."""
    extras: dict[str, Any] = {"doc": gen.doc, "text": left + form.text}
    if form.number:
        extras["number"] = int(form.text)
    record = logging.LogRecord(
        "gateway.test", logging.INFO, __file__, 1, "m %s", (form.text,), None
    )
    record.__dict__.update(extras)
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == f"m {form.masked}"
    assert line["doc"] == gen.shown
    assert line["text"] == left + form.masked
    if form.number:
        assert line["number"] == form.masked
    text = TextFormatter("%(message)s").format(record)
    assert form.text not in text
    assert f"m {form.masked}" in text


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


USCC = "913301067048123481"  # all digits: the old pattern took any 18 digits for an ID
ENTERPRISE = {
    **APPLY_EXAMPLE,
    "applicant": {"type": "enterprise", "uscc": USCC, "name": "模拟企业"},
}


def test_a_uscc_is_masked_only_where_a_service_lists_it() -> None:
    """A unified social credit code is a public business identifier: visible, unless the
    service lists its pointer as sensitive."""
    body = json.dumps(ENTERPRISE).encode()
    assert masked_body(body)["applicant"]["uscc"] == USCC
    assert masked_body(body, ["/applicant/uscc"])["applicant"]["uscc"] == MASK


async def test_a_uscc_stays_visible_in_the_admin_view(make_harness: HarnessFactory) -> None:
    """Sent through a real gateway whose service lists other fields as sensitive: the
    enterprise's USCC is shown as it is, its sensitive name is not."""

    def edit(doc: dict[str, Any]) -> None:
        doc["services"][1]["sensitive"] = ["/applicant/name"]

    h = await make_harness(edit)
    reply = await h.client("portal").exchange("crossregion.apply", ENTERPRISE)
    assert reply.status == 202, reply.body
    path = f"/admin/v1/messages/{reply.json()['message_id']}"
    async with h.admin.get(path, headers=h.auth("operator")) as resp:
        view = await resp.json()
    assert view["request"]["applicant"] == {"type": "enterprise", "uscc": USCC, "name": MASK}


async def test_a_redelivered_refusal_is_masked_in_the_change_trail(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """Redelivering a dead letter whose error names a person records the error masked:
    the admin API's change trail and the console's audit page never show it."""
    platform = await _refusing_platform(keys)
    try:
        h = await make_harness(_via_platform(str(platform.make_url("")).rstrip("/"), keys))
        message_id = await _send_person(h)

        async def dead() -> bool:
            return await h.state_of(message_id) == "dead"

        await h.wait_for(dead)
        url = f"/admin/v1/dead-letters/{message_id}/redeliver"
        async with h.admin.post(url, headers=h.auth("operator")) as resp:
            assert resp.status == 202, await resp.text()
    finally:
        await platform.close()
    async with h.admin.get("/admin/v1/audit?kind=dead-letters", headers=h.auth()) as resp:
        (entry,) = (await resp.json())["audit"]
    assert entry["before"]["error"].endswith(
        f"申请人 {MASKED_ID}（手机 {MASKED_PHONE}）已有在办申请"
    )
    await _console_sign_in(h, "operator")
    page = html.unescape(await _console_page(h, "/audit?kind=dead-letters"))
    assert MASKED_PHONE in page
    _assert_masked(page)


async def test_trace_spans_mask_an_upstream_error_naming_a_person(
    make_harness: HarnessFactory, keys: Keys
) -> None:
    """Spans leave for a collector: the outbox span's error status and attribute are masked."""
    exporter = InMemorySpanExporter()
    tracing = create_tracing(TracingConfig(), exporter=exporter, batch=False)
    platform = await _refusing_platform(keys)
    try:
        edit = _via_platform(str(platform.make_url("")).rstrip("/"), keys)
        h = await make_harness(edit, tracing=tracing)
        message_id = await _send_person(h)

        async def dead() -> bool:
            return await h.state_of(message_id) == "dead"

        await h.wait_for(dead)
    finally:
        await platform.close()
    failed = [
        (str((s.attributes or {}).get("gw.error")), str(s.status.description))
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("gw.error")
    ]
    assert failed
    for attribute, status in failed:
        assert MASKED_PHONE in attribute
        assert MASKED_PHONE in status
        _assert_masked([attribute, status])


# Every view, through a real gateway --------------------------------------------------

PERSON_SERVICES = ("person.check", "person.apply")  # sync and async, any JSON object


@pytest.fixture
def harness_store_url(request: pytest.FixtureRequest) -> str | None:
    """SQLite unless a test asks for PostgreSQL (``indirect`` parametrisation)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


async def _person_platform(keys: Keys) -> TestServer:
    """A national platform on loopback that answers a person's document back (in a
    signed envelope), or refuses it in free text when the document says ``refuse``."""
    signer = Signer(keys.pairs["national"], label="sig1")

    async def exchange(request: web.Request) -> web.Response:
        payload = (await request.json())["payload"]
        if "refuse" in payload:
            return signed_json(request, signer, 200, {"code": "E409", "message": payload["refuse"]})
        data = {"echo": payload, "note": payload.get("note", "")}
        return signed_json(request, signer, 200, {"code": "0", "data": data})

    app = web.Application()
    app.router.add_post("/api/v1/exchange", exchange)
    server = TestServer(app, port=unused_port())
    await server.start_server()
    return server


def _person_services(url: str, keys: Keys, tmp_path: Path) -> Callable[[dict[str, Any]], None]:
    schema = tmp_path / "any-object.json"
    schema.write_text(json.dumps({"type": "object"}), encoding="utf-8")

    def edit(doc: dict[str, Any]) -> None:
        for code, mode in zip(PERSON_SERVICES, ("sync", "async"), strict=True):
            doc["services"].append(
                {
                    "code": code,
                    "mode": mode,
                    **{k: str(schema) for k in ("request_schema", "response_schema")},
                    "callback_schema": str(schema),
                    "timeout_s": 2,
                    "max_attempts": 1,
                    "sensitive": ["/secret", "/echo/secret"],
                }
            )
            doc["routes"].append({"service": code, "adapter": "platform"})
        doc["members"][0]["services"].extend(PERSON_SERVICES)
        doc["adapters"].append(
            {
                "name": "platform",
                "type": "national_platform",
                "config": {"base_url": url, "platform_keys": [keys.jwk_file("national")]},
            }
        )

    return edit


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """What one generated example sent, and what every view must show of it."""

    forms: tuple[Form, ...]
    echoed: str  # message ids
    refused: str
    dead: str


@st.composite
def cases(draw: st.DrawFn) -> tuple[Doc, Form, str, str, Form]:
    """A document, a form under a sensitive pointer, and a refusal's text naming a form."""
    return draw(documents()), draw(FORMS), draw(AROUND), draw(AROUND), draw(FORMS)


@pytest.mark.parametrize("harness_store_url", ["sqlite", "postgres"], indirect=True)
async def test_generated_forms_are_masked_in_every_view_of_a_real_gateway(
    make_harness: HarnessFactory,
    keys: Keys,
    tmp_path: Path,
    harness_store_url: str | None,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Generated forms sent in documents (strings, numbers, text, keys, a sensitive
    field), answered back, and named in an upstream's refusal (sync: a problem; async: a
    dead letter): masked in the problem, the admin API, the console, `gateway log show`,
    `gateway dead-letters list` and every log line; the store and the evidence bundle
    keep the real bytes."""
    platform = await _person_platform(keys)
    edit = _person_services(str(platform.make_url("")).rstrip("/"), keys, tmp_path)
    try:
        h = await make_harness(edit)
        await _console_sign_in(h, "operator")
        loop = asyncio.get_running_loop()
        client = h.client("portal")
        sent: list[Sent] = []

        def run(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

        @settings(max_examples=examples(12), deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=cases())
        def check(case: tuple[Doc, Form, str, str, Form]) -> None:
            gen, secret, left, right, named = case
            shown = gen.shown
            refusal = f"申请人{left}{named.text}{right}已有在办申请"
            masked_refusal = f"申请人{left}{named.masked}{right}已有在办申请"
            echoed = run(client.exchange("person.check", {**gen.doc, "secret": secret.text}))
            assert echoed.status == 200, echoed.body
            refused = run(client.exchange("person.check", {"refuse": refusal}))
            assert refused.status == 502, refused.body
            assert refused.json()["detail"].endswith(masked_refusal)  # the problem
            assert named.text not in refused.body.decode()
            dead = run(client.exchange("person.apply", {"refuse": refusal}))
            assert dead.status == 202, dead.body
            dead_id = dead.json()["message_id"]
            run(h.wait_for(lambda: _is_dead(h, dead_id)))
            ids = Sent(
                forms=(secret, named, *gen.forms),
                echoed=echoed.request.headers["Gw-Message-Id"],
                refused=refused.request.headers["Gw-Message-Id"],
                dead=dead_id,
            )
            sent.append(ids)
            # The admin API: exactly the masked document, the sensitive field hidden.
            view = run(_admin_json(h, f"/admin/v1/messages/{ids.echoed}"))
            assert view["request"] == {**shown, "secret": MASK}
            assert view["response"] == {"echo": {**shown, "secret": MASK}, "note": ""}
            for message_id in (ids.refused, ids.dead):
                view = run(_admin_json(h, f"/admin/v1/messages/{message_id}"))
                assert view["error"].endswith(masked_refusal)
            letters = run(_admin_json(h, "/admin/v1/dead-letters"))["dead_letters"]
            (letter,) = [d for d in letters if d["message_id"] == ids.dead]
            assert letter["error"].endswith(masked_refusal)
            # The console, as an operator sees it (an auditor sees no bodies).
            pages = [f"/messages/{i}" for i in (ids.echoed, ids.refused, ids.dead)]
            for path in [*pages, "/dead-letters", "/messages?service=person.check"]:
                _assert_none_shown(ids.forms, html.unescape(run(_console_page(h, path))))
            assert masked_refusal in html.unescape(run(_console_page(h, "/dead-letters")))

        with caplog.at_level(logging.INFO):
            await asyncio.to_thread(check)
    finally:
        await platform.close()

    every = [i for s in sent for i in (s.echoed, s.refused, s.dead)]
    forms = tuple(f for s in sent for f in s.forms)
    search = await _admin_json(h, "/admin/v1/messages?limit=1000")
    assert {m["message_id"] for m in search["messages"]} >= set(every)
    _assert_none_shown(forms, json.dumps(search, ensure_ascii=False))

    config = _config_at(keys, tmp_path, edit, harness_store_url)
    # Each command is a process's work (~0.2 s): every document, and one of each refusal
    # (the admin API's view, which `log show` prints, is checked for all of them above).
    for message_id in [*(s.echoed for s in sent), sent[-1].refused, sent[-1].dead]:
        shown_cli = await _cli(capsys, "log", "show", message_id, "--config", config)
        _assert_none_shown(forms, shown_cli)
    table = await _cli(capsys, "dead-letters", "list", "--config", config)
    _assert_none_shown(forms, table)
    assert all(s.dead in table for s in sent)

    # Log lines: records carried the refusals unmasked; no formatted line shows them.
    raw = [r for r in caplog.records if any(f.text in str(r.__dict__) for f in forms)]
    assert raw, "the refusal reached no log record"
    for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
        _assert_none_shown(forms, "\n".join(formatter.format(r) for r in caplog.records))

    # The store and the evidence keep the real bytes.
    last = sent[-1]
    record = await h.app[STORE].get_message(PORTAL_ID, last.echoed)
    assert record is not None
    assert record.request_body is not None
    assert json.loads(record.request_body)["secret"] == last.forms[0].text
    bundle_path = tmp_path / "bundle.json"
    await _cli(
        capsys, "audit", "export", last.echoed, "--out", str(bundle_path), "--config", config
    )
    bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
    stored = base64.b64decode(bundle["message"]["request_body"])
    assert stored == record.request_body


def _assert_none_shown(forms: tuple[Form, ...], text: str) -> None:
    for form in forms:
        assert form.text not in text, form


async def _is_dead(h: Harness, message_id: str) -> bool:
    return await h.state_of(message_id) == "dead"


async def _admin_json(h: Harness, path: str) -> Any:
    async with h.admin.get(path, headers=h.auth("operator")) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _console_sign_in(h: Harness, role: str) -> None:
    async with h.admin.post("/signin", data={"token": h.tokens[role]}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()


async def _console_page(h: Harness, path: str) -> str:
    async with h.admin.get(path) as resp:
        assert resp.status == 200, path
        return await resp.text()


def _config_at(
    keys: Keys, tmp_path: Path, edit: Callable[[dict[str, Any]], None], store_url: str | None
) -> str:
    """The harness's config as a file for the command line, on the harness's store."""
    doc = config_document(keys, store=tmp_path / "gateway.db", national_url="http://127.0.0.1:9")
    if store_url is not None:
        doc["store"]["url"] = store_url
    edit(doc)
    config = tmp_path / "config-cli.yaml"
    config.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return str(config)


def test_the_masking_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.masking` (the figures in docs/decisions.md) runs and prints each."""
    from bench.masking import main as bench

    assert bench(["--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "exchange log line" in out
    assert "message_view" in out


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("电话１３８１２３４５６７８", "12345678"),
        ("身份证３３０１０６１９８００１０１１２３４", "19800101"),
        ("＋８６ １３６ ４４４４ ５５５５", "4444"),
    ],
)
def test_full_width_digits_are_masked_too(text: str, hidden: str) -> None:
    """Full-width digits (as Chinese input methods type them) are personal data too."""
    masked = mask_personal(text)
    assert hidden not in masked.translate({0xFF10 + d: str(d) for d in range(10)})
    assert "****" in masked


def test_an_integral_json_float_is_masked_like_the_integer() -> None:
    """13812345678.0 and 1.3812345678E10 are the mobile number 13812345678."""
    body = b'{"a": 13812345678.0, "b": 1.3812345678E10, "c": 2.5, "d": 12345.0}'
    shown = masked_body(body)
    assert shown == {"a": "138****5678", "b": "138****5678", "c": 2.5, "d": 12345.0}
