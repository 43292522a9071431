"""The web playground end to end in headless Chromium (Debian's package, driven by Playwright),
against a real server on the demo model with an API key."""

from __future__ import annotations

import os

import pytest

from model_registry.demo import DEMO_MODEL

from .helpers import API_KEY, ARTIFACTS, CHROMIUM, FLAGS, ServerProcess, ensure_browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ensure_browser()
    from model_registry.demo.train_lora import DEMO_ADAPTER

    with ServerProcess([DEMO_MODEL], tmp_path_factory.mktemp("playground"),
                       "--max-num-seqs", "8", "--lora-modules",
                       f"dusk={DEMO_ADAPTER}") as proc:
        yield proc


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url)
        yield page
        browser.close()


# Record every class change of the tiles, from the page itself: the demo model draws an
# image in well under a second, faster than a test can poll the page (a preview shown for
# 100 ms was missed by Playwright's wait), so the test reads the page's own history.
RECORD_TILES = """() => {
    window.__tileChanges = [];
    window.__tileObserver?.disconnect();
    window.__tileObserver = new MutationObserver((records) => {
        for (const r of records)
            if (r.target.matches('figure.tile'))
                window.__tileChanges.push([Number(r.target.dataset.index), r.oldValue]);
    });
    window.__tileObserver.observe(document.getElementById('tiles'),
        {subtree: true, attributes: true, attributeFilter: ['class'], attributeOldValue: true});
}"""
# A tile's classes after each change: three previews (one per partial image, the class set
# again each time), then finished.
PREVIEWED_THEN_DONE = ["tile preview"] * 3 + ["tile", "tile done"]


def record_tiles(page) -> None:
    page.evaluate(RECORD_TILES)


def tile_states(page) -> list[list[str]]:
    """Per tile, its class after each change since `record_tiles` (a record holds the value
    before its change; the last change's result is the tile's class now)."""
    changes = page.evaluate("window.__tileChanges")
    now = page.evaluate("Array.from(document.querySelectorAll('#tiles figure.tile'))"
                        ".map((t) => t.className)")
    before = [[old for i, old in changes if i == index] for index in range(len(now))]
    return [[*olds[1:], current] for olds, current in zip(before, now, strict=True)]


def test_page_generates_with_previews_and_shows_errors(page, server):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Every control is labelled.
    for control in page.locator("input, select").all():
        control_id = control.get_attribute("id")
        assert page.locator(f"label[for={control_id}]").count() == 1, control_id

    page.get_by_label("API key (kept in this browser)").fill(API_KEY)
    page.get_by_label("API key (kept in this browser)").dispatch_event("change")
    expect(page.locator("#model option")).to_have_count(1)
    assert page.evaluate("localStorage.getItem('llamagen.apiKey')") == API_KEY
    expect(page.locator("#classes option")).to_have_count(10)

    record_tiles(page)
    page.get_by_label("Class", exact=True).fill("yellow star")
    page.get_by_label("Images", exact=True).fill("2")
    page.get_by_label("Seed", exact=True).fill("5")
    page.keyboard.press("Enter")  # keyboard-operable: submit from the form
    if os.environ.get("LLAMAGEN_DOCS_SCREENSHOT"):  # docs/playground.png: catch a preview
        page.wait_for_selector("figure.tile.preview", timeout=60_000)
        page.screenshot(path=os.environ["LLAMAGEN_DOCS_SCREENSHOT"])
    expect(page.locator("figure.tile.done")).to_have_count(2, timeout=60_000)
    assert tile_states(page) == [PREVIEWED_THEN_DONE] * 2  # every preview before completion
    sizes = page.evaluate("""() => Array.from(document.querySelectorAll('figure.tile.done img'))
        .map((img) => [img.naturalWidth, img.naturalHeight])""")
    assert sizes == [[64, 64], [64, 64]]
    captions = page.locator("figure.tile.done figcaption").all_inner_texts()
    assert "seed 5" in captions[0] and "seed 6" in captions[1]
    download = page.locator("figure.tile.done a").first
    assert download.get_attribute("href").startswith("data:image/png;base64,")
    expect(page.locator("#status")).to_contain_text("Done: 2 images")
    page.screenshot(path=str(ARTIFACTS / "playground-done.png"))

    # An API error is shown as the API's message.
    page.get_by_label("Class", exact=True).fill("zebra")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("unknown class 'zebra'")
    expect(page.locator("figure.tile")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "playground-error.png"))


