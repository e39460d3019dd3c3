"""The browser pages, in a real browser: /ui (every route of a model side by side on a photo)
and /docs (Swagger UI over /openapi.json), driven by Playwright in Debian's headless Chromium.

Chromium is the system package (`make setup` installs it; Playwright's own browser download is
never used): a machine without it FAILS these tests with the way to get it, it does not skip.
Every page is checked for console errors, uncaught exceptions and requests that leave the
gateway. Screenshots (desktop and 360 px) go to run/tests/screenshots/, or to docs/ for the
README with ``UI_SCREENSHOTS=docs``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from gateway.backends.base import Backend, BackendSettings
from gateway.backends.registry import backend_class
from gateway.errors import BackendUnavailable

from conftest import ROOT, config_of, load_yaml_config
from helpers import CAT_LABELS, SAME_ENGINE_ATOL, SAME_WEIGHTS_ATOL

CHROMIUM = os.environ.get("GATEWAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "docs" if os.environ.get("UI_SCREENSHOTS") == "docs" else ROOT / "run" / "tests" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 780}
# what Chromium logs for an API answer the page shows on purpose (a 401 before the key, a 413, a 503)
EXPECTED_HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (401|413|503)")
WAIT_MS = 90_000  # a cold route's first inference, on a busy 2-core machine


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: run `make setup` (requirements.txt pins it)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make setup`, which installs Debian's chromium "
                    "(`apt-get install chromium`), or point GATEWAY_CHROMIUM at a Chromium binary")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield chromium
        chromium.close()


class Tab:
    """A page in a fresh browser context, recording what a test must not see: console errors,
    uncaught exceptions, requests that leave ``base`` (blob: URLs of the chosen photos are local)."""

    def __init__(self, browser, base: str, viewport: dict = DESKTOP):
        self.base = base.rstrip("/") + "/"
        self.context = browser.new_context(viewport=viewport, device_scale_factor=1)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.api_requests: list[dict] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.context.on("request", self._request)

    def _request(self, request) -> None:
        url = request.url
        if not url.startswith((self.base, "blob:" + self.base, "data:")):
            self.external.append(url)
        if "/v1/" in url:
            self.api_requests.append({"url": url, "headers": request.headers})

    def open(self, path: str):
        self.page.goto(self.base + path.lstrip("/"))
        return self.page

    def check_clean(self, allowed: re.Pattern | None = None) -> None:
        errors = [e for e in self.errors if not (allowed and allowed.search(e))]
        assert not errors, errors
        assert not self.external, f"requests beyond the gateway: {self.external}"

    def fits(self) -> None:
        """Nothing wider than the window (no sideways scrolling)."""
        width = self.page.evaluate("document.documentElement.scrollWidth")
        assert width <= self.page.viewport_size["width"], width

    def shot(self, name: str, full_page: bool = True) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / name), full_page=full_page)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser):
    """Factory: tabs(base_url, viewport=DESKTOP) -> Tab; all closed after the test."""
    opened: list[Tab] = []

    def make(base: str, viewport: dict = DESKTOP) -> Tab:
        tab = Tab(browser, base, viewport)
        opened.append(tab)
        return tab

    yield make
    for tab in opened:
        tab.close()


def upload(page, *photos: tuple[str, bytes], model: str | None = None) -> None:
    """Pick the model, choose the photos, wait until every photo's routes have all answered."""
    page.wait_for_selector("#status .chip", timeout=WAIT_MS)
    if model:
        page.select_option("#model", model)
    page.set_input_files("#files", [{"name": name, "mimeType": "image/jpeg", "buffer": data} for name, data in photos])
    for name, _ in photos:
        page.wait_for_selector(f"article.photo[data-photo='{name}'][data-state=done]", timeout=WAIT_MS)


def column(page, photo: str, route: str):
    return page.locator(f"article.photo[data-photo='{photo}'] section.route[data-route='{route}']")


def shown_predictions(page, photo: str, route: str) -> list[tuple[str, float]]:
    return column(page, photo, route).locator("ol.predictions li[data-label]").evaluate_all(
        "items => items.map(li => [li.dataset.label, Number(li.dataset.score)])")


