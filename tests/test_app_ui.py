"""The demo's UI wiring (`app.py`): controls enabled only when they act, outputs cleared after a failed request, the
heatmap gallery's title outside its pictures, and a start-up line that offers no share link."""

import socket
from pathlib import Path

import numpy as np
import pytest

import app

# Gradio's queue calls pandas in ways pandas 3 deprecates; nothing this project can change.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return app.build_demo([], examples_dir=tmp_path_factory.mktemp("ui-examples"))


def _component(demo, label: str):
    (component,) = [block for block in demo.blocks.values() if getattr(block, "label", None) == label]
    return component


def _listener(demo, name: str):
    (function,) = [function for function in demo.fns.values() if function.name == name]
    return function


def test_temperature_and_top_p_are_interactive_only_while_sampling(demo):
    sampling = _component(demo, "Sample instead of searching")
    temperature, top_p = _component(demo, "Temperature"), _component(demo, "Top-p")
    assert sampling.value is False and temperature.interactive is False and top_p.interactive is False

    toggle = _listener(demo, "_sampling_controls")
    assert toggle.targets == [(sampling._id, "change")] and toggle.outputs == [temperature, top_p]
    assert toggle.api_visibility == "private"  # UI wiring, not an API endpoint
    assert [update["interactive"] for update in toggle.fn(True)] == [True, True]
    assert [update["interactive"] for update in toggle.fn(False)] == [False, False]


def test_a_failed_caption_clears_the_outputs_and_their_error_badges(demo):
    caption = _listener(demo, "caption")
    cleared = _listener(demo, "_cleared_results")
    assert cleared.trigger_only_on_failure and cleared.trigger_after == caption._id
    assert cleared.outputs == caption.outputs and cleared.api_visibility == "private"
    for component, value in zip(cleared.outputs, cleared.fn()):
        component.postprocess(value)  # each empty value is one its component accepts
    assert cleared.fn() == ("", [], [])


def test_the_heatmap_title_sits_above_the_gallery_not_over_it(demo):
    (gallery,) = [block for block in demo.blocks.values() if block.get_block_name() == "gallery"]
    assert gallery.show_label is False and gallery.label == app.HEATMAPS_TITLE
    texts = [block.value for block in demo.blocks.values() if block.get_block_name() == "markdown"]
    assert f"**{app.HEATMAPS_TITLE}**" in texts


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_start_up_line_offers_no_share_link(demo, capfd):
    port = _free_port()
    app.launch_demo(demo, "127.0.0.1", port, prevent_thread_lock=True)
    try:
        printed = capfd.readouterr().out
    finally:
        demo.close()
    assert f"Running on http://127.0.0.1:{port}/ (this machine only; no public share link)" in printed
    assert "share" not in printed.replace("no public share link", "")
    assert app.startup_banner("http://localhost:7860/", "0.0.0.0").startswith(
        "* Running on http://localhost:7860/ (every address of 0.0.0.0;"
    )


CHROMIUM = Path("/usr/bin/chromium")


def test_browser_shows_no_empty_error_badges_after_a_failed_caption(saved_tiny_attention_captioner, tmp_path):
    """A file that is not an image: its message appears as a toast, and the outputs carry no red "Error" badge."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not present")
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).bytes(2048))
    served = app.build_demo([str(saved_tiny_attention_captioner)], examples_dir=tmp_path / "examples")
    app.launch_demo(served, "127.0.0.1", _free_port(), prevent_thread_lock=True)
    badges = "#caption .error, #captions-table .error, #heatmaps .error"
    visible_badges = f"() => [...document.querySelectorAll('{badges}')].filter(e => e.offsetParent !== null).length"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(served.local_url, timeout=20_000)
                page.locator("#image-input input[type=file]").set_input_files(str(noise))
                page.locator("#caption-button").click()
                page.get_by_text("Cannot read image 'noise.png'").first.wait_for(timeout=20_000)
                page.wait_for_function(f"() => ({visible_badges})() === 0", timeout=5_000)
            finally:
                browser.close()
    finally:
        served.close()
