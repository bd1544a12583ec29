"""The HTML viewer (pipelines/viewer.py) in a real headless browser: Chromium from the Debian
packages driven by selenium through chromedriver. DOM checks that the timeline and the segment
table are drawn, that seeking (timeline click, table click, playback) moves the playhead, that
zoom, scroll and the filters work, that pages load without console errors, and a screenshot that
is not blank. The page generation itself is also checked without a browser.

Needs `chromium` and `chromium-driver` (apt-get install chromium chromium-driver; .ci/run installs
them) and selenium (the `test` extra). Without them the browser tests skip and say why.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ms_temba.segments import Segment, sweep_segments
from pipelines.viewer import page_data, page_html, video_source, write_evaluate_viewer, write_predict_viewer

NAMES = ["walk", "run", "jump", "open door", "<script>alert(1)</script>"]
ROW, AXIS = 24, 22  # viewer.js


def evaluate_videos(num_videos=2, frames=240, hop=0.5, seed=0):
    rng = np.random.default_rng(seed)
    videos = []
    for v in range(num_videos):
        start = np.arange(frames) * hop
        end = start + hop
        labels = np.zeros((frames, len(NAMES)))
        truth = []
        for c in range(len(NAMES) - 1):  # the last class never happens
            for _ in range(2):
                s = int(rng.integers(0, frames - 40))
                e = s + int(rng.integers(8, 40))
                labels[s:e, c] = 1
                truth.append((c, float(start[s]), float(end[e - 1])))
        probs = np.clip(0.75 * labels + 0.2 * rng.random(labels.shape), 0, 1)
        segments = sweep_segments(probs, start, end, thresholds=[0.3, 0.6], nms_tiou=0.5, min_duration_s=1.0)
        videos.append({"video_id": f"video_{v}", "probabilities": probs, "start_s": start, "end_s": end,
                       "segments": segments, "ground_truth": truth, "labels": labels, "detection_map": 0.5 + 0.1 * v})
    return videos


# --------------------------------------------------------------------------------------------
# Without a browser


def test_pages_are_self_contained(tmp_path):
    index = write_evaluate_viewer(tmp_path / "viewer", evaluate_videos(), NAMES)
    pages = sorted((tmp_path / "viewer").iterdir())
    assert [p.name for p in pages] == ["index.html", "video_0.html", "video_1.html"]
    text = pages[1].read_text()
    for forbidden in ("http://", "https://", "<script src", "<link rel=\"stylesheet\""):
        assert forbidden not in text, forbidden
    # The data is JSON in a script element; "</" is escaped so a class name cannot close it.
    assert "<script>alert(1)</script>" not in text
    payload = text.split('<script type="application/json" id="viewer-data">')[1].split("</script>")[0]
    data = json.loads(payload)
    assert data["classes"] == NAMES and len(data["start"]) == 240 and data["truth"]
    index_text = index.read_text()
    assert 'href="video_0.html"' in index_text and "50.0" in index_text and "60.0" in index_text


def test_page_data_quantises_probabilities():
    probs = np.array([[0.0, 1.0], [0.5, 0.25]])
    data = page_data("v", ["a", "b"], probs, [0.0, 1.0], [1.0, 2.0], [Segment(1, 0.0, 1.0, 0.9)])
    import base64

    assert list(base64.b64decode(data["probs"][0])) == [0, 128] and list(base64.b64decode(data["probs"][1])) == [255, 64]
    assert data["duration"] == 2.0 and data["truth"] is None and data["segments"] == [[1, 0.0, 1.0, 0.9]]
    with pytest.raises(ValueError, match="frames, classes"):
        page_data("v", ["a"], probs, [0.0, 1.0], [1.0, 2.0], [])


def test_video_source_is_relative_to_the_page(tmp_path):
    (tmp_path / "videos").mkdir()
    assert video_source(tmp_path / "videos" / "my clip.mp4", tmp_path / "out") == "../videos/my%20clip.mp4"
    assert video_source(None, tmp_path) is None


def test_rerun_replaces_the_viewer_directory(tmp_path):
    write_evaluate_viewer(tmp_path / "viewer", evaluate_videos(num_videos=2), NAMES)
    write_evaluate_viewer(tmp_path / "viewer", evaluate_videos(num_videos=1), NAMES)
    assert sorted(p.name for p in (tmp_path / "viewer").iterdir()) == ["index.html", "video_0.html"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_predict_html_writes_pages_and_index(tmp_path):
    from test_predict import make_bundle, make_shards

    from pipelines.tools.predict import main as predict_main

    make_bundle(tmp_path / "model.pt")
    make_shards(tmp_path / "shards")
    assert predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out"), "--html", "--threshold-on", "0.3",
                         "--threshold-off", "0.2", "--min-duration", "0"]) == 0
    for video_id in ("video_0", "video_1"):
        text = (tmp_path / "out" / f"{video_id}.html").read_text()
        data = json.loads(text.split('id="viewer-data">')[1].split("</script>")[0])
        records = json.loads((tmp_path / "out" / f"{video_id}.segments.json").read_text())
        assert len(data["segments"]) == len(records) and data["video"] is None  # features: no video file
    assert "video_1.html" in (tmp_path / "out" / "index.html").read_text()


# --------------------------------------------------------------------------------------------
# In Chromium


def _find(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    binary = os.environ.get("MS_TEMBA_CHROMIUM") or _find("chromium", "chromium-browser", "google-chrome")
    driver_path = os.environ.get("MS_TEMBA_CHROMEDRIVER") or _find("chromedriver")
    if not binary or not driver_path:
        pytest.skip(f"no headless browser: chromium {binary or 'not found'}, chromedriver {driver_path or 'not found'} "
                    f"(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except Exception as error:  # a browser that does not start here (no display libraries, ...)
        pytest.skip(f"chromium at {binary} did not start through {driver_path}: {type(error).__name__}: {error}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path: Path):
    driver.get_log("browser")  # drop the log of earlier pages
    driver.get(path.as_uri())
    for _ in range(100):
        if driver.execute_script("return document.body && document.body.dataset.ready === 'true'"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never finished its script; console: {driver.get_log('browser')}")


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def playhead_time(driver) -> float:
    return float(driver.execute_script("return document.getElementById('playhead').dataset.time"))


def click_canvas_at(driver, x: int, y: int = AXIS + 5):
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "timeline-canvas")
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, x - size["width"] // 2, y - size["height"] // 2).click().perform()


@pytest.fixture(scope="module")
def evaluate_pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer")
    videos = evaluate_videos()
    write_evaluate_viewer(out / "viewer", videos, NAMES)
    return out / "viewer", videos


def test_timeline_and_table_are_drawn(browser, evaluate_pages):
    directory, videos = evaluate_pages
    open_page(browser, directory / "video_0.html")
    assert console_errors(browser) == []
    labels = browser.find_elements("css selector", "#labels .label-row")
    # The never-happening class has peak probability < 1 but is shown while min score is 0.
    assert [row.text.split("\n")[0] for row in labels] == NAMES
    canvas = browser.find_element("id", "timeline-canvas")
    assert canvas.size["height"] == AXIS + len(NAMES) * ROW and canvas.size["width"] > 500
    # The heat strips are painted: most pixels of the first row's strip are opaque and not white.
    painted = browser.execute_script("""
        var c = document.getElementById('timeline-canvas'), d = c.getContext('2d').getImageData(0, 22 + 10, c.width, 1).data;
        var n = 0; for (var i = 0; i < d.length; i += 4) if (d[i + 3] === 255 && (d[i] + d[i + 1] + d[i + 2]) < 700) n++;
        return n / (d.length / 4);""")
    assert painted > 0.9
    rows = browser.find_elements("css selector", "#segment-table tbody tr")
    assert len(rows) == len(videos[0]["segments"]) + len(videos[0]["ground_truth"])
    kinds = {row.find_elements("css selector", "td")[-1].text for row in rows}
    assert kinds == {"predicted", "ground truth"}


def test_seeking_moves_the_playhead(browser, evaluate_pages):
    directory, videos = evaluate_pages
    open_page(browser, directory / "video_0.html")
    assert playhead_time(browser) == 0.0
    scale = browser.execute_script("return window.msTembaViewer.state.scale")
    click_canvas_at(browser, 400)
    expected = 400 / scale
    assert playhead_time(browser) == pytest.approx(expected, abs=2 / scale)
    left = float(browser.execute_script("return parseFloat(document.getElementById('playhead').style.left)"))
    assert left == pytest.approx(playhead_time(browser) * scale, abs=1.0)
    # A click on a row of the segment table seeks to the start of its segment.
    row = browser.find_elements("css selector", "#segment-table tbody tr")[-1]
    start = float(row.get_attribute("data-start"))
    row.click()
    assert playhead_time(browser) == pytest.approx(start, abs=1e-3)
    assert "current" in row.get_attribute("class")
    assert console_errors(browser) == []


def test_zoom_scroll_and_follow(browser, evaluate_pages):
    directory, _ = evaluate_pages
    open_page(browser, directory / "video_0.html")
    inner = browser.find_element("id", "timeline-inner")
    fit_width = inner.size["width"]
    browser.find_element("id", "zoom-in").click()
    browser.find_element("id", "zoom-in").click()
    assert inner.size["width"] == pytest.approx(4 * fit_width, rel=0.02)
    window = browser.execute_script("return window.msTembaViewer.visibleWindow()")
    duration = browser.execute_script("return window.msTembaViewer.duration")
    assert window[1] - window[0] == pytest.approx(duration / 4, rel=0.05)
    # Seeking to a time outside the window scrolls the timeline to it; the canvas redraws there.
    browser.execute_script("window.msTembaViewer.seek(arguments[0])", 0.9 * duration)
    window = browser.execute_script("return window.msTembaViewer.visibleWindow()")
    assert window[0] <= 0.9 * duration <= window[1]
    assert browser.execute_script("return document.getElementById('timeline-scroll').scrollLeft") > 0
    browser.find_element("id", "zoom-fit").click()
    assert inner.size["width"] == pytest.approx(fit_width, abs=2)
    assert console_errors(browser) == []


def test_filters_by_name_and_score(browser, evaluate_pages):
    directory, videos = evaluate_pages
    open_page(browser, directory / "video_1.html")
    field = browser.find_element("id", "class-filter")
    field.send_keys("RU")
    assert [r.text.split("\n")[0] for r in browser.find_elements("css selector", "#labels .label-row")] == ["run"]
    table_classes = {r.find_element("css selector", "td").text
                     for r in browser.find_elements("css selector", "#segment-table tbody tr")}
    assert table_classes == {"run"}
    browser.execute_script("var f = document.getElementById('class-filter'); f.value = '';"  # clear() fires no input event
                           "f.dispatchEvent(new Event('input'));")
    assert len(browser.find_elements("css selector", "#labels .label-row")) == len(NAMES)
    browser.execute_script("var s = document.getElementById('score-filter'); s.value = '0.9';"
                           "s.dispatchEvent(new Event('input'));")
    shown = [r.text.split("\n")[0] for r in browser.find_elements("css selector", "#labels .label-row")]
    peaks = videos[1]["probabilities"].max(axis=0)
    assert shown == [name for name, peak in zip(NAMES, peaks) if round(peak * 255) / 255 >= 0.9]
    scores = [float(r.find_elements("css selector", "td")[4].text or 1)
              for r in browser.find_elements("css selector", "#segment-table tbody tr")]
    assert all(score >= 0.9 for score in scores)
    assert console_errors(browser) == []


def test_index_links_to_every_page(browser, evaluate_pages):
    directory, videos = evaluate_pages
    open_index = directory / "index.html"
    browser.get(open_index.as_uri())
    links = browser.find_elements("css selector", "#video-index tbody a")
    assert [link.text for link in links] == [v["video_id"] for v in videos]
    links[1].click()
    assert browser.current_url.endswith("video_1.html")
    assert console_errors(browser) == []


def test_screenshot_is_not_blank(browser, evaluate_pages, tmp_path):
    from PIL import Image

    directory, _ = evaluate_pages
    open_page(browser, directory / "video_0.html")
    png = browser.get_screenshot_as_png()
    (tmp_path / "viewer.png").write_bytes(png)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    background = np.array([250, 250, 250])
    not_background = (np.abs(image.astype(int) - background).sum(axis=2) > 30).mean()
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert image.shape[0] > 500 and image.shape[1] > 1000
    assert not_background > 0.05, not_background
    assert colours > 50, colours
    # Inside the timeline's rectangle, below the axis, the heat strips cover much of it
    rect = browser.execute_script("var r = document.getElementById('timeline-canvas').getBoundingClientRect();"
                                  "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];")
    ratio = rect[4]
    region = image[int((rect[1] + AXIS) * ratio):int(rect[3] * ratio), int(rect[0] * ratio):int(rect[2] * ratio)]
    # (a strip is 14 of the 24 px of a row in evaluate pages, under the ground-truth lane)
    assert region.size and (np.abs(region.astype(int) - 255).sum(axis=2) > 30).mean() > 0.5


def test_predict_page_playhead_follows_the_video(browser, tmp_path):
    from extractors.synthetic import write_mp4

    frames = [np.full((32, 32, 3), (i * 8) % 256, dtype=np.uint8) for i in range(8 * 6)]  # 6 s at 8 fps
    write_mp4(tmp_path / "clip.mp4", frames, 8, 32)
    start = np.arange(6.0)
    probs = np.tile(np.linspace(0, 1, 6)[:, None], (1, 2))
    data = page_data("clip", ["a", "b"], probs, start, start + 1, [Segment(0, 3.0, 6.0, 0.9)], None,
                     video_source(tmp_path / "clip.mp4", tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "clip.html").write_text(page_html(data, back=None))
    open_page(browser, tmp_path / "out" / "clip.html")
    ready = 0
    for _ in range(100):
        ready, error = browser.execute_script("var v = document.getElementById('video'); return [v.readyState, v.error && v.error.code]")
        if ready >= 1 or error:
            break
        time.sleep(0.05)
    if ready < 1:
        pytest.skip(f"this chromium cannot decode the h264 test video (media error {error}); no playback to follow")
    # Seeking from the timeline moves the video.
    scale = browser.execute_script("return window.msTembaViewer.state.scale")
    click_canvas_at(browser, int(2.0 * scale))
    for _ in range(100):
        if abs(browser.execute_script("return document.getElementById('video').currentTime") - 2.0) < 0.3:
            break
        time.sleep(0.05)
    assert browser.execute_script("return document.getElementById('video').currentTime") == pytest.approx(2.0, abs=0.3)
    # Playback moves the playhead.
    before = playhead_time(browser)
    browser.execute_script("var v = document.getElementById('video'); v.muted = true; v.play();")
    time.sleep(1.5)
    browser.execute_script("document.getElementById('video').pause();")
    after = playhead_time(browser)
    current = browser.execute_script("return document.getElementById('video').currentTime")
    assert after > before + 0.5 and after == pytest.approx(current, abs=0.3)
    assert console_errors(browser) == []
