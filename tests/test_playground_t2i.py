"""The playground with a text-to-image model (its own module, so the demo model's server from
test_playground is gone before this one starts: one server at a time on small machines)."""

from __future__ import annotations

from .helpers import API_KEY, ARTIFACTS, CHROMIUM, FLAGS, ServerProcess, ensure_browser


def test_text_model_takes_a_caption(t2i_served_model, tmp_path):
    """A t2i model: the prompt field becomes a caption box and generation sends prompts."""
    from playwright.sync_api import expect, sync_playwright

    ensure_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerProcess([t2i_served_model.path], tmp_path, "--max-num-seqs", "4") as server, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url)
        page.get_by_label("API key (kept in this browser)").fill(API_KEY)
        page.get_by_label("API key (kept in this browser)").dispatch_event("change")
        expect(page.locator("#prompt-label")).to_have_text("Prompt")
        expect(page.locator("#classes option")).to_have_count(0)
        expect(page.locator("#cfg")).to_have_value("7.5")  # sample_t2i.py's defaults
        expect(page.locator("#topk")).to_have_value("1000")
        page.get_by_label("Prompt", exact=True).fill("A red car at NIGHT")
        page.get_by_label("Images", exact=True).fill("1")
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(page.locator("figure.tile.done")).to_have_count(1, timeout=60_000)
        caption = page.locator("figure.tile.done figcaption").inner_text()
        assert "a red car at night" in caption  # the cleaned caption the model saw
        page.screenshot(path=str(ARTIFACTS / "playground-t2i.png"))
        browser.close()
