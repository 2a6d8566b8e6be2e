"""The browser demo at ``GET /`` in a real headless Chromium against a real ``ditepose serve``.

The page must show what the API returns for the same image and options; the screenshot goes
to ``test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, python_cmd, stop_process, subprocess_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "demo-test-key"
IMAGE = "000000217285.jpg"  # 640x427, several people
ARTIFACTS = REPO_ROOT / "test-artifacts"

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serve(**env: str) -> Iterator[str]:
    """``ditepose serve`` (default model, REST only) in a subprocess; yields its URL once ready."""
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            python_cmd("serve", "--port", str(port), "--no-grpc"),
            cwd=REPO_ROOT, env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield _wait_ready(proc, log, f"http://127.0.0.1:{port}")
        finally:
            stop_process(proc)


@pytest.fixture(scope="module")
def tiny_coco(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two val images of coco-mini as an evaluation set, so a whole job takes seconds."""
    full = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    ids: list[int] = []
    for ann in full["annotations"]:
        if ann["num_keypoints"] > 0 and ann["image_id"] not in ids:
            ids.append(ann["image_id"])
    ids = ids[:2]
    subset = {k: v for k, v in full.items() if k not in ("images", "annotations")}
    subset["images"] = [img for img in full["images"] if img["id"] in ids]
    subset["annotations"] = [ann for ann in full["annotations"] if ann["image_id"] in ids]
    path = tmp_path_factory.mktemp("tiny-coco") / "person_keypoints_val2017.json"
    path.write_text(json.dumps(subset))
    return path


