"""The chat page at /web in headless Chromium (Debian package ``chromium``) driven by playwright."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

COUNT_UPDATES = """() => {
  window.__updates = 0;
  new MutationObserver(() => { window.__updates += 1; })
    .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, model_name):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(server.url + "/web")
    sync_api.expect(page.locator("#model-name")).to_have_text(model_name)
    yield page
    page.close()


def test_send_a_message_and_see_a_streamed_reply(page, server):
    page.evaluate(COUNT_UPDATES)
    page.fill("#prompt", "Hello from the browser")
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"))
    text = reply.inner_text()
    assert text.strip()
    assert page.evaluate("window.__updates") > 3  # the reply arrived piece by piece
    assert page.locator(".msg.user").last.inner_text() == "Hello from the browser"
    # the conversation list shows the new thread, and the stored thread holds both messages
    item = page.locator("#threads li").first
    sync_api.expect(item).to_have_text("Hello from the browser")
    thread_id = item.get_attribute("data-id")
    stored = httpx.get(f"{server.url}/v1/threads/{thread_id}/messages?order=asc").json()["data"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"][0]["text"]["value"] == text


def test_stop_button_cancels_the_run(page, server, slowed):
    engine = server.server.config.app.state.kt.engine
    with slowed(engine, 0.03):
        page.fill("#prompt", "Please write a long answer")
        page.click("#send")
        reply = page.locator(".msg.assistant").last
        sync_api.expect(reply).not_to_have_text("", timeout=30_000)
        sync_api.expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=30_000)
        sync_api.expect(page.locator("#stop")).to_be_hidden()
    thread_id = page.locator("#threads li.active").get_attribute("data-id")
    run = httpx.get(f"{server.url}/v1/threads/{thread_id}/runs").json()["data"][0]
    deadline = time.monotonic() + 10
    while run["status"] == "cancelling" and time.monotonic() < deadline:
        time.sleep(0.1)
        run = httpx.get(f"{server.url}/v1/threads/{thread_id}/runs/{run['id']}").json()
    assert run["status"] == "cancelled"
    assert engine.active_count == 0
    # reopening the conversation shows what was stored, which is the interrupted reply
    page.click("#new-chat")
    page.locator(f"#threads li[data-id='{thread_id}']").click()
    sync_api.expect(page.locator(".msg")).to_have_count(2)
    assert page.locator(".msg.assistant").inner_text().strip()


# ------------------------------------------------------------------------------------------ settings and limits


def _own_server(tiny, tmp_path_factory, *, max_context=None, assistants=True, tokenizer=None):
    """A server of its own: a small context, no Assistants API, or another tokenizer."""
    from ktcore.server.app import create_app
    from ktcore.server.engine import Engine
    from ktcore.server.runner import ServerThread

    model, tiny_tokenizer, info = tiny
    tokenizer = tokenizer or tiny_tokenizer
    engine = Engine(model, tokenizer, max_context=max_context, max_concurrency=2)
    db = tmp_path_factory.mktemp("db") / "assistants.sqlite3" if assistants else None
    return ServerThread(create_app(engine, tokenizer, info, db_path=db, web=True)).start()


def _open(browser, srv, model_name):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(srv.url + "/web")
    sync_api.expect(page.locator("#model-name")).to_have_text(model_name)
    return page


def _send(page, text):
    page.fill("#prompt", text)
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=60_000)
    return reply


def test_temperature_and_max_tokens_reach_the_run(page, server):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "3")
    reply = _send(page, "Count to ten")
    assert reply.get_attribute("data-stopped") == "max-tokens"
    sync_api.expect(page.locator(".note").last).to_have_text("Stopped at the max-tokens limit (3).")
    thread_id = page.locator("#threads li.active").get_attribute("data-id")
    run = httpx.get(f"{server.url}/v1/threads/{thread_id}/runs").json()["data"][0]
    assert run["temperature"] == 0 and run["max_completion_tokens"] == 3
    assert run["usage"]["completion_tokens"] == 3
    page.fill("#temperature", "7")
    page.fill("#prompt", "again")
    page.click("#send")
    sync_api.expect(page.locator("#status")).to_have_text("temperature must be between 0 and 2")


def test_a_reply_cut_by_the_context_limit_says_so(browser, tiny, tmp_path_factory, model_name):
    srv = _own_server(tiny, tmp_path_factory, max_context=64)
    try:
        page = _open(browser, srv, model_name)
        page.fill("#max-tokens", "500")
        reply = _send(page, "Hi")
        assert reply.get_attribute("data-stopped") == "context", page.locator("#status").inner_text()
        sync_api.expect(page.locator(".note").last).to_contain_text("Stopped at the context limit (64 tokens)")
        page.close()
    finally:
        srv.stop()


def test_page_works_without_the_assistants_api(browser, tiny, tmp_path_factory, model_name):
    """kt serve --web --no-assistants: the page chats over /v1/chat/completions, nothing about threads fails."""
    srv = _own_server(tiny, tmp_path_factory, assistants=False)
    try:
        page = _open(browser, srv, model_name)
        sync_api.expect(page.locator("#threads-off")).to_be_visible()
        page.fill("#max-tokens", "16")
        first = _send(page, "Hello without threads")
        assert first.inner_text().strip()
        page.fill("#max-tokens", "4")
        second = _send(page, "And a second message")
        assert page.locator("#status").inner_text() == ""
        assert second.inner_text() and second.get_attribute("data-stopped") == "max-tokens"
        assert page.locator(".msg.user").all_inner_texts() == ["Hello without threads", "And a second message"]
        assert page.evaluate("state.history.length") == 4  # the second request carried the first exchange
        page.close()
    finally:
        srv.stop()


def test_model_without_chat_template_is_flagged(browser, tiny, tmp_path_factory, model_name):
    import copy

    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = None
    srv = _own_server(tiny, tmp_path_factory, tokenizer=tokenizer)
    try:
        page = _open(browser, srv, model_name)
        sync_api.expect(page.locator("#status")).to_contain_text("no chat template")
        assert page.locator("#send").is_disabled() and page.locator("#prompt").is_disabled()
        page.close()
    finally:
        srv.stop()