def listing(base: str, model: str, headers: dict | None = None) -> dict:
    models = requests.get(f"{base}/v1/models", headers=headers or {}, timeout=30).json()["models"]
    return next(m for m in models if m["name"] == model)


def test_page_loads_clean_and_shows_each_route_readiness_and_breaker(gateway_url, tabs):
    tab = tabs(gateway_url)
    page = tab.open("/")  # / redirects to the page
    page.wait_for_selector("#status .chip", timeout=WAIT_MS)
    assert page.url.endswith("/ui")
    assert page.locator("#model").input_value() == "efficientnet_lite0"
    expected = listing(gateway_url, "efficientnet_lite0")
    chips = page.locator("#status .chip").evaluate_all(
        "chips => chips.map(c => [c.dataset.route, c.dataset.ready === 'true', c.dataset.circuit])")
    assert chips == [[r["name"], r["ready"], r["circuit"]] for r in expected["routes"]]
    assert ["embedded", True, "closed"] in chips
    page.select_option("#model", "yolox_nano")
    assert page.locator("#status .chip").evaluate_all("cs => cs.map(c => c.dataset.route)") == \
        [r["name"] for r in listing(gateway_url, "yolox_nano")["routes"]]
    tab.check_clean()
    assert requests.get(f"{gateway_url}/ui", timeout=10).headers["Content-Security-Policy"].startswith(
        "default-src 'self'")


def test_chelsea_is_a_cat_on_every_running_route_with_the_json_apis_scores(gateway_url, tabs, chelsea_jpeg):
    tab = tabs(gateway_url)
    page = tab.open("/ui")
    upload(page, ("chelsea.jpg", chelsea_jpeg))
    model = listing(gateway_url, "efficientnet_lite0")
    ready = [r["name"] for r in model["routes"] if r["ready"]]
    assert "embedded" in ready
    for route in model["routes"]:
        name = route["name"]
        if name not in ready:  # an engine not running here: listed, not asked
            assert page.locator(f"article.photo .skipped [data-route='{name}']").count() == 1
            continue
        col = column(page, "chelsea.jpg", name)
        assert col.get_attribute("data-state") == "ok", col.inner_text()
        shown = shown_predictions(page, "chelsea.jpg", name)
        assert len(shown) == 5 and shown[0][0] in CAT_LABELS, (name, shown)
        answer = requests.post(f"{gateway_url}/v1/models/efficientnet_lite0/classify", data=chelsea_jpeg,
                               params={"route": name, "top_k": 5}, headers={"Content-Type": "image/jpeg"},
                               timeout=60).json()
        expected = answer["results"][0]["predictions"]
        assert [label for label, _ in shown] == [p["label"] for p in expected], name
        for (_, score), p in zip(shown, expected):
            assert abs(score - p["score"]) <= SAME_ENGINE_ATOL, (name, score, p)
        assert col.get_attribute("data-backend") == answer["backend"]
        assert f"answered by {answer['backend']}" in col.inner_text()
        assert float(col.get_attribute("data-latency-ms")) > 0
    # every answer on the page soon after the slowest engine's (the photo's decoding for the page included)
    took = float(page.get_attribute("article.photo", "data-ms"))
    slowest = max(float(column(page, "chelsea.jpg", name).get_attribute("data-latency-ms")) for name in ready)
    print(f"\n/ui: chelsea on {len(ready)} route(s) of efficientnet_lite0: all shown {took:.0f} ms after the "
          f"photo was chosen, {took - slowest:.0f} ms after the slowest answer arrived ({slowest:.0f} ms)")
    assert took - slowest < 1000
    tab.check_clean()
    tab.fits()
    tab.shot("ui.png")

    phone = tabs(gateway_url, PHONE)
    page = phone.open("/ui")
    upload(page, ("chelsea.jpg", chelsea_jpeg))
    assert shown_predictions(page, "chelsea.jpg", "embedded")[0][0] in CAT_LABELS
    phone.check_clean()
    phone.fits()
    phone.shot("ui-360.png")


