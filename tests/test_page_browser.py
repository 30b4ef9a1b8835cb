"""The web page's controls, loupe, queue, errors and estimate in headless Chromium (Debian's chromium, driven
by Playwright for Python; skips with the reason when either is missing). The tiny random model; classical
methods where the model's output does not matter. SDX4_UPDATE_SCREENSHOT=1 also writes
docs/web-page-loupe.png."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from server_helpers import TIMEOUT, live_server

from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
)
ROOT = Path(__file__).parents[1]
CAT = ROOT / "examples" / "cat.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
MODEL_ONLY = [
    "prompt",
    "negative_prompt",
    "steps",
    "guidance",
    "noise_level",
    "seed",
    "eta",
    "scheduler",
]

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright for Python is not installed (pip install playwright)",
)
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no chromium at {CHROMIUM} (apt-get install -y chromium)",
        allow_module_level=True,
    )
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def app(tiny_upscaler, tmp_path):
    return create_app(
        tiny_upscaler,
        ServerSettings(queue=QueueSettings(results_dir=str(tmp_path / "results"))),
    )


def open_page(browser, base, errors):
    page = browser.new_page(
        viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    page.on(
        "console",
        lambda m: (
            errors.append(f"{m.text} {m.location.get('url')}")
            if m.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(TIMEOUT * 1000)
    expect.set_options(timeout=TIMEOUT * 1000)
    page.goto(base + "/")
    expect(page.locator("#model-info")).to_contain_text("on cpu (fp32)")
    return page


def unexpected(errors):
    """Console errors other than the failed fetches a test provoked on purpose (the 404 of /v1/estimate on
    this branch's server, a 422 the test asked for): browsers log every failed fetch."""
    return [e for e in errors if "/v1/estimate" not in e and "status of 422" not in e]


def pattern_png(path: Path, size: tuple[int, int]) -> Path:
    """Random colour blocks of 4x4 px: every region differs, so a pan shows."""
    w, h = size
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)[:h, :w]).save(path)
    return path


def options_of(page, select):
    return page.eval_on_selector(
        select, "s => Array.from(s.options).map(o => [o.value, o.textContent])"
    )


