"""The admin web console in a real browser: Debian's chromium driven by Playwright.

One chromium for the whole session, driven from one thread of its own (Playwright's sync
API), while each test's gateway runs on the test's event loop: a test hands the browser
a function and awaits its result. On every page visited: no request leaves the admin
listener, no console error, every input has a label. Each test saves screenshots under
its tmp_path; ``GATEWAY_CONSOLE_SCREENSHOT=PATH`` also saves the overview there.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from gateway.admin.console import CONSOLE
from gateway.exchange.app import LIVE, MONITOR, STORE
from gateway.exchange.monitoring import aggregate
from tests.conftest import APPLY_EXAMPLE, CREDIT_EXAMPLE, PORTAL_ID, Harness

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NAV = (
    "Overview",
    "Members",
    "Adapters",
    "Services",
    "Routes",
    "Messages",
    "Dead letters",
    "Audit",
    "Monitoring",
)
T = TypeVar("T")

# Inputs, selects and text areas with no accessible label (hidden inputs need none).
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby'))
  .map(el => el.name || el.id || el.outerHTML)"""


class Chromium:
    """One browser, owned by one thread (Playwright's sync objects stay on theirs)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._thread.submit(self._start).result()

    def _start(self) -> None:
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=ARGS, headless=True
        )

    async def run(self, base_url: str, script: Callable[[Visit], T]) -> T:
        """Run ``script`` in a fresh browser context (no cookies) against ``base_url``."""

        def go() -> T:
            assert self._browser is not None
            context = self._browser.new_context(
                base_url=base_url, viewport={"width": 1280, "height": 900}
            )
            visit = Visit(context, base_url)
            try:
                return script(visit)
            finally:
                context.close()

        return await asyncio.get_running_loop().run_in_executor(self._thread, go)

    def close(self) -> None:
        def stop() -> None:
            if self._browser is not None:
                self._browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        self._thread.submit(stop).result()
        self._thread.shutdown()


@dataclass
class Visit:
    """A browser context with the checks every page gets."""

    context: BrowserContext
    base_url: str
    outside: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page: Page = field(init=False)

    def __post_init__(self) -> None:
        self.context.on("request", self._request)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))

    def _request(self, request: Any) -> None:
        if not str(request.url).startswith(self.base_url + "/"):
            self.outside.append(str(request.url))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(str(message.text))

    def check(self) -> None:
        """What must hold on every page."""
        self.page.wait_for_load_state("load")
        assert self.outside == [], self.outside
        assert self.console_errors == [], self.console_errors
        assert self.page.evaluate(UNLABELLED) == [], self.page.url

    def open(self, path: str) -> None:
        self.page.goto(path)
        self.check()

    def sign_in(self, token: str) -> None:
        self.open("/signin")
        self.page.get_by_label("Token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="Overview")).to_be_visible()
        self.check()

    def shot(self, directory: Path, name: str) -> None:
        self.page.screenshot(path=str(directory / f"{name}.png"), full_page=True)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {CHROMIUM} is missing: python3 dev.py test installs it")
        pytest.skip(
            f"chromium is not installed at {CHROMIUM}: `python3 dev.py test` installs it when "
            "run as root on Debian; otherwise `sudo apt-get install chromium`"
        )
    browser = Chromium()
    yield browser
    browser.close()


def _base(harness: Harness) -> str:
    return str(harness.admin.make_url("")).rstrip("/")


async def _traffic(harness: Harness, rounds: int = 6) -> None:
    """Some exchanges, good and refused, sampled between rounds so the chart has bars."""
    sampler = harness.admin.app[CONSOLE].sampler if harness.admin.app else None
    assert sampler is not None
    portal, stranger = harness.client("portal"), harness.client("stranger")
    sampler.sample()
    for i in range(rounds):
        replies = await asyncio.gather(
            *(portal.exchange("credit.query", CREDIT_EXAMPLE) for _ in range(3 + i % 3)),
            *(stranger.exchange("credit.query", CREDIT_EXAMPLE) for _ in range(i % 2)),
        )
        assert {r.status for r in replies} <= {200, 403}
        await asyncio.sleep(0.05)
        sampler.sample()


async def test_sign_in_from_the_keyboard_every_page_clean_then_sign_out(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """Sign in with the keyboard alone; each page loads only from the listener, without a
    console error, every input labelled; the cookie is HttpOnly and SameSite=Strict; the
    CSP is default-src 'self'; after signing out the console asks to sign in again."""
    await _traffic(harness)
    apply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    assert apply.status == 202
    message_id = apply.json()["message_id"]
    token = harness.tokens["admin"]
    screenshot = os.environ.get("GATEWAY_CONSOLE_SCREENSHOT")

    def script(v: Visit) -> None:
        page = v.page
        response = page.goto("/")
        assert response is not None
        assert re.search(r"/signin$", page.url)
        assert "default-src 'self'" in response.headers["content-security-policy"]
        v.check()
        # Keyboard only: the token field has focus; type, Enter.
        assert page.evaluate("document.activeElement.name") == "token"
        page.keyboard.type(token)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        v.check()
        (cookie,) = v.context.cookies()
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        assert cookie["expires"] > 0
        assert token not in cookie["value"]
        expect(page.locator("svg.chart rect.bar").first).to_be_attached()
        expect(page.get_by_text("Ready", exact=True)).to_be_visible()
        v.shot(tmp_path, "overview")
        if screenshot:
            page.set_viewport_size({"width": 1100, "height": 760})
            page.screenshot(path=screenshot)
            page.set_viewport_size({"width": 1280, "height": 900})
        for name in NAV:
            page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()
            expect(page.get_by_role("heading", level=1)).to_contain_text(
                "Admin tokens" if name == "Tokens" else name
            )
            v.check()
            v.shot(tmp_path, name.lower().replace(" ", "-"))
        for path in (
            f"/members/{PORTAL_ID}",
            "/adapters/new",
            "/adapters/national/edit",
            "/adapters/national/delete",
            "/services/credit.query",
            f"/messages/{message_id}",
            "/tokens",
        ):
            v.open(path)
            v.shot(tmp_path, path.strip("/").replace("/", "_").replace(":", "_"))
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        assert v.context.cookies() == []
        page.goto("/members")
        assert re.search(r"/signin$", page.url)
        v.check()

    await chromium.run(_base(harness), script)
    assert len(harness.admin.app[CONSOLE].sessions) == 0 if harness.admin.app else False


async def test_register_an_adapter_invalid_then_valid_from_the_keyboard(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """The generated form shows the API's validation error on its field and writes nothing;
    corrected, the adapter is live and audited. Keyboard only once the form is open."""
    live = harness.app[LIVE]

    def tab_to(page: Page, name: str) -> None:
        for _ in range(30):
            if page.evaluate("document.activeElement.name") == name:
                return
            page.keyboard.press("Tab")
        raise AssertionError(f"Tab never reached {name}")

    def script(v: Visit) -> dict[str, Any]:
        page = v.page
        v.sign_in(harness.tokens["admin"])
        page.get_by_role("navigation").get_by_role("link", name="Adapters").click()
        page.get_by_role("button", name="Register adapter").focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Register adapter")).to_be_visible()
        v.check()
        # Labels from property names, descriptions as help, defaults filled.
        expect(page.get_by_label("Name", exact=True)).to_be_focused()
        expect(page.get_by_label("Type", exact=True)).to_have_value("http")
        url = page.get_by_label("url", exact=True)
        expect(url).to_have_accessible_description(re.compile("Upstream URL"))
        expect(page.get_by_label("forward_user", exact=True)).to_be_checked()
        page.keyboard.type("regional")
        tab_to(page, "config.url")
        page.keyboard.type("ftp://not-http.example")
        page.keyboard.press("Enter")
        expect(url).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#f-config-url-errors")).to_contain_text("does not match")
        v.check()
        v.shot(tmp_path, "invalid")
        written_after_invalid = live.get("adapters", "regional")
        url.focus()
        page.keyboard.press("Control+A")
        page.keyboard.type("http://127.0.0.1:9/api/{service}")
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Adapters")).to_be_visible()
        expect(page.get_by_role("cell", name="regional", exact=True)).to_be_visible()
        v.check()
        v.shot(tmp_path, "registered")
        return {"after_invalid": written_after_invalid}

    result = await chromium.run(_base(harness), script)
    assert result["after_invalid"] is None
    adapter = live.get("adapters", "regional")
    assert adapter is not None
    assert adapter["config"]["url"] == "http://127.0.0.1:9/api/{service}"
    assert adapter["config"]["forward_user"] is True
    trail = await harness.app[STORE].changes(kind="adapters")
    assert [(e.resource_id, e.action, e.actor) for e in trail] == [
        ("regional", "create", "test-admin")
    ]


async def test_revoking_a_member_key_refuses_that_members_next_exchange(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """Revoke with a confirmation; the member's next real signed exchange gets 401."""
    portal = harness.client("portal")
    assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    kid = harness.keys.verification("portal").popitem()[0]

    def script(v: Visit) -> None:
        page = v.page
        v.sign_in(harness.tokens["admin"])
        page.get_by_role("navigation").get_by_role("link", name="Members").click()
        page.get_by_role("link", name=PORTAL_ID).click()
        page.get_by_role("link", name=f"Revoke key {kid}").click()
        expect(page.get_by_role("heading", name=f"Revoke key {kid}?")).to_be_visible()
        v.check()
        v.shot(tmp_path, "confirm")
        page.get_by_role("button", name="Revoke key").click()
        expect(page.get_by_role("status")).to_contain_text(f"Key {kid} revoked")
        expect(page.get_by_role("link", name=f"Revoke key {kid}")).to_have_count(0)
        v.check()
        v.shot(tmp_path, "revoked")

    await chromium.run(_base(harness), script)
    refused = await portal.exchange("credit.query", CREDIT_EXAMPLE)
    assert (refused.status, refused.json()["code"]) == (401, "key_unknown")