def test_astronauts_person_box_is_drawn_where_the_json_puts_it(gateway_url, tabs, scene_photos):
    photo = scene_photos["astronaut"]
    tab = tabs(gateway_url)
    page = tab.open("/ui")
    upload(page, ("astronaut.jpg", photo), model="yolox_nano")
    answer = requests.post(f"{gateway_url}/v1/models/yolox_nano/detect", data=photo, params={"route": "embedded"},
                           headers={"Content-Type": "image/jpeg"}, timeout=60).json()
    expected = answer["results"][0]["detections"]
    assert expected and expected[0]["label"] == "person"
    canvas = column(page, "astronaut.jpg", "embedded").locator("canvas.boxes")
    # the canvas is the photo in its own pixels, the boxes drawn at the JSON's coordinates
    size = canvas.evaluate("c => [c.width, c.height]")
    assert size == list(Image.open(io.BytesIO(photo)).size) == [512, 512]
    drawn = json.loads(canvas.get_attribute("data-boxes"))
    assert [d["label"] for d in drawn] == [d["label"] for d in expected]
    for d, e in zip(drawn, expected):
        assert abs(d["score"] - e["score"]) <= SAME_WEIGHTS_ATOL
        for k in ("x1", "y1", "x2", "y2"):
            assert abs(d[k] - e["box"][k]) <= 0.01, (k, d, e)
    person = drawn[0]
    color = tuple(int(person["color"][i:i + 2], 16) for i in (1, 3, 5))
    # the stroke is really there, at the box's edges in the canvas's (the photo's) pixels
    mid_y = (person["y1"] + person["y2"]) / 2
    for x, y in ((person["x1"], mid_y), (person["x2"], mid_y)):
        pixel = canvas.evaluate("(c, [x, y]) => Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data)",
                                [int(x) if x == person["x1"] else min(int(x), size[0] - 1), int(y)])
        assert tuple(pixel[:3]) == color, (x, y, pixel)
    # ... and on the screen, where the photo is scaled to its column: the same place, scaled
    rect = canvas.evaluate("c => { const r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }")
    scale = rect[2] / size[0]
    assert abs(rect[3] / size[1] - scale) < 0.01  # aspect ratio kept
    left_edge = (rect[0] + person["x1"] * scale, rect[1] + mid_y * scale)
    clip = {"x": max(0.0, left_edge[0] - 2), "y": left_edge[1] - 2, "width": 5, "height": 5}
    pixels = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - color).sum(axis=1) < 90).any(), (pixels.tolist(), color)
    assert column(page, "astronaut.jpg", "embedded").locator("li[data-label='person']").count() >= 1
    tab.check_clean()
    tab.shot("ui-detect.png")


class DownEngine(Backend):
    """An engine that was ready a moment ago (its route is listed ready) and now cannot be reached."""

    def ready(self, route):
        return True

    def infer_batch(self, route, batch):
        raise BackendUnavailable(self.name, "cannot connect to http://127.0.0.1:9/v2/models: ConnectionError")