def test_page_draws_with_a_negative_class(page):
    """The negative field goes to the API as `negative_prompt`: the image says so, and its
    provenance records the class guidance steered away from."""
    import base64

    from playwright.sync_api import expect

    from vq_decoder.encoding import read_metadata

    page.get_by_label("Class", exact=True).fill("red circle")
    page.get_by_label("Negative class", exact=True).fill("blue square")
    page.get_by_label("Images", exact=True).fill("1")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("figure.tile.done")).to_have_count(1, timeout=60_000)
    expect(page.locator("figure.tile.done figcaption")).to_contain_text(
        "red circle, not blue square")
    href = page.locator("figure.tile.done a").first.get_attribute("href")
    meta = read_metadata(base64.b64decode(href.split(",", 1)[1]))
    assert meta["class_name"] == "red circle"
    assert meta["negative"] == {"label": 1, "class_name": "blue square"}
    page.get_by_label("Negative class", exact=True).fill("")


def test_page_draws_with_the_demo_adapter(page):
    """The adapter picker lists the model's LoRA adapters; a drawing with one names it, and
    its provenance records it."""
    import base64

    from playwright.sync_api import expect

    from vq_decoder.encoding import read_metadata

    expect(page.locator("#adapter option")).to_have_count(2)
    page.get_by_label("Adapter", exact=True).select_option("dusk")
    page.get_by_label("Class", exact=True).fill("yellow star")
    page.get_by_label("Images", exact=True).fill("1")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("figure.tile.done")).to_have_count(1, timeout=60_000)
    expect(page.locator("figure.tile.done figcaption")).to_contain_text("yellow star (dusk)")
    href = page.locator("figure.tile.done a").first.get_attribute("href")
    meta = read_metadata(base64.b64decode(href.split(",", 1)[1]))
    assert meta["lora"]["name"] == "dusk" and len(meta["lora"]["sha256"]) == 64
    page.get_by_label("Adapter", exact=True).select_option("")


def test_live_panel_shows_server_load(page):
    from playwright.sync_api import expect

    expect(page.locator("#ips")).not_to_have_text("–", timeout=10_000)
    expect(page.locator("#queue")).to_have_text("0")



def test_page_edits_a_generated_image_and_an_upload(page, tmp_path):
    """"Edit" under a generated image, pick the row by clicking the picture, and watch the
    rows below it redraw; then an uploaded file."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    page.get_by_label("Class", exact=True).fill("blue square")
    page.get_by_label("Images", exact=True).fill("2")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("figure.tile.done")).to_have_count(2, timeout=60_000)
    page.locator("figure.tile.done").first.get_by_role("button", name="Edit").click()
    expect(page.locator("#edit-source")).to_be_visible()
    expect(page.locator("#edit-go")).to_be_enabled()
    # The demo model's grid has 8 rows: a click 5.5 rows down picks row 5; the keyboard
    # moves it.
    page.locator("#edit-img").click(position={"x": 100, "y": 5.5 * 256 / 8})
    expect(page.locator("#edit-row-value")).to_have_text("5")
    page.locator("#edit-row").focus()
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#edit-row-value")).to_have_text("4")
    page.get_by_label("Class", exact=True).fill("red circle")
    record_tiles(page)
    page.get_by_role("button", name="Redraw").click()
    expect(page.locator("figure.tile.done")).to_have_count(2, timeout=60_000)
    assert tile_states(page) == [PREVIEWED_THEN_DONE] * 2  # redrawn live
    expect(page.locator("figure.tile.done figcaption").first).to_contain_text("kept 4 rows")
    expect(page.locator("#status")).to_contain_text("Done: 2 edits")
    page.screenshot(path=str(ARTIFACTS / "playground-edit.png"))

    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save(
        upload)
    page.locator("#edit-file").set_input_files(str(upload))
    expect(page.locator("#edit-caption")).to_contain_text("upload.png")
    page.get_by_label("Images", exact=True).fill("1")
    page.get_by_role("button", name="Redraw").click()
    expect(page.locator("figure.tile.done")).to_have_count(1, timeout=60_000)
    sizes = page.evaluate("""() => Array.from(document.querySelectorAll('figure.tile.done img'))
        .map((img) => [img.naturalWidth, img.naturalHeight])""")
    assert sizes == [[64, 64]]  # fitted to the model's size


def test_live_panel_shows_the_rate_and_queue_during_a_generation(page, server):
    """While this page generates (and another client keeps the server busy), the panel shows
    a non-zero images/s and the queue; afterwards the queue is back to 0."""
    import threading

    import httpx

    from .helpers import API_KEY as KEY

    stop = threading.Event()

    def load() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            while not stop.is_set():
                client.post(f"{server.url}/v1/generate", json={"labels": [1, 2, 3, 4]})

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        page.get_by_label("Class", exact=True).fill("yellow star")
        page.get_by_label("Images", exact=True).fill("10")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("""() => document.getElementById('generate').disabled
            && Number(document.getElementById('ips').textContent) > 0
            && Number(document.getElementById('queue').textContent) > 0""", timeout=60_000)
    finally:
        stop.set()
        thread.join()
    from playwright.sync_api import expect

    expect(page.locator("#queue")).to_have_text("0", timeout=20_000)
