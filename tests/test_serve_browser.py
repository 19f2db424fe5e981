"""`cascade serve` in a real headless Chromium driven by Selenium (Debian's chromium and chromium-driver;
.ci/run installs them): a person's path through the page, on the small untrained bundle.

CASCADE_SERVE_TEST_MODEL=BUNDLE serves another bundle (e.g. a trained one); CASCADE_SERVE_SCREENSHOT=PNG
keeps the screenshot of the generate test there (the README's docs/images/serve.png was taken so)."""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_helpers import small_bundle
from serve_helpers import call_json, png

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    chosen = os.environ.get("CASCADE_SERVE_TEST_MODEL")
    return Path(chosen) if chosen else small_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def server(bundle):
    """`cascade serve` as a user starts it, on a free port; yields its URL."""
    yield from serving(bundle)


@pytest.fixture(scope="module")
def imagen_server(tmp_path_factory):
    """`cascade serve` on the small bundle with an Imagen-style decoder and no prior."""
    from bundle_helpers import DECODER, seeded_stage
    from cascade.bundle import save_stage, write_manifest

    root = small_bundle(tmp_path_factory.mktemp("imagen"))
    shutil.rmtree(root / "prior")
    shutil.rmtree(root / "decoder")
    save_stage(seeded_stage("decoder", **DECODER, conditioning="imagen", text_len=16, steps=2), root / "decoder")
    write_manifest(root)
    yield from serving(root)


def serving(bundle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--model", str(bundle), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline, url, seen = time.monotonic() + 120, None, []
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        found = re.search(r"open (http://127\.0\.0\.1:\d+)/", seen[-1])
        url = found and found.group(1)
    assert url, f"cascade serve did not start: {''.join(seen)}"
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, one line
    assert proc.wait(30) == 130
    rest = "".join(iter(lambda: lines.get(timeout=5), "cascade: interrupted\n"))
    assert "Traceback" not in rest


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium / chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait(condition, timeout=60.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, server):
    browser.get(server)
    wait(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), what="the page to load")


def fill(browser, element_id, value):
    field = browser.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def choose(browser, element_id, value):
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", element_id)).select_by_value(value)


def tab(browser, name):
    browser.find_element("css selector", f"#tabs button[data-tab='{name}']").click()


def job_states(browser):
    return browser.execute_script("return Array.from(document.querySelectorAll('#jobs li')).map("
                                  "li => [li.id, li.dataset.state, li.querySelector('.job-state').textContent])")


def run(browser, state="done"):
    """Press the run button and wait for the new job (the list's first) to be `state`; its [id, state, text]."""
    before = len(job_states(browser))
    browser.find_element("id", "run").click()

    def new_job():
        jobs = job_states(browser)
        return len(jobs) > before and jobs[0][1] == state and jobs[0]

    return wait(new_job, what=f"the new job to be {state}")