def test_an_engine_down_shows_its_error_and_the_other_columns_still_answer(make_api, serve_api, tabs, chelsea_jpeg):
    data = load_yaml_config()
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    data["backends"]["torchserve"].update(url=dead, management_url=dead)
    data["models"]["efficientnet_lite0"]["routes"] = [
        {"backend": "embedded"}, {"backend": "triton", "backend_model": "efficientnet_lite0"},
        {"backend": "torchserve", "backend_model": "efficientnet_lite0"}]
    config = config_of(data)
    engines = {name: backend_class(s.kind)(name, s) for name, s in config.backends.items()}
    engines["triton"] = DownEngine("triton", BackendSettings(kind="triton"))
    base = serve_api(make_api(config, backends=engines))
    tab = tabs(base)
    page = tab.open("/ui")
    upload(page, ("chelsea.jpg", chelsea_jpeg))
    # listed ready, answered 503: its column says why, in words; the others are untouched
    triton = column(page, "chelsea.jpg", "triton")
    assert triton.get_attribute("data-state") == "error" and triton.get_attribute("data-status") == "503"
    assert "503 backend_unavailable: backend 'triton': cannot connect to" in triton.locator(".error").inner_text()
    assert shown_predictions(page, "chelsea.jpg", "embedded")[0][0] in CAT_LABELS
    # torchserve is really down (nothing on its port): not ready, so not asked ...
    assert page.locator("article.photo .skipped [data-route='torchserve']").count() == 1
    # ... unless asked to: then its own 503, beside the others again
    page.check("#ask-all")
    upload(page, ("chelsea-again.jpg", chelsea_jpeg))
    torchserve = column(page, "chelsea-again.jpg", "torchserve")
    assert torchserve.get_attribute("data-status") == "503"
    assert "backend 'torchserve'" in torchserve.locator(".error").inner_text()
    assert column(page, "chelsea-again.jpg", "triton").get_attribute("data-status") == "503"
    assert shown_predictions(page, "chelsea-again.jpg", "embedded")[0][0] in CAT_LABELS
    # the status strip, refreshed after the run, shows the breakers the failures opened
    page.wait_for_selector("#status .chip[data-route='triton'][data-circuit='open']", timeout=10_000)
    assert "circuit open" in page.locator("#status .chip[data-route='triton']").inner_text()
    tab.check_clean(allowed=EXPECTED_HTTP_ERROR)
    tab.shot("ui-errors.png")


def test_too_large_photo_shows_the_413_message_and_the_next_photo_still_runs(start_gateway, tabs,
                                                                             chelsea_jpeg, scene_photos):
    data = load_yaml_config()
    data["server"]["max_body_bytes"] = 100_000
    data["models"]["efficientnet_lite0"]["routes"] = [{"backend": "embedded"}]
    base = start_gateway(data)  # a real `gateway serve`: its 413 reads and drops the body, as gunicorn bounds it
    big = scene_photos["astronaut"]
    assert len(big) > 100_000 > len(chelsea_jpeg)
    tab = tabs(base)
    page = tab.open("/ui")
    upload(page, ("astronaut.jpg", big), ("chelsea.jpg", chelsea_jpeg))
    error = column(page, "astronaut.jpg", "embedded").locator(".error").inner_text()
    assert error == "413 payload_too_large: request body exceeds the limit of 100000 bytes"
    assert shown_predictions(page, "chelsea.jpg", "embedded")[0][0] in CAT_LABELS
    tab.check_clean(allowed=EXPECTED_HTTP_ERROR)


def test_api_key_is_asked_for_kept_only_in_the_tab_and_sent(make_api, serve_api, tabs, chelsea_jpeg):
    data = load_yaml_config()
    data["server"]["api_keys"] = ["s3cret-key"]
    data["models"]["efficientnet_lite0"]["routes"] = [{"backend": "embedded"}]
    base = serve_api(make_api(data))
    assert requests.get(f"{base}/ui", timeout=10).status_code == 200  # the page itself is open ...
    assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401  # ... the API is not
    tab = tabs(base)
    page = tab.open("/ui")
    page.wait_for_selector("#key-box:not([hidden])")
    assert "401 missing_api_key" in page.locator("#message").inner_text()
    page.fill("#api-key", "s3cret-key")
    page.check("#key-tab")
    page.click("#key-apply")
    upload(page, ("chelsea.jpg", chelsea_jpeg))
    assert shown_predictions(page, "chelsea.jpg", "embedded")[0][0] in CAT_LABELS
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("sessionStorage.getItem('gateway.apiKey')") == "s3cret-key"
    sent = [r for r in tab.api_requests if "/classify" in r["url"]]
    assert sent and all(r["headers"].get("x-api-key") == "s3cret-key" for r in sent)
    # /docs in the same tab loads the (keyed) description with the key the tab keeps
    page = tab.open("/docs")
    page.wait_for_selector("#operations-default-post_v1_models__model__classify", timeout=WAIT_MS)
    assert page.locator(".btn.authorize").count() == 1  # the spec declares the key for "Authorize"
    tab.check_clean(allowed=EXPECTED_HTTP_ERROR)
    # a fresh tab knows no key: /docs asks for one
    fresh = tabs(base)
    page = fresh.open("/docs")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "401 missing_api_key" in page.locator("#key-message").inner_text()


