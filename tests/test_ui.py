"""The web console (/ui) in a real headless Chromium (Debian's, driven by Playwright) against the real daemon with
API keys on, the real SmolLM2 runner and the local fake hub: the key asked once and kept, a chat that answers
"Paris", a long answer painted as it streams and stopped mid-way, a second conversation, a pull watched to
100 %, the model under Running, its runner log, keep-alive and unload, copy and delete with a confirmation.
Screenshots go to tests/output/ui/ (MGR_UI_SCREENSHOTS elsewhere)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import QUESTION, Daemon, wait_for
from fakehub import FakeHub, dead_endpoint

pytestmark = pytest.mark.slow
KEY = "console-test-key"
REPO = "test/SmolLM2-135M-Instruct-GGUF"
PULLED = f"hf.co/{REPO}:Q4_1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2:latest"
LONG_QUESTION = "Write a very long story about a dragon who learns to cook, with many chapters."
WAIT_MS = 120_000  # a model's load and answer on a shared CPU
A_NUMBER = re.compile(r"^\d+(\.\d)?$")
SCREENSHOTS = Path(os.environ.get("MGR_UI_SCREENSHOTS") or Path(__file__).parent / "output" / "ui")


def chromium() -> str:
    """Debian's Chromium (Playwright cannot download its own here); MGR_TEST_CHROMIUM names another."""
    for candidate in (os.environ.get("MGR_TEST_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("Chromium is missing: the web console's tests drive a real browser. Install it with "
                "`sudo apt-get install -y chromium` (Debian; scripts/test.sh does this when it runs as root), "
                "or set MGR_TEST_CHROMIUM to a Chromium or Chrome binary.")


@pytest.fixture(scope="module")
def hub(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    # SmolLM2 with bytes after its tensors: other bytes than the model the store has already (which a pull
    # would not download again), the same header
    padded = tmp_path_factory.mktemp("hub") / GGUF_NAME
    with padded.open("wb") as out, gguf_path.open("rb") as source:
        shutil.copyfileobj(source, out)
        out.write(b"\0" * 4096)
    hub = FakeHub().start()
    hub.add_repo("hf", REPO, {GGUF_NAME: padded, "README.md": b"# SmolLM2\n"})
    hub.throttle(GGUF_NAME, 8e6)  # per connection: a few seconds of progress to watch
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def console(hub: FakeHub, gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("ui"), extra_env={
        "MGR_API_KEYS": KEY, "MGR_API_KEY": KEY,  # the daemon's keys; the CLI's key
        "MGR_HF_ENDPOINT": hub.hf_endpoint, "MGR_HF_MIRROR_ENDPOINT": dead_endpoint(),
        "MGR_MODELSCOPE_ENDPOINT": dead_endpoint(), "HF_HUB_DISABLE_XET": "1",
    })
    d.start()
    created = d.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as playwright:
        # root (CI's container) cannot use Chromium's sandbox; a container's /dev/shm is often too small for it
        args = ["--disable-dev-shm-usage", *(["--no-sandbox"] if os.geteuid() == 0 else [])]
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser: Any, console: Daemon) -> Iterator[Any]:
    context = browser.new_context(base_url=console.base_url, viewport={"width": 1366, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def api(console: Daemon, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, console.base_url + path, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=120, **kwargs)


def loaded(console: Daemon) -> list[dict[str, Any]]:
    return list(api(console, "GET", "/api/ps").json()["models"])


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


# -- serving ------------------------------------------------------------------------------------------------------
def test_a_browser_at_root_is_sent_to_the_console_and_api_clients_are_not(console: Daemon) -> None:
    browser_root = httpx.get(console.base_url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser_root.status_code == 302 and browser_root.headers["location"] == "/ui"
    client_root = httpx.get(console.base_url + "/")
    assert client_root.status_code == 200 and client_root.text == "mgr is running"


def test_the_console_files_have_types_caching_and_no_outside_sources(console: Daemon) -> None:
    page = httpx.get(console.base_url + "/ui")  # no key: the page asks for it
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
    assert "http://" not in page.text and "https://" not in page.text  # nothing from another machine
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        answer = httpx.get(f"{console.base_url}/ui/{name}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind), name
        again = httpx.get(f"{console.base_url}/ui/{name}", headers={"If-None-Match": answer.headers["etag"]})
        assert again.status_code == 304 and not again.content
    for missing in ("/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/.hidden"):
        answer = httpx.get(console.base_url + missing)
        assert answer.status_code == 404 and answer.json()["error"], missing
    catalog = httpx.get(console.base_url + "/ui/catalog.json").json()
    assert "smollm2:135m" in [m["name"] for m in catalog["models"]]


def test_runner_logs_need_the_key_and_name_a_model(console: Daemon) -> None:
    assert httpx.get(console.base_url + "/api/logs?model=smollm2").status_code == 401
    assert api(console, "GET", "/api/logs?model=nothing").status_code == 404
    assert api(console, "GET", "/api/logs").status_code == 400
    assert api(console, "GET", "/api/logs?model=smollm2&lines=0").status_code == 400
    never_loaded = api(console, "GET", "/api/logs?model=smollm2")
    assert never_loaded.status_code == 404 and "not been loaded" in never_loaded.json()["error"]


# -- in the browser -----------------------------------------------------------------------------------------------
def test_a_wrong_key_is_refused_and_the_right_one_is_kept(page: Any, console: Daemon) -> None:
    page.goto("/")
    assert page.url.endswith("/ui#chat")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("missing API key")
    page.fill("#key-input", "not-the-key")
    page.keyboard.press("Enter")
    expect(page.locator("#key-message")).to_have_text("invalid API key")
    shot(page, "01-wrong-key")
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#daemon-status")).to_contain_text("mgr ")
    page.reload()  # kept in the browser: not asked again
    expect(page.locator("#chat-model")).to_have_value(MODEL)
    expect(dialog).to_be_hidden()


def watch_answer_lengths(page: Any) -> None:
    """Records every length the last answer's text goes through, as the page paints it (window.answerLengths)."""
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector('.message.assistant:last-child .content');
            if (answer) window.answerLengths.push(answer.textContent.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
    }""")


def test_a_chat_answers_paris_with_its_timings(page: Any) -> None:
    page.select_option("#chat-model", MODEL)
    page.click("#chat-settings summary")
    page.fill("#opt-temperature", "0")
    page.fill("#opt-seed", "1")
    page.click("#chat-settings summary")
    page.fill("#prompt", QUESTION)
    page.keyboard.press("Enter")  # from the keyboard
    expect(page.locator("#stop")).to_be_visible()
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
    expect(answer.locator(".content")).to_contain_text("Paris")
    expect(answer.locator(".meta")).to_contain_text("first token")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#conversation-list li")).to_have_count(1)
    shot(page, "02-chat-paris")


def test_a_long_answer_streams_and_is_stopped_mid_way(page: Any, console: Daemon) -> None:
    watch_answer_lengths(page)
    page.fill("#prompt", LONG_QUESTION)
    page.click("#send")
    answer = page.locator(".message.assistant").last
    page.wait_for_function("() => document.querySelector('.message.assistant:last-child .content')"
                           ".textContent.length > 40", timeout=WAIT_MS)
    # the page paints at most once a frame, however fast tokens come: watched for a while (the story goes on for
    # far longer), the text must have grown paint after paint. An 8-token answer can land in two frames on a
    # fast machine, so the short Paris answer proves nothing about streaming.
    page.wait_for_timeout(700)
    page.click("#stop")
    expect(answer.locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    stopped_at = len(answer.locator(".content").inner_text())
    # the runner's slot is given back: nothing is left answering
    assert wait_for(lambda: all(m["active"] == 0 for m in loaded(console)), timeout=30)
    time.sleep(0.5)
    assert len(answer.locator(".content").inner_text()) == stopped_at
    lengths = [n for n in page.evaluate("window.answerLengths") if n]
    assert len(set(lengths)) >= 5, f"the answer did not stream: {lengths}"
    shot(page, "03-stopped")


def test_a_second_conversation_is_kept_apart_and_renamed(page: Any) -> None:
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#conversation-list li")).to_have_count(2)
    page.fill("#prompt", "Name one colour of the rainbow.")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
    assert answer.locator(".content").inner_text().strip()
    expect(page.locator(".message")).to_have_count(2)  # only this conversation's
    second = page.locator("#conversation-list li").first
    second.get_by_role("button", name="Rename").click()
    page.fill("#ask-input", "Colours")
    page.keyboard.press("Enter")
    expect(second.locator(".open")).to_have_text("Colours")
    page.locator("#conversation-list li").nth(1).locator(".open").click()  # back to the first one
    expect(page.locator(".message.assistant").first).to_contain_text("Paris")
    page.reload()  # both kept in the browser
    expect(page.locator("#conversation-list li")).to_have_count(2)
    expect(page.locator("#conversation-list")).to_contain_text("Colours")
    expect(page.locator(".message.assistant").first).to_contain_text("Paris")
    shot(page, "04-second-conversation")


def test_an_image_for_a_model_without_vision_gets_the_apis_error(page: Any, tmp_path: Path) -> None:
    image = tmp_path / "dot.png"
    image.write_bytes(bytes.fromhex(  # a 1x1 PNG
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c63f8cfc0f01f0005"
        "0001ff5e8e0c6b0000000049454e44ae426082"))
    page.set_input_files("#image-input", str(image))
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#prompt", "What is in this picture?")
    page.keyboard.press("Enter")
    expect(page.locator("#attachments img")).to_have_count(0)
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".error")).to_contain_text(f'"{MODEL}" does not support', timeout=WAIT_MS)
    expect(page.locator(".message.user").last.locator("img")).to_have_count(1)


def test_markdown_reasoning_and_tool_calls_render_as_text_never_as_html(page: Any) -> None:
    rendered = page.evaluate(r"""() => {
        const box = document.createElement('article');
        fillMessage(box, {role: 'assistant', done: true, thinking: 'Let me think <b>hard</b>.',
            content: '# Title\n**bold** and `code` and [a link](https://example.org)\n\n- one\n- two\n\n' +
                     '```python\nprint("<script>alert(1)</script>")\n```\n<img src=x onerror=alert(1)>',
            tool_calls: [{function: {name: 'get_weather', arguments: {city: 'Paris'}}}],
            stats: {ttft: 120, tps: 42.5, tokens: 17, model: 'm'}});
        return {
            html: box.innerHTML, reasoningOpen: box.querySelector('details.thinking').open,
            reasoning: box.querySelector('details.thinking div').textContent,
            heading: box.querySelector('h2')?.textContent, bold: box.querySelector('strong')?.textContent,
            code: box.querySelector('pre code.language-python')?.textContent,
            link: box.querySelector('a')?.getAttribute('href'), items: box.querySelectorAll('li').length,
            tool: box.querySelector('.tool-call')?.textContent, meta: box.querySelector('.meta')?.textContent,
            elements: [...box.querySelectorAll('script, img, b')].length,
        };
    }""")
    assert rendered["reasoningOpen"] is False and rendered["reasoning"] == "Let me think <b>hard</b>."
    assert rendered["heading"] == "Title" and rendered["bold"] == "bold" and rendered["items"] == 2
    assert rendered["code"] == 'print("<script>alert(1)</script>")' and rendered["link"] == "https://example.org"
    assert "get_weather" in rendered["tool"] and '"city": "Paris"' in rendered["tool"]
    assert rendered["meta"] == "first token 0.12 s · 42.5 tokens/s · 17 tokens · m"
    assert rendered["elements"] == 0, rendered["html"]  # the model's markup stayed text


def test_a_pull_shows_its_progress_to_100_percent(page: Any, console: Daemon) -> None:
    page.click("#tab-models")
    expect(page.locator("#models-table tbody tr")).to_have_count(1)
    expect(page.locator("#suggestions")).to_contain_text("smollm2:135m")
    page.fill("#pull-ref", "hf.co/nobody/nothing")
    page.keyboard.press("Enter")
    failed = page.locator(".pull.failed")
    expect(failed.locator(".status")).to_contain_text("nobody/nothing", timeout=WAIT_MS)  # the API's own words
    page.evaluate("""() => {
        window.percents = [];
        new MutationObserver(() => {
            for (const p of document.querySelectorAll('.pull .percent')) window.percents.push(p.textContent);
        }).observe(document.querySelector('#pulls'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#pull-ref", PULLED)
    page.click("#pull-form button")
    card = page.locator(".pull").first
    expect(card.locator(".file .numbers")).to_contain_text("/s", timeout=WAIT_MS)  # speed and time left shown
    shot(page, "05-pulling")
    expect(card).to_have_class("pull done", timeout=WAIT_MS)
    expect(card.locator(".percent")).to_have_text("100 %")
    expect(card.locator(".status")).to_have_text("success")
    percents = page.evaluate("window.percents")
    assert percents[-1] == "100 %" and len(set(percents)) >= 3, percents  # watched on the way
    expect(page.locator(f'#models-table tr[data-model="{PULLED}"]')).to_be_visible()
    expect(page.locator(f'#models-table tr[data-model="{PULLED}"]')).to_contain_text("Q4_1")
    shot(page, "06-pulled")


def test_running_shows_the_model_its_log_keeps_it_and_unloads_it(page: Any, console: Daemon) -> None:
    page.click("#tab-running")
    row = page.locator(f'#running-table tr[data-model="{MODEL}"]')
    expect(row).to_contain_text("ready")
    expect(row).to_contain_text("0 / ")  # active / parallel
    row.get_by_label(f"Keep {MODEL} loaded for").select_option("-1")
    row.get_by_role("button", name=f"Keep {MODEL} loaded", exact=True).click()
    expect(row).to_contain_text("forever")
    assert int(loaded(console)[0]["expires_at"][:4]) > 2200  # Ollama's "forever"
    # the charts are the daemon's /metrics, sampled live: tokens generated now show as a rate above zero
    generated = api(console, "POST", "/api/generate", json={
        "model": MODEL, "prompt": LONG_QUESTION, "stream": False, "keep_alive": -1, "options": {"num_predict": 48}})
    assert generated.status_code == 200 and generated.json()["eval_count"] > 0
    page.wait_for_function("() => Number(document.querySelector('#value-throughput').textContent) > 0", timeout=10_000)
    expect(page.locator("#value-throughput")).to_have_text(A_NUMBER)
    shot(page, "07-running")
    row.get_by_role("button", name=f"Logs of {MODEL}").click()
    expect(page.locator("#view-logs")).to_be_visible()
    log = page.locator("#logs-output")
    expect(log).to_contain_text("mgr.runner: loaded")
    loads = log.inner_text().count("mgr.runner: loaded")
    shot(page, "08-logs")
    page.click("#tab-running")
    row.get_by_role("button", name=f"Unload {MODEL}").click()
    expect(row).to_have_count(0)
    expect(page.locator("#running-empty")).to_be_visible()
    assert loaded(console) == []
    # the log is tailed live: a new load writes its header while the page watches
    page.click("#tab-logs")
    expect(log).to_contain_text("mgr.runner: loaded")
    assert api(console, "POST", "/api/generate", json={"model": MODEL}).status_code == 200
    page.wait_for_function("loads => document.querySelector('#logs-output').textContent"
                           ".split('mgr.runner: loaded').length - 1 > loads", arg=loads, timeout=WAIT_MS)


def test_copy_then_delete_with_a_confirmation(page: Any, console: Daemon) -> None:
    page.click("#tab-models")
    page.get_by_role("button", name=f"Copy {MODEL}").click()
    page.fill("#ask-input", "smollm2-copy")
    page.keyboard.press("Enter")
    expect(page.locator('#models-table tr[data-model="smollm2-copy:latest"]')).to_be_visible()
    page.get_by_role("button", name=f"Details of {PULLED}").click()
    expect(page.locator("#model-details")).to_contain_text(GGUF_NAME)
    page.get_by_role("button", name=f"Delete {PULLED}").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    expect(page.locator("#confirm-message")).to_contain_text(PULLED)
    shot(page, "09-confirm-delete")
    page.keyboard.press("Escape")  # cancelled: nothing is deleted
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    expect(page.locator(f'#models-table tr[data-model="{PULLED}"]')).to_be_visible()
    page.get_by_role("button", name=f"Delete {PULLED}").click()
    page.click("#confirm-ok")
    expect(page.locator(f'#models-table tr[data-model="{PULLED}"]')).to_have_count(0)
    names = [m["name"] for m in api(console, "GET", "/api/tags").json()["models"]]
    assert PULLED not in names and "smollm2-copy:latest" in names


def test_the_tabs_work_from_the_keyboard_and_dark_mode_is_readable(browser: Any, console: Daemon) -> None:
    context = browser.new_context(base_url=console.base_url, color_scheme="dark",
                                  viewport={"width": 1280, "height": 720})
    context.add_init_script(f"localStorage.setItem('mgr.apiKey', {KEY!r})")
    page = context.new_page()
    try:
        page.goto("/ui")
        expect(page.locator("#key-dialog")).to_be_hidden()
        page.locator("#tab-chat").focus()
        page.keyboard.press("ArrowRight")
        expect(page.locator("#view-models")).to_be_visible()
        expect(page.locator("#tab-models")).to_be_focused()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        text = page.evaluate("getComputedStyle(document.body).color")
        assert luminance(background) < 0.1 < 0.7 < luminance(text), (background, text)
        shot(page, "10-dark-models")
    finally:
        context.close()


def luminance(css_color: str) -> float:
    red, green, blue = (int(part) / 255 for part in css_color[css_color.index("(") + 1:-1].split(",")[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue
