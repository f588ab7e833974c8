"""The page at GET / in a real headless browser (Debian's chromium driven by Playwright), and the curl line of
docs/serving.md, against `serve.py --config configs/tiny.yaml --device cpu` run from the project root."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from serve_helpers import Server, answer_of, data_url, image_message, video_message

CHROMIUM = "/usr/bin/chromium"
IMAGE = ROOT / "tests" / "fixtures" / "tiny" / "images" / "img_a.jpg"
VIDEO = ROOT / "tests" / "fixtures" / "tiny" / "videos" / "clip_a.mp4"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(ROOT / "configs" / "tiny.yaml", tmp_path_factory.mktemp("page"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright. Missing either is a failure with the command that installs it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -r requirements.txt")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def ask_on_the_page(page, media: Path, question: str, decoding: str) -> str:
    page.set_input_files("#media", str(media))
    page.fill("#question", question)
    page.select_option("#decoding", decoding)
    page.click("#ask")
    page.wait_for_function("document.querySelector('#answer').textContent || "
                           "document.querySelector('#error').textContent", timeout=120_000)
    assert page.text_content("#error") == ""
    return page.text_content("#answer")


def test_the_page_answers_an_image_and_a_video(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 860})
    page.goto(server.url + "/")
    page.click("#ask")
    assert page.text_content("#error") == "choose an image or a video first"

    answer = ask_on_the_page(page, IMAGE, "What is in the image?", "greedy")
    assert not page.is_visible("#num_beams") and not page.is_visible("#temperature")  # greedy: nothing to set
    status, _, body = server.chat(messages=image_message("What is in the image?", data_url(IMAGE)),
                                  temperature=0, num_beams=1)
    assert status == 200 and answer == answer_of(body) != ""
    assert re.fullmatch(r"\d+\.\d\d s · \d+ prompt tokens, \d+ answer tokens", page.text_content("#elapsed"))
    page.screenshot(path=str(tmp_path / "serving_page.png"))
    if os.environ.get("LYNX_PAGE_SCREENSHOT"):  # how docs/serving_page.png is made
        shutil.copy(tmp_path / "serving_page.png", os.environ["LYNX_PAGE_SCREENSHOT"])

    answer = ask_on_the_page(page, VIDEO, "What moves in the video?", "beam")
    assert page.is_visible("#num_beams") and page.input_value("#num_beams") == "5"
    status, _, body = server.chat(messages=video_message("What moves in the video?", data_url(VIDEO)),
                                  temperature=0, num_beams=5)
    assert status == 200 and answer == answer_of(body)
    page.close()


def test_the_curl_line_of_the_docs_prints_an_answer(server):
    doc = (ROOT / "docs" / "serving.md").read_text()
    block = doc.split("<!-- curl-example")[1].split("```bash\n")[1].split("```")[0].strip()
    assert block.startswith("curl -s http://127.0.0.1:8000/")
    run = subprocess.run(["bash", "-c", block.replace(":8000/", f":{server.port}/")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    status, _, body = server.chat(messages=image_message("What is in the image?", data_url(IMAGE)))
    assert run.stdout.strip() == answer_of(body) != ""