def test_the_page_keeps_its_csp_and_every_control_comes_from_v1_info(browser, app):
    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        response = page.request.get(base + "/")
        assert response.headers["content-security-policy"] == PAGE_CSP
        info = page.request.get(base + "/v1/info").json()
        assert [v for v, _ in options_of(page, "#method")] == info["methods"]
        assert [v for v, _ in options_of(page, "#color_fix")] == info["choices"][
            "color_fix"
        ]
        assert [v for v, _ in options_of(page, "#scheduler")] == info["choices"][
            "scheduler"
        ]
        d = info["defaults"]
        assert (
            page.input_value("#method") == d["method"]
            and page.input_value("#color_fix") == d["color_fix"]
        )
        assert page.input_value("#scale") == str(d["scale"]) and page.input_value(
            "#num_images"
        ) == str(d["num_images"])
        assert page.input_value("#steps") == str(d["steps"])
        assert page.get_attribute("#scale", "type") == "number"
        # Every control has a label (accessible name).
        for name in [
            "method",
            "scale",
            "color_fix",
            "num_images",
            "lora",
            "steps",
            "prompt",
            "file",
        ]:
            assert page.eval_on_selector("#" + name, "e => e.labels.length") >= 1, name
        # This server lists no LoRAs (hidden) and takes width/height (the output target: shown).
        expect(page.locator("#lora")).to_be_hidden()
        expect(page.locator("#width")).to_be_visible()
        assert "width" in d and d["width"] is None

        # Classical filters ignore the model's fields (and the colour fix, and extra images): disabled.
        page.select_option("#method", "bicubic")
        for name in [*MODEL_ONLY, "num_images", "color_fix"]:
            assert page.is_disabled("#" + name), name
        assert page.is_enabled("#scale")
        expect(page.locator("#ignored")).to_have_text(
            "bicubic ignores: prompt, negative prompt, steps, guidance, noise level, seed, eta, scheduler, images, colour fix"
        )
        page.select_option("#method", "sd")
        for name in [*MODEL_ONLY, "num_images", "color_fix", "scale"]:
            assert page.is_enabled("#" + name), name
        expect(page.locator("#ignored")).to_have_text("")

        # A server that lists Real-ESRGAN, LoRAs and width/height (other branches add them): the page
        # renders what /v1/info says.
        def richer(route):
            body = route.fetch().json()
            body["methods"] = [*body["methods"], "realesrgan"]
            body["loras"] = [
                {"name": "film-grain", "scale": 0.8},
                {"name": "sharp", "scale": 1.0},
            ]
            body["defaults"] |= {"width": None, "height": None, "lora": "film-grain,sharp"}
            route.fulfill(json=body)

        page.route("**/v1/info", richer)
        page.reload()
        expect(page.locator("#lora")).to_be_visible()
        assert options_of(page, "#lora") == [
            ["", "server default (film-grain, sharp)"],  # sent as nothing
            ["none", "none (the base model)"],
            ["film-grain", "film-grain (scale 0.8)"],
            ["sharp", "sharp (scale 1)"],
        ]
        expect(page.locator("#width")).to_be_visible()
        assert options_of(page, "#method")[-1] == ["realesrgan", "realesrgan (GAN)"]
        page.select_option("#method", "realesrgan")
        for name in [*MODEL_ONLY, "lora", "num_images"]:
            assert page.is_disabled("#" + name), name
        assert page.is_enabled("#color_fix") and page.is_enabled("#width")
        page.select_option("#method", "lanczos")
        assert page.is_disabled("#lora")
        page.select_option("#method", "sd")
        assert page.is_enabled("#lora")

        # What the page sends (seen through the estimate request): the LoRA chosen, width/height when
        # given (and the file's line follows them), nothing that the method ignores.
        sent: list[str] = []

        def estimate(route):
            sent.append(route.request.post_data or "")
            route.fulfill(
                json={
                    "seconds": 1.0,
                    "peak_bytes": 1,
                    "output_size": [1, 1],
                    "summary": f"call {len(sent)}",
                }
            )

        page.route("**/v1/estimate", estimate)
        page.set_input_files("#file", str(ROOT / "examples" / "cat.png"))
        expect(page.locator("#estimate")).to_have_text(
            "call 1"
        )  # one call per burst of changes
        assert 'name="input_width"\r\n\r\n64\r\n' in sent[0] and 'name="lora"' not in sent[0]
        assert 'name="width"' not in sent[0] and 'name="height"' not in sent[0]  # no output target set
        page.select_option("#lora", "sharp")
        page.fill("#width", "100")
        expect(page.locator("#estimate")).to_have_text("call 2")
        expect(page.locator("#file-info")).to_have_text("cat.png · 64×64 → 100×100")
        # input_width/input_height are the input's size; width (the output target) goes as the job gets it.
        assert (
            'name="lora"\r\n\r\nsharp\r\n' in sent[1]
            and 'name="input_width"\r\n\r\n64\r\n' in sent[1]
            and 'name="input_height"\r\n\r\n64\r\n' in sent[1]
            and 'name="width"\r\n\r\n100\r\n' in sent[1]
        )
        jobs: list[str] = []

        def refuse(route):
            jobs.append(route.request.post_data_buffer.decode("latin-1"))
            route.fulfill(
                status=422,
                json={"detail": "lora: refused by this test", "option": "lora"},
            )

        page.route("**/v1/jobs", refuse)
        page.click("#run")
        expect(page.locator("#error")).to_have_text(
            "cat.png: lora: refused by this test"
        )  # a 4xx detail
        assert (
            'name="lora"\r\n\r\nsharp\r\n' in jobs[0]
            and 'name="width"\r\n\r\n100\r\n' in jobs[0]
        )
        assert (
            'name="steps"\r\n\r\n75\r\n' in jobs[0] and 'filename="cat.png"' in jobs[0]
        )
        page.select_option("#method", "lanczos")
        expect(page.locator("#estimate")).to_have_text("call 3")
        assert (
            'name="lora"' not in sent[2]
            and 'name="steps"' not in sent[2]
            and 'name="method"\r\n\r\nlanczos' in sent[2]
        )
        page.click("#run")
        expect(page.locator("#error")).to_have_text(
            "cat.png: lora: refused by this test"
        )
        assert (
            len(jobs) == 2
            and 'name="lora"' not in jobs[1]
            and 'name="prompt"' not in jobs[1]
        )
        assert unexpected(errors) == []
        page.close()