async def test_an_operator_redelivers_a_dead_letter(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """An async message dead-lettered while the platform failed is redelivered from the
    console by an operator and reaches its callback; the audit names the operator."""
    harness.national.mode = "error"
    reply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    message_id = reply.json()["message_id"]

    async def dead() -> bool:
        return await harness.state_of(message_id) == "dead"

    await harness.wait_for(dead)
    harness.national.mode = "ok"

    def script(v: Visit) -> None:
        page = v.page
        v.sign_in(harness.tokens["operator"])
        page.get_by_role("navigation").get_by_role("link", name="Dead letters").click()
        row = page.get_by_role("row").filter(has_text=message_id)
        v.shot(tmp_path, "dead-letters")
        row.get_by_role("button", name="Redeliver").click()
        expect(page.get_by_role("status")).to_contain_text("queued for delivery again")
        v.check()
        v.shot(tmp_path, "redelivered")

    await chromium.run(_base(harness), script)

    async def delivered() -> bool:
        return await harness.state_of(message_id) == "callback_delivered"

    await harness.wait_for(delivered)
    trail = await harness.app[STORE].changes(kind="dead-letters")
    assert [(e.resource_id, e.actor, e.role) for e in trail] == [
        (message_id, "test-operator", "operator")
    ]


async def test_an_auditor_finds_no_usable_write_control(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """On every page an auditor sees, the only form that posts is Sign out; a write forged
    with the session's own CSRF token is refused by the API's permission check."""
    harness.national.mode = "error"
    reply = await harness.client("portal").exchange("crossregion.apply", APPLY_EXAMPLE)
    message_id = reply.json()["message_id"]

    async def dead() -> bool:
        return await harness.state_of(message_id) == "dead"

    await harness.wait_for(dead)
    pages = [
        "/",
        "/members",
        f"/members/{PORTAL_ID}",
        "/adapters",
        "/services",
        "/services/credit.query",
        "/routes",
        "/messages",
        f"/messages/{message_id}",
        "/dead-letters",
        "/audit",
        "/tokens",
    ]

    def script(v: Visit) -> dict[str, Any]:
        page = v.page
        v.sign_in(harness.tokens["auditor"])
        writes: dict[str, int] = {}
        for path in pages:
            v.open(path)
            writes[path] = page.locator("form[method=post]:not([action='/signout'])").count()
            writes[path] += page.locator("textarea, a.button.danger").count()
        v.shot(tmp_path, "auditor-dead-letters")
        for path in ("/adapters/new", f"/members/{PORTAL_ID}/keys/x/revoke"):
            page.goto(path)
            expect(page.get_by_role("alert")).to_contain_text("may not write")
        csrf = page.locator("input[name=csrf]").first.get_attribute("value")
        forged = page.request.post(
            f"/members/{PORTAL_ID}/enabled",
            form={"csrf": csrf or "", "enabled": "false"},
            headers={"Origin": v.base_url},
        )
        return {"writes": writes, "forged": forged.status}

    result = await chromium.run(_base(harness), script)
    assert result["writes"] == dict.fromkeys(pages, 0)
    assert result["forged"] == 403
    member = harness.app[LIVE].get("members", PORTAL_ID)
    assert member is not None
    assert member.get("enabled", True) is True


async def test_find_a_message_by_id_and_see_its_timeline(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """Search by message id → its detail: the state timeline from the message log, the
    trace id, and a request body with the resident ID masked."""
    document = {
        **APPLY_EXAMPLE,
        "applicant": {"type": "person", "resident_id": "11010519491231002X", "name": "张三"},
    }
    message_id = str(uuid.uuid4())
    reply = await harness.client("portal").exchange(
        "crossregion.apply", document, message_id=message_id
    )
    assert reply.status == 202, reply.json()

    async def done() -> bool:
        return await harness.state_of(message_id) == "callback_delivered"

    await harness.wait_for(done)
    record = await harness.app[STORE].get_message(PORTAL_ID, message_id)
    assert record is not None
    assert record.trace_id

    def script(v: Visit) -> str:
        page = v.page
        v.sign_in(harness.tokens["operator"])  # an auditor sees no bodies (security.md)
        page.get_by_role("navigation").get_by_role("link", name="Messages").click()
        page.get_by_label("Message id").fill(message_id.upper())
        page.get_by_label("Message id").press("Enter")
        expect(page.get_by_role("heading", level=1)).to_contain_text(message_id)
        v.check()
        v.shot(tmp_path, "message")
        timeline = page.get_by_role("list", name="Timeline")
        for step in ("message.accepted", "delivered", "callback.accepted", "callback.finished"):
            expect(timeline).to_contain_text(step)
        expect(page.get_by_role("heading", level=2)).to_contain_text("callback_delivered")
        expect(page.get_by_text(record.trace_id or "-")).to_be_visible()
        return page.locator("figure").first.inner_text()

    request_text = await chromium.run(_base(harness), script)
    assert "110105********002X" in request_text
    assert "11010519491231002X" not in request_text


async def test_the_monitoring_page_charts_what_real_exchanges_did(
    harness: Harness, chromium: Chromium, tmp_path: Path
) -> None:
    """After real exchanges (three answered, one refused 422) an auditor's monitoring page
    charts credit.query's traffic, latency and error rate with the figures the records
    give: count 4, 1 failed, 25.0 %, and the p50/p95 the store's records hold."""
    portal = harness.client("portal")
    for _ in range(3):
        assert (await portal.exchange("credit.query", CREDIT_EXAMPLE)).status == 200
    assert (await portal.exchange("credit.query", {"nonsense": True})).status == 422
    await harness.app[MONITOR].flush()
    samples = await harness.app[STORE].monitoring_samples(0, time.time() + 1, 1000)
    [credit] = [a for a in aggregate(samples) if a.service == "credit.query"]
    assert (credit.count, credit.errors) == (4, 1)

    def script(v: Visit) -> dict[str, str]:
        page = v.page
        v.sign_in(harness.tokens["auditor"])
        nav = page.get_by_role("navigation")
        nav.get_by_role("link", name="Monitoring", exact=True).click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Monitoring")
        v.check()
        v.shot(tmp_path, "monitoring")
        label = "credit.query · exchange"
        for chart in ("traffic", "latency", "errors"):
            row = page.locator(f"svg#chart-{chart} g.row[data-label='{label}']").first
            expect(row).to_be_attached()
        expect(page.locator("svg#chart-traffic")).to_contain_text("4")
        expect(page.locator("svg#chart-traffic")).to_contain_text("1 failed")
        expect(page.locator("svg#chart-errors")).to_contain_text("25.0 %")
        cells = page.locator("#monitoring-table tr", has_text="credit.query").first
        return {
            "row": cells.inner_text(),
            "latency": page.locator("svg#chart-latency").text_content() or "",
        }

    shown = await chromium.run(_base(harness), script)
    assert f"p50 {credit.p50_ms:.1f} ms" in shown["latency"]
    assert f"p95 {credit.p95_ms:.1f} ms" in shown["latency"]
    cells = shown["row"].split("\t")
    assert cells[:5] == ["credit.query", "exchange", "4", "1", "25.0 %"]
    assert cells[5:7] == [f"{credit.p50_ms:.1f}", f"{credit.p95_ms:.1f}"]
