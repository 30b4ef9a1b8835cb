"""The web page end to end in headless Chromium (Debian's chromium, driven by Playwright for Python).

Needs: `apt-get install -y chromium` and `pip install playwright` (NOT `playwright install`: the system
chromium is used). Skips with the reason when either is missing. Set SDX4_UPDATE_SCREENSHOT=1 to also
copy the screenshot to docs/web-page.png (the README's picture).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from server_helpers import (
    TIMEOUT,
    Gate,
    live_server,
    png_bytes,
    png_metadata,
    wait_until,
)

from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ROOT = Path(__file__).parents[1]
CAT = ROOT / "examples" / "cat.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):  # conftest.py: the tiny random model, loaded once per session
    return tiny_upscaler


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_page_upload_progress_result_download(browser, upscaler, tmp_path):
    gate = Gate(upscaler, pause_at=1)  # holds the job at step 1 until the page has shown that progress
    app = create_app(gate, ServerSettings(queue=QueueSettings(results_dir=str(tmp_path / "results"))))
    with live_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(f"{m.text} {m.location.get('url')}") if m.type == "error" else None)
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        page.set_default_timeout(TIMEOUT * 1000)
        sync_api.expect.set_options(timeout=TIMEOUT * 1000)
        page.goto(base + "/")
        sync_api.expect(page.locator("#model-info")).to_contain_text("on cpu (fp32)")
        sync_api.expect(page.locator("#random-warning")).to_be_visible()
        assert page.input_value("#steps") == "75"  # defaults come from the server

        # A file no browser can decode: named before any upload, and nothing is queued.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"this is not an image")
        page.set_input_files("#file", str(bad))
        sync_api.expect(page.locator("#error")).to_have_text("notes.png: not an image the browser can read (image/png); not queued")
        assert page.is_disabled("#run")

        # Drag and drop a file onto the drop zone.
        page.evaluate(
            """async (b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
            }""",
            base64.b64encode(png_bytes((10, 6))).decode(),
        )
        sync_api.expect(page.locator("#file-info")).to_contain_text("dropped.png · 10×6 → 40×24")
        sync_api.expect(page.locator("#error")).to_be_hidden()

        # Cancel a running job from the page: the job stops and the page says so.
        page.fill("#steps", "4")
        page.click("#run")
        assert gate.paused.wait(TIMEOUT)
        sync_api.expect(page.locator("#status")).to_have_text("step 1 of 4")
        sync_api.expect(page.locator("#cancel")).to_be_visible()
        page.click("#cancel")
        sync_api.expect(page.locator("#status")).to_have_text("cancelling…")
        gate.release.set()
        sync_api.expect(page.locator("#error")).to_have_text("cancelled: cancelled by request")
        sync_api.expect(page.locator("#cancel")).to_be_hidden()
        wait_until(lambda: app.state.manager.status()["jobs"]["cancelled"] == 1, what="the cancelled job")
        assert app.state.manager.status()["jobs"]["done"] == 0  # the 'before' image is made in the browser
        gate.paused.clear()
        gate.release.clear()

        # The real thing.
        page.set_input_files("#file", str(CAT))
        sync_api.expect(page.locator("#file-info")).to_contain_text("cat.png · 64×64 → 256×256")
        page.fill("#prompt", "a photo of a cat")
        page.fill("#seed", "42")
        page.click("#run")
        sync_api.expect(page.locator("#error")).to_be_hidden()
        assert gate.paused.wait(TIMEOUT)
        sync_api.expect(page.locator("#status")).to_have_text("step 1 of 4")
        assert page.eval_on_selector("#progress", "p => p.value") == 0.25
        gate.release.set()
        sync_api.expect(page.locator("#result-panel")).to_be_visible()
        sync_api.expect(page.locator("#status")).to_contain_text(re.compile(r"done in [0-9.]+ s"))
        sync_api.expect(page.locator("#result-info")).to_contain_text("cat.png · 256×256 · seed 42 · 4 steps")
        page.wait_for_function("() => document.getElementById('after').complete && document.getElementById('before').width > 0")
        sizes = page.evaluate("[[before.width, before.height], [after.naturalWidth, after.naturalHeight]]")
        assert sizes == [[256, 256], [256, 256]]  # the input drawn at the output's size beside the output
        page.fill("#slider", "30")  # the before/after slider moves the divider
        assert page.eval_on_selector("#divider", "d => d.style.left") == "30%"
        assert page.eval_on_selector("#before", "b => b.style.clipPath") == "inset(0px 70% 0px 0px)"

        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "cat_x4.png"
        saved = tmp_path / "download.png"
        download.save_as(saved)
        data = saved.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (256, 256)
        meta = png_metadata(data)
        assert meta["seed"] == 42 and meta["steps"] == 4 and meta["prompt"] == "a photo of a cat"

        page.fill("#slider", "50")
        shot = tmp_path / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("SDX4_UPDATE_SCREENSHOT") == "1":
            with Image.open(shot) as im:
                im.convert("RGB").save(ROOT / "docs" / "web-page.png", optimize=True)
        # no console errors but a failed /v1/estimate fetch (a server without the route answers 404)
        assert [e for e in console_errors if "/v1/estimate" not in e] == []
        page.close()


def test_page_asks_for_the_api_key(browser, upscaler, tmp_path):
    app = create_app(upscaler, ServerSettings(api_key="k3y", queue=QueueSettings(results_dir=str(tmp_path / "results"))))
    with live_server(app) as base:
        page = browser.new_page()
        sync_api.expect.set_options(timeout=TIMEOUT * 1000)
        page.goto(base + "/")
        sync_api.expect(page.locator("#error")).to_have_text("This server needs an API key: enter it above.")
        sync_api.expect(page.locator("#key-box")).to_be_visible()
        assert page.is_disabled("#run")
        page.fill("#api-key", "k3y")
        page.click("#key-save")
        sync_api.expect(page.locator("#model-info")).to_contain_text("on cpu (fp32)")
        sync_api.expect(page.locator("#key-box")).to_be_hidden()
        sync_api.expect(page.locator("#error")).to_be_hidden()
        page.set_input_files("#file", str(CAT))
        page.select_option("#method", "lanczos")
        page.click("#run")
        sync_api.expect(page.locator("#result-info")).to_contain_text("256×256")
        sync_api.expect(page.locator("#after-tag")).to_have_text("lanczos")
        page.close()