def test_unreadable_files_and_server_errors_are_shown_by_name(browser, app, tmp_path):
    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        bad = tmp_path / "holiday.jpg"
        bad.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
        page.set_input_files("#file", [str(bad), str(CAT)])
        expect(page.locator("#error")).to_have_text(
            "holiday.jpg: not an image the browser can read (image/jpeg); not queued"
        )
        expect(page.locator("#file-info")).to_have_text("cat.png · 64×64 → 256×256")
        assert page.is_enabled("#run")  # the readable one can go
        # The server's 4xx JSON error: its `detail` is shown, named by file.
        page.fill("#num_images", "99")
        page.click("#run")
        expect(page.locator("#error")).to_contain_text(
            re.compile(r"^cat\.png: num_images must be .*99")
        )
        assert app.state.manager.status()["jobs"]["done"] == 0
        expect(page.locator("#jobs-panel")).to_be_hidden()
        assert page.is_enabled("#run")
        # Fixed, two images per input: one row, a download for each.
        page.fill("#num_images", "2")
        page.fill("#steps", "2")
        page.click("#run")
        expect(page.locator("#jobs li[data-state=done]")).to_have_count(1)
        expect(page.locator("#error")).to_be_hidden()
        links = page.locator("#jobs a.download")
        assert links.all_text_contents() == ["PNG 1", "PNG 2"]
        names = [a.get_attribute("download") for a in links.all()]
        assert len(set(names)) == 2 and all(
            n.startswith("cat_x4") and n.endswith(".png") for n in names
        )
        assert unexpected(errors) == []
        page.close()


def test_two_files_queue_two_jobs_that_finish_and_download(browser, app, tmp_path):
    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        second = pattern_png(tmp_path / "blocks.png", (24, 16))
        page.set_input_files("#file", [str(CAT), str(second)])
        expect(page.locator("#file-info")).to_have_text(
            "cat.png · 64×64 → 256×256\nblocks.png · 24×16 → 96×64"
        )
        page.fill("#steps", "2")
        page.fill("#seed", "7")
        page.click("#run")
        rows = page.locator("#jobs li")
        expect(rows).to_have_count(2)
        expect(page.locator("#jobs li[data-state=done]")).to_have_count(2)
        expect(page.locator("#status")).to_have_text("2 of 2 jobs done")
        listed = page.request.get(base + "/v1/jobs").json()["jobs"]
        assert sorted(j["input_name"] for j in listed) == ["blocks.png", "cat.png"]
        assert all(j["state"] == "done" for j in listed)
        # Newest first, as /v1/jobs lists them; each row names its file and offers its download.
        assert rows.locator(".name").all_text_contents() == ["blocks.png", "cat.png"]
        assert rows.locator(".state").nth(1).text_content().startswith("done in ")
        for i, (name, size) in enumerate(
            [("blocks_x4.png", (96, 64)), ("cat_x4.png", (256, 256))]
        ):
            with page.expect_download() as info:
                rows.nth(i).locator("a.download").click()
            assert info.value.suggested_filename == name
            saved = tmp_path / name
            info.value.save_as(saved)
            with Image.open(saved) as im:
                assert im.size == size
        # The first finished job is in the comparison; "Compare" on the other row switches to it.
        expect(page.locator("#result-info")).to_contain_text(
            "cat.png · 256×256 · seed 7 · 2 steps"
        )
        rows.nth(0).locator("button.show").click()
        expect(page.locator("#result-info")).to_contain_text("blocks.png · 96×64")
        page.wait_for_function(
            "() => before.width === 96 && before.height === 64"
        )  # the input drawn at 96x64
        assert unexpected(errors) == []
        page.close()


