"""The web page `longside serve` shows at / (longside/server/static/index.html), driven in
headless Chromium against a real server: API key, adding a document with streamed progress,
the memory line, a streamed chat answer, forgetting, and the error a wrong key gets."""

from __future__ import annotations

import os
import re

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no {CHROMIUM}: this test drives Debian's chromium (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright (python) is not installed: pip install playwright")

from longside.server.keys import KeyFile

try:
    from tests.server_util import running_server
except ModuleNotFoundError as e:  # bare `pytest` puts tests/ itself on sys.path, not the repo
    if e.name != "tests":
        raise
    from server_util import running_server

expect = sync_api.expect

# A made-up fact, so that nothing the model knew already could be mistaken for memory.
FACT = "The lighthouse keeper on Varnholm island is called Odalric Penhallow, and he keeps three blue goats."
MODEL_TIMEOUT_MS = 180_000  # a limit, not a wait: a slow CPU may take a while to encode or answer
UI_TIMEOUT_MS = 15_000


def test_page_documents_chat_and_wrong_key(tmp_path):
    keys = tmp_path / "keys.json"
    made_key = KeyFile(keys).add("pagetest")
    with running_server(tmp_path / "store", keys=keys) as server:
        key = server.key or made_key
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)
                crashes: list[str] = []
                page.on("pageerror", lambda err: crashes.append(str(err)))

                response = page.goto(server.url + "/")
                assert response is not None and response.ok, response and response.status
                assert response.headers.get("content-type", "").startswith("text/html")

                # The key: typed once, then every request carries it.
                page.fill("#key", key)
                memory = page.locator("#memory")
                expect(memory).to_have_text(re.compile(r"^memory: [\d,]+ tokens? · [\d,]+ documents? · "))
                expect(page.locator("#error")).to_be_hidden()
                page.fill("#max-tokens", "8")

                # A document, its progress streamed into #doc-status until it is in memory.
                page.fill("#doc-name", "notes.txt")
                page.fill("#doc-text", FACT)
                page.click("#add-doc")
                expect(page.locator("#doc-status")).to_contain_text("added notes.txt", timeout=MODEL_TIMEOUT_MS)
                expect(memory).to_have_text(re.compile(r"^memory: [1-9][\d,]* tokens · 1 document · "))
                expect(page.locator("#doc-list li")).to_have_count(1)
                expect(page.locator("#doc-list li")).to_contain_text("notes.txt")
                expect(page.locator("#error")).to_be_hidden()

                # A question; Enter sends it and the answer streams into the assistant bubble.
                question = "Who keeps the lighthouse on Varnholm island? <i>one name</i>"
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                user = page.locator("#messages .msg.user .content")
                answer = page.locator("#messages .msg.assistant .content")
                expect(user).to_have_text([question])  # shown as text, never parsed as HTML
                expect(page.locator("#messages i")).to_have_count(0)
                expect(page.locator("#prompt")).to_have_value("")
                expect(answer).to_have_count(1)
                expect(answer.first).to_have_text(re.compile(r"\S"), timeout=MODEL_TIMEOUT_MS)
                expect(page.locator("#send")).to_be_enabled(timeout=MODEL_TIMEOUT_MS)  # the stream ended
                expect(page.locator("#error")).to_be_hidden()
                expect(memory).to_have_text(re.compile(r"^memory: [1-9][\d,]* tokens · 1 document · "))

                # The key is remembered across a reload.
                page.reload()
                expect(page.locator("#key")).to_have_value(key)
                expect(memory).to_have_text(re.compile(r"^memory: [1-9][\d,]* tokens · 1 document · "))

                # Forget: asks first, then the memory is empty.
                page.once("dialog", lambda dialog: dialog.accept())
                page.click("#forget")
                expect(memory).to_have_text(re.compile(r"^memory: 0 tokens · 0 documents · "))
                expect(page.locator("#doc-list li")).to_have_count(0)

                # A wrong key: the request fails visibly, and the turn is withdrawn for a retry.
                page.fill("#key", key + "-wrong")
                page.fill("#prompt", "Are you there?")
                page.press("#prompt", "Enter")
                expect(page.locator("#error")).to_be_visible()
                expect(page.locator("#error")).to_contain_text("API key")
                expect(page.locator("#prompt")).to_have_value("Are you there?")
                expect(page.locator("#messages .msg")).to_have_count(0)  # the reload started a new page

                assert crashes == [], f"uncaught errors in the page: {crashes}"
            finally:
                browser.close()