def try_it_out(page, operation: str, params: dict, content_type: str, files: list[dict]):
    """Drive Swagger UI: open the operation, "Try it out", fill it, "Execute"; (status, JSON body)."""
    op = page.locator(f"#operations-default-{operation}")
    if not op.locator(".try-out__btn").count():
        op.locator(".opblock-summary").first.click()
    if op.locator(".try-out__btn.cancel").count() == 0:
        op.locator(".try-out__btn").click()
    for name, value in params.items():
        field = op.locator(f"tr[data-param-name='{name}']")
        if field.locator("select").count():
            field.locator("select").select_option(value)
        else:
            field.locator("input").fill(value)
    op.locator(".opblock-section-request-body select").select_option(content_type)
    inputs = op.locator(".opblock-section-request-body input[type=file]")
    for i, file in enumerate(files):
        if i >= inputs.count():
            op.locator(".json-schema-form-item-add").click()
        inputs.nth(i).set_input_files(file)
    if op.locator("button.btn-clear").count():  # the last answer goes, so the one read is this one's
        op.locator("button.btn-clear").click()
        op.locator(".live-responses-table").wait_for(state="detached")
    with page.expect_response(lambda r: "/v1/models/" in r.url and r.request.method == "POST", timeout=WAIT_MS):
        op.locator("button.execute").click()
    op.locator(".live-responses-table .response-col_status").first.wait_for(timeout=WAIT_MS)
    status = int(op.locator(".live-responses-table .response .response-col_status").first.inner_text().strip())
    body = json.loads(op.locator(".live-responses-table .response-col_description .highlight-code").first.inner_text()
                      .removeprefix("Download").strip())
    return status, body, op


def test_docs_try_it_out_classifies_and_detects_an_upload(gateway_url, tabs, chelsea_jpeg, scene_photos):
    tab = tabs(gateway_url)
    page = tab.open("/docs")
    page.wait_for_selector("#operations-default-post_v1_models__model__classify", timeout=WAIT_MS)
    chelsea = {"name": "chelsea.jpg", "mimeType": "image/jpeg", "buffer": chelsea_jpeg}
    # the raw upload (image/jpeg, the first body type): what `curl -T` sends
    status, body, op = try_it_out(page, "post_v1_models__model__classify", {"model": "efficientnet_lite0"},
                                  "image/jpeg", [chelsea])
    assert status == 200, body
    assert body["model"] == "efficientnet_lite0" and body["results"][0]["predictions"][0]["label"] in CAT_LABELS
    # multipart/form-data, field `image` (an array of files): two files, top_k 3, sent as files
    status, body, op = try_it_out(page, "post_v1_models__model__classify", {"top_k": "3"},
                                  "multipart/form-data", [chelsea, chelsea])
    assert status == 200, body
    assert [len(r["predictions"]) for r in body["results"]] == [3, 3]
    assert all(r["predictions"][0]["label"] in CAT_LABELS for r in body["results"])
    assert "-F 'image=@chelsea.jpg;type=image/jpeg'" in op.locator(".curl-command").first.inner_text()
    page.set_viewport_size({"width": DESKTOP["width"], "height": 1400})
    op.evaluate("e => e.scrollIntoView({block: 'start'})")
    tab.shot("docs.png", full_page=False)
    page.set_viewport_size(DESKTOP)
    astronaut = {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": scene_photos["astronaut"]}
    status, body, _ = try_it_out(page, "post_v1_models__model__detect", {"model": "yolox_nano"},
                                 "image/jpeg", [astronaut])
    assert status == 200, body
    assert body["results"][0]["detections"][0]["label"] == "person"
    tab.check_clean()
    phone = tabs(gateway_url, PHONE)
    page = phone.open("/docs")
    page.wait_for_selector("#operations-default-post_v1_models__model__classify", timeout=WAIT_MS)
    phone.check_clean()
    phone.fits()
    phone.shot("docs-360.png", full_page=False)