@pytest.fixture(scope="module")
def live_url(tiny_coco: Path, coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server of this module: API key on; evaluation jobs (where this checkout has them) in embedded mode."""
    datasets = {"coco-tiny": {"format": "coco", "ann_file": str(tiny_coco), "img_dir": str(coco_mini / "val2017")}}
    with _serve(DITEPOSE_API_KEY=API_KEY, DITEPOSE_DATASETS=json.dumps(datasets),
                DITEPOSE_JOBS_DIR=str(tmp_path_factory.mktemp("jobs"))) as url:
        yield url


def _wait_ready(proc: subprocess.Popen, log, url: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("server did not become ready in 120 s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium and chromedriver are not installed (apt install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ditepose-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1400,1000",
        # A synthetic camera (moving test pattern) that needs no permission prompt.
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout: float = 60, message: str = "") -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def _attr(driver, selector: str, name: str) -> str | None:
    return driver.find_element("css selector", selector).get_attribute(name)


def _api(url: str, image: bytes, **fields: object) -> dict:
    data = {k: json.dumps(v) if k == "boxes" else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items()}
    response = httpx.post(f"{url}/v1/pose", files={"image": ("img.jpg", image, "image/jpeg")}, data=data,
                          headers={"X-API-Key": API_KEY}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _requests_done(driver, count: int) -> bool:
    return int(_attr(driver, "body", "data-requests") or 0) >= count


def _drag_box(driver, canvas, box: tuple[float, float, float, float]) -> None:
    """Draw an image-pixel box [x, y, w, h] with the mouse on the (CSS-scaled) canvas."""
    from selenium.webdriver.common.action_chains import ActionChains

    natural = driver.execute_script("return [arguments[0].width, arguments[0].height]", canvas)
    rect = canvas.rect
    sx, sy = rect["width"] / natural[0], rect["height"] / natural[1]
    x, y, w, h = box
    start = (x * sx - rect["width"] / 2, y * sy - rect["height"] / 2)
    end = ((x + w) * sx - rect["width"] / 2, (y + h) * sy - rect["height"] / 2)
    (ActionChains(driver).move_to_element_with_offset(canvas, round(start[0]), round(start[1])).click_and_hold()
     .move_to_element_with_offset(canvas, round(end[0]), round(end[1])).release().perform())


def test_page_shows_what_the_api_returns(live_url: str, browser, coco_mini: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    image_path = coco_mini / "val2017" / IMAGE
    image = image_path.read_bytes()

    # The page itself needs no key; the API does, and the page says so until one is typed.
    assert httpx.get(f"{live_url}/", timeout=10).status_code == 200
    assert httpx.get(f"{live_url}/v1/models", timeout=10).status_code == 401
    driver.get(f"{live_url}/")
    _wait(driver, lambda d: _attr(d, "body", "data-models") == "error", 30, "no API-key error shown")
    banner = driver.find_element("id", "banner")
    assert banner.is_displayed() and "API key" in banner.text
    driver.find_element("id", "api-key").send_keys(API_KEY, Keys.TAB)
    _wait(driver, lambda d: _attr(d, "body", "data-models") == "1", 30, "models did not load with the key")
    models = httpx.get(f"{live_url}/v1/models", headers={"X-API-Key": API_KEY}, timeout=10).json()["models"]
    model_select = Select(driver.find_element("id", "model"))
    assert [o.get_attribute("value") for o in model_select.options] == [m["name"] for m in models]
    banner_text = driver.find_element("id", "banner").text
    if models[0]["demo_weights"]:
        assert "RANDOM weights" in banner_text
    else:  # the served checkpoint's recorded quality, as /v1/models states it (the demo checkpoint: a warning)
        assert models[0]["quality"]["note"] in banner_text
        if models[0]["quality"]["demo_checkpoint"]:
            assert "NOT usable" in banner_text

    # Show every joint (random demo weights score low) so the screenshot has skeletons.
    thr = driver.find_element("id", "joint-thr")
    thr.clear()
    thr.send_keys("0")
    Select(driver.find_element("id", "decoder")).select_by_value("dark")

    # Upload: the page estimates at once; no boxes, so the server's detector (NanoDet) finds the people.
    driver.find_element("id", "file").send_keys(str(image_path))
    _wait(driver, lambda d: _requests_done(d, 1), 60, "no result after the upload")
    expected = _api(live_url, image, model=models[0]["name"], flip_test=True, decoder="dark")
    assert len(expected["persons"]) >= 3  # the three people in front (and smaller ones behind)
    assert _attr(driver, "#person-count", "data-count") == str(len(expected["persons"]))
    assert len(driver.find_elements("css selector", "#persons li")) == len(expected["persons"])

    # Two boxes drawn with the mouse -> two persons, exactly as the API answers for those boxes.
    canvas = driver.find_element("id", "canvas")
    for box in ((262, 162, 107, 252), (376, 210, 98, 212)):
        _drag_box(driver, canvas, box)
    assert _attr(driver, "body", "data-boxes") == "2"
    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _requests_done(d, 2), 60, "no result for the boxes")
    curl = driver.find_element("id", "curl").text
    boxes = json.loads(re.search(r"boxes=(\[\[.*?\]\])", curl).group(1))
    assert len(boxes) == 2
    for got, want in zip(boxes, ((262, 162, 107, 252), (376, 210, 98, 212)), strict=True):
        assert got == pytest.approx(want, abs=3), "mouse box not in image pixels"
    for part in ("/v1/pose", "X-API-Key: $DITEPOSE_API_KEY", f"image=@{IMAGE}", "decoder=dark", "flip_test=true"):
        assert part in curl, (part, curl)
    expected = _api(live_url, image, boxes=boxes, model=models[0]["name"], flip_test=True, decoder="dark")
    assert _attr(driver, "#person-count", "data-count") == str(len(expected["persons"])) == "2"
    listed = driver.find_elements("css selector", "#persons li")
    assert len(listed) == 2
    for item, person in zip(listed, expected["persons"], strict=True):
        assert float(item.get_attribute("data-score")) == pytest.approx(person["score"], rel=1e-6, abs=1e-12)
    timings = driver.find_element("id", "timings").text
    for stage in ("decode", "preprocess", "inference", "postprocess", "total", "round trip"):
        assert stage in timings

    # Hovering a joint shows its name and score.
    inside = [k for k in expected["persons"][0]["keypoints"] if 5 <= k["x"] <= 635 and 5 <= k["y"] <= 422]
    joint = max(inside, key=lambda k: k["score"])
    natural_w = driver.execute_script("return arguments[0].width", canvas)
    scale = canvas.rect["width"] / natural_w
    (ActionChains(driver).move_to_element_with_offset(
        canvas, round(joint["x"] * scale - canvas.rect["width"] / 2), round(joint["y"] * scale - canvas.rect["height"] / 2))
     .perform())
    tip = driver.find_element("id", "tooltip")
    _wait(driver, lambda d: tip.is_displayed(), 10, "no tooltip over a joint")
    assert "score" in tip.text and tip.get_attribute("data-joint") in models[0]["joints"]

    # The server-drawn PNG (?render=png) appears below.
    driver.find_element("id", "render-png").click()
    _wait(driver, lambda d: d.execute_script("return document.getElementById('png-result').naturalWidth") == 640,
          60, "server PNG not shown")

    ARTIFACTS.mkdir(exist_ok=True)
    driver.find_element("id", "canvas").screenshot(str(ARTIFACTS / "demo_canvas.png"))
    driver.save_screenshot(str(ARTIFACTS / "demo_page.png"))
    assert (ARTIFACTS / "demo_page.png").stat().st_size > 10_000
    # No script errors; the only failed load is the models call made before the key was typed.
    problems = [e["message"] for e in driver.get_log("browser")
                if e["level"] == "SEVERE" and "401 (Unauthorized)" not in e["message"]]
    assert not problems, problems


def _open_jobs_tab(driver, url: str) -> str:
    driver.get(f"{url}/")
    driver.find_element("id", "api-key").clear()
    driver.find_element("id", "api-key").send_keys(API_KEY)
    driver.find_element("id", "tab-jobs").click()
    _wait(driver, lambda d: _attr(d, "#panel-jobs", "data-state"), 30, "jobs tab did not load")
    assert not driver.find_element("id", "options").is_displayed()
    return _attr(driver, "#panel-jobs", "data-state")


def _jobs_status(url: str) -> int:
    return httpx.get(f"{url}/v1/jobs", headers={"X-API-Key": API_KEY}, timeout=10).status_code


def _assert_jobs_message(driver, status: int, words: str) -> None:
    assert _attr(driver, "#panel-jobs", "data-state") == f"error-{status}"
    message = driver.find_element("id", "jobs-message")
    assert message.is_displayed() and words in message.text, message.text
    assert not driver.find_element("id", "jobs-table").is_displayed()


def test_jobs_tab_degrades_to_a_message(live_url: str, browser) -> None:
    """No jobs API (404) or no Redis (503): a sentence, not a broken table."""
    if _jobs_status(live_url) == 404:
        _open_jobs_tab(browser, live_url)
        _assert_jobs_message(browser, 404, "no evaluation jobs API")
        return
    # The jobs API is there: point it at a Redis that is not running.
    with _serve(DITEPOSE_API_KEY=API_KEY, DITEPOSE_REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0") as url:
        assert _jobs_status(url) == 503
        _open_jobs_tab(browser, url)
        _assert_jobs_message(browser, 503, "Redis")


def test_jobs_tab_shows_a_finished_job(live_url: str, browser) -> None:
    headers = {"X-API-Key": API_KEY}
    accepted = httpx.post(f"{live_url}/v1/evaluate", json={"dataset": "coco-tiny", "flip_test": False},
                          headers=headers, timeout=30)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    deadline = time.monotonic() + 150
    while True:
        job = httpx.get(f"{live_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert job["state"] == "succeeded", job

    driver = browser
    _open_jobs_tab(driver, live_url)
    row = f'#jobs-table tr[data-id="{job_id}"]'
    _wait(driver, lambda d: d.find_elements("css selector", row), 30, "the job is not listed")
    cells = driver.find_element("css selector", row).text
    assert "succeeded" in cells and "100%" in cells and "coco-tiny" in cells
    assert f"AP {job['metrics']['AP']:.3f}" in cells
    driver.find_element("css selector", row).click()
    _wait(driver, lambda d: _attr(d, "#job-chart", "data-bars"), 30, "no chart for the finished job")
    table = driver.find_element("id", "job-metrics").text
    for name in ("AP", "AP50", "AR"):
        assert f"{name} {job['metrics'][name]:.4f}" in table, table
    assert int(_attr(driver, "#job-chart", "data-bars")) >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "demo_jobs.png"))


def test_webcam_mode_sends_frames_and_draws(live_url: str, browser) -> None:
    driver = browser
    driver.get(f"{live_url}/")
    driver.find_element("id", "api-key").clear()
    driver.find_element("id", "api-key").send_keys(API_KEY)
    driver.find_element("id", "tab-webcam").click()
    driver.find_element("id", "cam-start").click()
    _wait(driver, lambda d: int(_attr(d, "#cam-stats", "data-answered") or 0) >= 3, 60, "no webcam results")
    sizes = driver.execute_script("const c = document.getElementById('cam-canvas'); return [c.width, c.height]")
    assert sizes[0] > 0 and sizes[1] > 0
    stats = driver.find_element("id", "cam-stats").text
    sent, answered = (int(v) for v in re.search(r"(\d+)/(\d+) frames", stats).groups()[::-1])
    assert answered <= sent <= answered + 1, stats  # one request in flight at most
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "demo_webcam.png"))
    driver.find_element("id", "cam-stop").click()


def test_page_and_assets_are_public_and_not_in_openapi(live_url: str) -> None:
    page = httpx.get(f"{live_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = (("demo-core.js", "text/javascript"), ("demo-jobs.js", "text/javascript"), ("demo.js", "text/javascript"),
              ("demo.css", "text/css"))
    for name, kind in assets:
        assert f'"demo/{name}"' in page.text
        asset = httpx.get(f"{live_url}/demo/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind) and len(asset.content) > 1000
    missing = httpx.get(f"{live_url}/demo/..%2Fapp.py", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    paths = httpx.get(f"{live_url}/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not any(p.startswith("/demo") for p in paths)
    # The page draws limbs from the model description: the skeleton is part of GET /v1/models.
    models = httpx.get(f"{live_url}/v1/models", headers={"X-API-Key": API_KEY}, timeout=10).json()["models"]
    from ditepose.model.keypoints import COCO

    assert models[0]["skeleton"] == [list(edge) for edge in COCO.skeleton]