def loupe_state(page):
    return page.evaluate(
        """() => ['loupe-before', 'loupe-after'].map(id => {
            const e = document.getElementById(id), r = e.getBoundingClientRect(), p = e.parentElement.getBoundingClientRect();
            return {transform: e.style.transform, left: r.left - p.left, top: r.top - p.top, width: r.width, height: r.height};
        })"""
    )


def test_the_loupe_shows_1_to_1_and_pans_both_panes_together(browser, app, tmp_path):
    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        page.set_input_files(
            "#file", str(pattern_png(tmp_path / "blocks.png", (160, 160)))
        )
        page.select_option("#method", "nearest")
        page.click("#run")
        expect(page.locator("#result-info")).to_contain_text("blocks.png · 640×640")
        page.wait_for_function(
            "() => document.getElementById('after').complete && document.getElementById('before').width === 640"
        )
        # The before side is the input drawn at the output's size (nearest): pixel (x, y) = input (x//4, y//4).
        src = np.asarray(Image.open(tmp_path / "blocks.png").convert("RGB"))
        for x, y in [(0, 0), (37, 91), (639, 639), (322, 600)]:
            rgba = page.evaluate(
                f"() => Array.from(document.getElementById('before').getContext('2d').getImageData({x}, {y}, 1, 1).data)"
            )
            assert rgba[:3] == src[y // 4, x // 4].tolist()

        page.click("button.zoom[data-zoom='1']")
        expect(page.locator("#loupe")).to_be_visible()
        expect(page.locator("#compare")).to_be_hidden()
        assert (
            page.get_attribute("button.zoom[data-zoom='1']", "aria-pressed") == "true"
        )
        pane = page.eval_on_selector(
            "#pane-after", "p => [p.clientWidth, p.clientHeight]"
        )
        before, after = loupe_state(page)
        assert before == after  # the same region on both sides
        assert (
            after["width"] == 640 and after["height"] == 640
        )  # 1:1: one output pixel per CSS pixel
        # Centred: the view's middle is the image's middle (to a pixel).
        assert (
            abs(after["left"] + 320 - pane[0] / 2) <= 1
            and abs(after["top"] + 320 - pane[1] / 2) <= 1
        )

        # Drag on the left pane: both move by the drag.
        box = page.locator("#pane-before").bounding_box()
        page.mouse.move(box["x"] + 200, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(box["x"] + 150, box["y"] + 170, steps=4)
        page.mouse.up()
        before2, after2 = loupe_state(page)
        assert before2 == after2
        assert after2["left"] == pytest.approx(after["left"] - 50, abs=1) and after2[
            "top"
        ] == pytest.approx(after["top"] - 30, abs=1)

        # Keys: zoom 4x keeps the centre, arrows pan both, 0 fits.
        page.focus("#loupe")
        page.keyboard.press("4")
        before4, after4 = loupe_state(page)
        assert (
            before4 == after4
            and after4["width"] == 2560
            and "scale(4)" in after4["transform"]
        )
        page.keyboard.press("ArrowRight")
        before5, after5 = loupe_state(page)
        assert before5 == after5 and after5["left"] == pytest.approx(
            after4["left"] - round(pane[0] * 0.1), abs=1
        )
        # Panning stops at the image's edge.
        for _ in range(8):  # 8 half views: more than is left
            page.keyboard.press("Shift+ArrowRight")
        _, edge = loupe_state(page)
        assert edge["left"] + edge["width"] == pytest.approx(pane[0], abs=1)
        expect(page.locator("#loupe-info")).to_contain_text(
            f"4x · pixels {640 - round(pane[0] / 4)}–640"
        )
        page.keyboard.press("0")
        expect(page.locator("#compare")).to_be_visible()
        expect(page.locator("#loupe")).to_be_hidden()

        # For the README: the cat, lanczos against the input drawn with nearest, at 4x.
        page.set_input_files("#file", str(CAT))
        page.select_option("#method", "lanczos")
        page.click("#run")
        expect(page.locator("#result-info")).to_contain_text("cat.png · 256×256")
        page.wait_for_function("() => document.getElementById('after').complete")
        # Double-click the cat's eye in the fitted view: 1:1 centred there; then 4x around it.
        fit = page.locator("#compare").bounding_box()
        page.mouse.dblclick(
            fit["x"] + fit["width"] * 0.3, fit["y"] + fit["height"] * 0.45
        )
        expect(page.locator("#loupe")).to_be_visible()
        expect(page.locator("#loupe-info")).to_contain_text(
            "1:1 · pixels 0–256 × 0–256 of 256×256"
        )  # all of it fits
        page.keyboard.press("4")
        b, a = loupe_state(page)
        assert b == a and a["width"] == 1024
        eye_x, eye_y = 0.3 * 256, 0.45 * 256  # now in the middle of the panes
        assert a["left"] + 4 * eye_x == pytest.approx(pane[0] / 2, abs=4) and a[
            "top"
        ] + 4 * eye_y == pytest.approx(pane[1] / 2, abs=4)
        shot = tmp_path / "web-page-loupe.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("SDX4_UPDATE_SCREENSHOT") == "1":
            with Image.open(shot) as im:
                im.convert("RGB").save(
                    ROOT / "docs" / "web-page-loupe.png", optimize=True
                )
        assert unexpected(errors) == []
        page.close()


def test_no_estimate_on_a_server_without_the_route(browser, app, tmp_path):
    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        asked: list[str] = []

        def older_server(route):  # this server has the route; an older one answers 404
            asked.append(route.request.url)
            route.fulfill(status=404, json={"detail": "Not Found"})

        page.route("**/v1/estimate", older_server)
        page.set_input_files("#file", str(CAT))
        page.wait_for_function("() => state.estimate.absent === true")
        assert len(asked) == 1
        expect(page.locator("#file-info")).to_have_text("cat.png · 64×64 → 256×256")
        expect(page.locator("#estimate")).to_be_hidden()
        assert (
            page.evaluate("() => state.estimate.absent") is True
        )  # and it does not ask again
        page.close()


def test_the_estimate_follows_the_file_and_the_options(browser, app, tmp_path):
    """The page against the /v1/estimate contract (fields input_width, input_height + the option fields; 200 JSON with
    `summary`, or a 422 JSON `detail`), here answered by a test route."""
    seen: list[dict] = []
    # this test's route instead of the server's own (tested below)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/estimate"]

    @app.post("/v1/estimate")
    async def estimate(request: Request) -> JSONResponse:
        form = dict((await request.form()).items())
        seen.append(form)
        if form.get("steps") == "0":
            return JSONResponse(
                {"detail": "steps must be in 1..1000; got 0", "option": "steps"},
                status_code=422,
            )
        w, h, s = int(form["input_width"]), int(form["input_height"]), int(form.get("scale", 4))
        summary = f"{form['method']} {w}x{h} -> {w * s}x{h * s}: about 3.5 s"
        return JSONResponse(
            {
                "seconds": 3.5,
                "peak_bytes": 1,
                "output_size": [w * s, h * s],
                "summary": summary,
            }
        )

    with live_server(app) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        page.set_input_files("#file", str(CAT))
        expect(page.locator("#estimate")).to_have_text(
            "sd 64x64 -> 256x256: about 3.5 s"
        )
        assert (
            "image" not in seen[-1]
            and seen[-1]["steps"] == "75"
            and seen[-1]["method"] == "sd"
        )
        page.select_option("#method", "bicubic")
        expect(page.locator("#estimate")).to_have_text(
            "bicubic 64x64 -> 256x256: about 3.5 s"
        )
        assert "steps" not in seen[-1]  # disabled fields are not sent
        page.select_option("#method", "sd")
        page.fill("#steps", "0")
        expect(page.locator("#estimate")).to_have_text(
            "no estimate: steps must be in 1..1000; got 0"
        )
        page.close()


def test_the_estimate_from_this_server(browser, app, tmp_path):
    """The real route (another branch adds it): skips while this server answers 404."""
    with live_server(app) as base:
        import urllib.request
        from urllib.error import HTTPError

        boundary = "sdx4boundary"
        body = (
            "".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                for k, v in {"input_width": "64", "input_height": "64", "steps": "2"}.items()
            )
            + f"--{boundary}--\r\n"
        )
        req = urllib.request.Request(
            base + "/v1/estimate",
            data=body.encode(),
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                expected = json.load(r)
        except HTTPError as e:
            if e.code == 404:
                pytest.skip(
                    "this server has no POST /v1/estimate yet (404): the page shows no estimate (tested above)"
                )
            raise
        errors: list[str] = []
        page = open_page(browser, base, errors)
        page.set_input_files("#file", str(CAT))
        page.fill("#steps", "2")
        expect(page.locator("#estimate")).to_have_text(expected["summary"])
        assert expected["output_size"] == [256, 256]
        assert unexpected(errors) == []
        page.close()


def test_the_lora_chosen_on_the_page_is_the_lora_the_real_service_merges(browser, tiny_model_dir, tmp_path):
    """The real service with two tiny LoRAs (`sdx4 serve --lora film.safetensors --lora sharp.safetensors:0.5`):
    the page offers the server default, none and each LoRA; each job's result has the pixels that
    `sdx4.load(model, loras=...)` gives with the same seed and options (exactly: same process and kernels)."""
    import io
    import urllib.request

    from lora_helpers import make_lora

    import sdx4

    film = make_lora(tiny_model_dir, tmp_path / "film.safetensors", r=4, alpha=8, seed=1)
    sharp = make_lora(tiny_model_dir, tmp_path / "sharp.safetensors", r=2, alpha=2, seed=5)

    def load(*loras):
        return sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False, loras=list(loras))

    served = create_app(load(str(film), f"{sharp}:0.5"), ServerSettings(queue=QueueSettings(results_dir=str(tmp_path / "r"))))
    with live_server(served) as base:
        errors: list[str] = []
        page = open_page(browser, base, errors)
        expect(page.locator("#lora")).to_be_visible()
        assert options_of(page, "#lora") == [
            ["", "server default (film.safetensors, sharp.safetensors)"],
            ["none", "none (the base model)"],
            ["film.safetensors", "film.safetensors (scale 1)"],
            ["sharp.safetensors", "sharp.safetensors (scale 0.5)"],
        ]
        page.set_input_files("#file", str(CAT))
        page.fill("#steps", "2")
        page.fill("#seed", "7")
        # (the page's choice, what the result must have merged, what the page says of it)
        runs = [
            ("film.safetensors", [str(film)], "LoRA film.safetensors ×1"),
            ("none", [], "no LoRA"),
            ("", [str(film), f"{sharp}:0.5"], "LoRA film.safetensors ×1, sharp.safetensors ×0.5"),
        ]
        for i, (choice, loras, said) in enumerate(runs, 1):
            page.select_option("#lora", choice)
            page.click("#run")
            expect(page.locator("#jobs li[data-state=done]")).to_have_count(i)
            expect(page.locator("#result-info")).to_contain_text(said)
            newest = page.request.get(base + "/v1/jobs?limit=1").json()["jobs"][0]
            job = page.request.get(base + newest["url"]).json()
            assert job["lora"] == [Path(p.rsplit(":", 1)[0]).name for p in loras]
            assert [r["name"] for r in job["metadata"].get("loras", [])] == job["lora"]
            with urllib.request.urlopen(base + job["result_urls"][0], timeout=TIMEOUT) as r:
                got = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
            want = np.asarray(load(*loras)(Image.open(CAT), steps=2, seed=7).image.convert("RGB"))
            assert np.array_equal(got, want), (choice, np.abs(got.astype(int) - want).max())
        page.select_option("#method", "bicubic")
        assert page.is_disabled("#lora")  # classical filters merge no LoRA: not sent
        assert unexpected(errors) == []
        page.close()