def shown_pixels(browser, image) -> np.ndarray:
    """The RGB pixels the page drew for an <img>, read back through a canvas."""
    wait(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    data = browser.execute_script("""
        const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];""", image)
    w, h, flat = data
    return np.array(flat, dtype=np.uint8).reshape(h, w, 4)[..., :3]


def test_generate_shows_progress_images_settings_and_downloads_with_text_chunks(browser, server, bundle):
    from cascade.images import to_pil
    from cascade.pipeline import Cascade, Settings

    open_page(browser, server)
    assert "cpu" in browser.find_element("id", "model-line").text
    assert not browser.find_element("id", "regions-field").is_displayed()  # unCLIP: no per-object guidance
    fill(browser, "prompt", PROMPT)
    fill(browser, "seed", 7)
    fill(browser, "num_images", 2)
    choose(browser, "until", "decoder")
    fill(browser, "steps-decoder", 60)
    run(browser, "running")
    bars = wait(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('#jobs li.running progress')).map(p => "
        "[p.dataset.stage, p.value, p.max])"), what="the progress bars")
    assert [b[0] for b in bars] == ["prior", "decoder"]
    job_id = wait(lambda: job_states(browser)[0][1] == "done" and job_states(browser)[0][0])
    cards = wait(lambda: browser.find_elements("css selector", f"#gallery .group[data-group='{job_id}'] .card img"),
                 what="the images")
    assert len(cards) == 2
    settings = Settings(steps={"decoder": 60})
    want = Cascade.from_bundle(bundle, ("prior", "decoder")).generate([PROMPT] * 2, seed=7, until="decoder",
                                                                      settings=settings).final
    for card, image in zip(cards, want):
        assert np.array_equal(shown_pixels(browser, card), np.asarray(to_pil(image)))
    group = browser.find_element("css selector", f"#gallery .group[data-group='{job_id}']")
    shown = dict(zip([e.text for e in group.find_elements("css selector", ".settings dt")],
                     [e.text for e in group.find_elements("css selector", ".settings dd")]))
    assert shown["prompt"] == PROMPT and shown["seed"] == "7" and shown["until"] == "decoder"
    assert '"decoder": 60' in shown["steps"]

    screenshot = browser.downloads / "serve.png"
    browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] >= 1000
    if os.environ.get("CASCADE_SERVE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["CASCADE_SERVE_SCREENSHOT"])

    group.find_element("css selector", ".card a.download").click()
    target = browser.downloads / "a-red-circle-at-the-top-left-s7-00.png"
    wait(lambda: target.is_file() and target.stat().st_size > 0, what="the download")
    with Image.open(target) as saved:
        text = dict(saved.text)
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(to_pil(want[0])))
    assert (text["prompt"], text["seed"], text["until"], text["index"]) == (PROMPT, "7", "decoder", "0")
    assert '"decoder": 60' in text["steps"] and text["sampler"] == "ddim"


def test_per_object_guidance_is_offered_for_an_imagen_style_bundle_and_recorded(browser, imagen_server):
    open_page(browser, imagen_server)
    for name in ("vary", "interpolate", "textdiff"):  # they work on CLIP image embeddings: unCLIP bundles only
        button = browser.find_element("css selector", f"#tabs button[data-tab='{name}']")
        assert not button.is_enabled() and "unCLIP" in button.get_attribute("title")
    assert browser.find_element("css selector", "#tabs button[data-tab='img2img']").is_enabled()
    field = browser.find_element("id", "regions-field")
    assert field.is_displayed()
    tab(browser, "img2img")
    assert not field.is_displayed()  # generate only
    tab(browser, "generate")
    fill(browser, "prompt", "a red star above a blue circle")
    fill(browser, "regions", 2)
    assert browser.find_element("id", "regions_share").get_attribute("placeholder") == "0.25"  # the config's
    fill(browser, "regions_share", 0.5)
    choose(browser, "until", "decoder")
    fill(browser, "seed", 3)
    job_id, state, _ = run(browser)
    group = browser.find_element("css selector", f"#gallery .group[data-group='{job_id}']")
    shown = dict(zip([e.text for e in group.find_elements("css selector", ".settings dt")],
                     [e.text for e in group.find_elements("css selector", ".settings dd")]))
    assert shown["regions"] == "2" and shown["layout_prompt"] == "a red star at the top and a blue circle at the bottom"
    assert shown["regions_share"] == "0.5"  # the form's share reached the job
    group.find_elements("css selector", ".card button.use")[0].click()  # from generate: img2img, not vary
    assert browser.find_element("css selector", "#tabs button.active").get_attribute("data-tab") == "img2img"
    tab(browser, "generate")
    fill(browser, "prompt", "a red star")  # one object: no layout, one line under the form
    browser.find_element("id", "run").click()
    error = wait(lambda: browser.find_element("id", "form-error").text, what="the error")
    assert "regions needs a prompt of two or more objects" in error and "\n" not in error


def test_the_queue_shows_a_place_and_cancel_stops_jobs(browser, server):
    open_page(browser, server)
    fill(browser, "prompt", "a slow green star")
    choose(browser, "until", "decoder")
    fill(browser, "steps-decoder", 1000)
    running = run(browser, "running")
    queued = run(browser, "queued")
    assert queued[2] == "queued · place 1"
    browser.find_element("css selector", f"#{queued[0]} button.cancel").click()
    wait(lambda: dict((j[0], j[1]) for j in job_states(browser))[queued[0]] == "cancelled", what="a cancelled job")
    browser.find_element("css selector", f"#{running[0]} button.cancel").click()
    wait(lambda: dict((j[0], j[1]) for j in job_states(browser))[running[0]] == "cancelled", what="the running job "
         "to stop")


def test_bad_input_shows_a_message_not_a_trace(browser, server, tmp_path):
    open_page(browser, server)
    fill(browser, "prompt", "   ")
    browser.find_element("id", "run").click()
    error = browser.find_element("id", "form-error")
    wait(lambda: error.text, what="the error message")
    assert error.text == "the prompt is empty"
    tab(browser, "vary")
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    browser.find_element("css selector", "#slot-image input[type=file]").send_keys(str(fake))
    wait(lambda: "not a readable image" in error.text, what="the upload's error")
    assert "Traceback" not in browser.page_source
    assert call_json(f"{server}/api/info")[0] == 200  # the server runs on


def test_interpolate_strip_use_as_input_and_a_drawn_mask(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, server)
    tab(browser, "interpolate")
    for slot, colour in (("image", (220, 30, 30)), ("image_b", (30, 30, 220))):
        path = tmp_path / f"{slot}.png"
        path.write_bytes(png(Image.new("RGB", (64, 64), colour)))
        browser.find_element("css selector", f"#slot-{slot} input[type=file]").send_keys(str(path))
        wait(lambda: browser.execute_script(f"return !document.querySelector('#slot-{slot} img').hidden"))
    fill(browser, "frames", 3)
    choose(browser, "until", "decoder")
    job_id = run(browser)[0]
    group = wait(lambda: browser.find_elements("css selector", f".group[data-group='{job_id}']"))[0]
    frames = [img.get_attribute("src") for img in group.find_elements("css selector", ".card img")]
    assert len(frames) == 3 and group.find_element("css selector", "img.animation").get_attribute("src")
    browser.execute_script("const s = arguments[0]; s.value = 2; s.dispatchEvent(new Event('input'));",
                           group.find_element("css selector", ".frame-slider"))
    assert group.find_element("css selector", "img.frame").get_attribute("src") == frames[2]

    tab(browser, "inpaint")
    group.find_elements("css selector", ".card button.use")[1].click()
    assert browser.find_element("id", "mask-base").get_attribute("src") == frames[1]
    canvas = browser.find_element("id", "mask-canvas")
    (ActionChains(browser).move_to_element_with_offset(canvas, -60, -60).click_and_hold()
     .move_by_offset(60, 30).move_by_offset(40, 40).release().perform())
    coverage = browser.execute_script("return window.maskCoverage()")
    assert 0.02 < coverage < 0.6
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "noise.png"
    path.write_bytes(png(noise))
    browser.find_element("css selector", "#slot-image input[type=file]").send_keys(str(path))
    wait(lambda: browser.find_element("id", "mask-base").get_attribute("src") != frames[1], what="the upload")
    (ActionChains(browser).move_to_element_with_offset(canvas, -60, -60).click_and_hold()
     .move_by_offset(60, 30).move_by_offset(40, 40).release().perform())
    coverage = browser.execute_script("return window.maskCoverage()")
    fill(browser, "prompt", "a green star")
    done = run(browser)[0]
    result = wait(lambda: browser.find_elements("css selector", f".group[data-group='{done}'] .card img"))[0]
    same = (shown_pixels(browser, result) == np.asarray(noise)).all(axis=-1).mean()
    assert 1 - coverage - 0.05 <= same < 1 - coverage / 2  # kept outside the painted mask, redrawn inside it
