"""The HTTP API in process (Flask's test client) on the embedded ONNX Runtime backend; what
only a real socket shows (the 413 drain, gunicorn workers sharing metrics) on a real gateway."""
import base64

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import load_yaml_config
from helpers import CAT, CAT_LABELS, COFFEE, assert_error, classify, png, png_claiming


def test_chelsea_is_a_cat_with_its_label(api, chelsea_jpeg):
    resp = classify(api, chelsea_jpeg)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "efficientnet_lite0" and body["backend"] == "embedded"
    assert body["weights"] == "imagenet"
    (result,) = body["results"]
    top = result["predictions"][0]
    assert top["index"] in CAT
    assert top["label"] in CAT_LABELS
    assert set(body["timings_ms"]) == {"preprocess", "inference", "postprocess", "total"}


def test_coffee_and_the_prediction_format(api, coffee_jpeg):
    body = classify(api, coffee_jpeg, model="efficientnet_lite0", top_k=7).json()
    preds = body["results"][0]["predictions"]
    assert preds[0]["index"] in COFFEE
    assert len(preds) == 7
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
    assert len({p["index"] for p in preds}) == 7


def test_curl_t_style_put_without_content_type(api, chelsea_jpeg):
    resp = api.put("/v1/classify", data=chelsea_jpeg)
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["predictions"][0]["index"] in CAT


def test_mobilenet_v2_answers_a_well_formed_top5(api, chelsea_jpeg, coffee_jpeg):
    bodies = [classify(api, img, model="mobilenet_v2").json() for img in (chelsea_jpeg, coffee_jpeg)]
    for body in bodies:
        assert body["model"] == "mobilenet_v2" and body["weights"] in {"random", "imagenet"}
        preds = body["results"][0]["predictions"]
        assert len(preds) == 5 and all(0 <= p["index"] < 1000 for p in preds)
        assert preds[0]["score"] > 0.002  # not the flat ~0.001 of un-recalibrated random weights
    # different photos, different answers
    assert [p["index"] for p in bodies[0]["results"][0]["predictions"]] != \
        [p["index"] for p in bodies[1]["results"][0]["predictions"]]


def test_several_images_keep_their_order_in_every_body_format(api, chelsea_jpeg, coffee_jpeg):
    order = [coffee_jpeg, chelsea_jpeg, coffee_jpeg]
    expected = [COFFEE, CAT, COFFEE]
    multipart = api.post("/v1/classify",
                              files=[("image", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(order)])
    as_json = api.post("/v1/classify",
                            json={"images": [base64.b64encode(img).decode() for img in order]})
    for resp in (multipart, as_json):
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert len(results) == 3
        for result, classes in zip(results, expected):
            assert result["predictions"][0]["index"] in classes


def test_single_json_image_and_data_url(api, chelsea_jpeg):
    b64 = base64.b64encode(chelsea_jpeg).decode()
    for image in (b64, "data:image/jpeg;base64," + b64):
        resp = api.post("/v1/classify", json={"image": image})
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["predictions"][0]["index"] in CAT


def test_forcing_a_backend_by_name(api, chelsea_jpeg):
    body = classify(api, chelsea_jpeg, backend="embedded").json()
    assert body["backend"] == "embedded"


def test_unusual_but_valid_images(api):
    for img in (Image.new("L", (1, 1), 7), Image.new("RGBA", (50, 30), (0, 0, 0, 0)),
                Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)):
        resp = classify(api, png(img))
        assert resp.status_code == 200, resp.text


# --- errors: every malformed request gets its status and a JSON error, and the server survives ---

def test_error_statuses_and_codes(api, chelsea_jpeg):
    url = api
    cases = [
        (classify(url, b"not an image at all"), 400, "invalid_image"),
        (classify(url, b""), 400, "invalid_image"),
        (classify(url, chelsea_jpeg[:200]), 400, "invalid_image"),
        (classify(url, chelsea_jpeg, top_k=0), 400, "invalid_parameter"),
        (classify(url, chelsea_jpeg, top_k="ten"), 400, "invalid_parameter"),
        (classify(url, chelsea_jpeg, top_k=1001), 400, "invalid_parameter"),
        (classify(url, chelsea_jpeg, colour="red"), 400, "invalid_parameter"),
        (classify(url, chelsea_jpeg, model="resnet9000"), 404, "unknown_model"),
        (classify(url, chelsea_jpeg, backend="nowhere"), 404, "unknown_backend"),
        (url.post("/v1/classify", json={"image": "***not base64***"}), 400, "invalid_base64"),
        (url.post("/v1/classify", json={"image": 42}), 400, "invalid_base64"),
        (url.post("/v1/classify", json={"images": "abc"}), 400, "invalid_json"),
        (url.post("/v1/classify", json={"picture": "abc"}), 400, "unexpected_field"),
        (url.post("/v1/classify", json=[1, 2]), 400, "invalid_json"),
        (url.post("/v1/classify", data=b"{not json",
                       headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (url.post("/v1/classify", files={"photo": ("a.jpg", chelsea_jpeg)}),
         400, "unexpected_field"),
        (url.post("/v1/classify", data="x=1", headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type"),
        (url.get("/v1/classify"), 405, None),
        (url.get("/v1/nothing-here"), 404, None),
        (url.get("/v1/models/resnet9000"), 404, "unknown_model"),
    ]
    for resp, status, code in cases:
        assert_error(resp, status, code)
    # a multi-image request names the bad image
    err = assert_error(url.post("/v1/classify", json={
        "images": [base64.b64encode(chelsea_jpeg).decode(), base64.b64encode(b"junk").decode()]}), 400)
    assert "image 1" in err["message"]
    # the server keeps answering normally
    assert classify(url, chelsea_jpeg).json()["results"][0]["predictions"][0]["index"] in CAT


def test_oversized_body_and_absurd_dimensions(make_api, chelsea_jpeg):
    config = load_yaml_config()
    config["server"]["max_body_bytes"] = 100_000
    config["server"]["max_pixels"] = 1_000_000
    config["server"]["max_images"] = 2
    url = make_api(config)
    err = assert_error(classify(url, b"\xff" * 200_000), 413, "payload_too_large")
    assert "100000" in err["message"]
    big = png(Image.new("L", (1200, 1000)))
    assert "limit" in assert_error(classify(url, big), 400, "invalid_image")["message"]
    assert_error(classify(url, png_claiming(60_000, 60_000)), 400, "invalid_image")
    small = base64.b64encode(png(Image.new("RGB", (8, 8)))).decode()
    assert_error(url.post("/v1/classify", json={"images": [small] * 3}), 400, "too_many_images")
    assert classify(url, chelsea_jpeg).status_code == 200


def test_clients_that_send_the_whole_body_first_read_the_413(start_gateway):
    """urllib writes the whole body before reading the answer: with a body larger than the
    socket buffers, a server that answers 413 and closes unread leaves it with "Broken pipe".
    The gateway drains bodies up to a few times the limit before answering."""
    import json
    import urllib.error
    import urllib.request

    config = load_yaml_config()
    config["server"]["max_body_bytes"] = 5_000_000
    url = start_gateway(config)
    for size in (6_000_000, 19_000_000):  # beyond loopback's socket buffers, within the drain bound (4x)
        req = urllib.request.Request(url + "/v1/classify", data=b"\xff" * size, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req)
        assert answer.value.code == 413
        assert json.loads(answer.value.read())["error"]["code"] == "payload_too_large"
    assert requests.get(url + "/healthz", timeout=10).ok


def test_backend_fault_answers_503_naming_the_backend(make_api, chelsea_jpeg, tmp_path):
    config = load_yaml_config()
    config["backends"]["embedded"]["model_dir"] = str(tmp_path)  # no model files there
    config["models"] = {"efficientnet_lite0": {**config["models"]["efficientnet_lite0"],
                                              "routes": [{"backend": "embedded"}]}}
    url = make_api(config)
    err = assert_error(classify(url, chelsea_jpeg), 503, "backend_unavailable")
    assert err["backend"] == "embedded" and "embedded" in err["message"]
    assert url.get("/readyz").status_code == 503
    assert url.get("/healthz").status_code == 200


# --- discovery, health, metrics ---

def test_models_listing_and_detail(api):
    listing = api.get("/v1/models").json()
    assert listing["default_model"] == "efficientnet_lite0"
    names = {m["name"] for m in listing["models"]}
    assert {"efficientnet_lite0", "mobilenet_v2"} <= names
    detail = api.get("/v1/models/efficientnet_lite0").json()
    assert detail["labels"] == 1000 and detail["weights"] == "imagenet" and detail["ready"]
    assert detail["preprocess"]["layout"] == "NCHW"
    embedded = detail["routes"][0]
    assert embedded["backend"] == "embedded" and embedded["ready"]
    assert embedded["metadata"]["inputs"][0]["shape"][1:] == [3, 224, 224]


def test_health_readiness_and_metrics(api, chelsea_jpeg):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["route"] == "embedded"
    classify(api, chelsea_jpeg)
    classify(api, b"junk")
    text = api.get("/metrics").text
    assert 'gateway_requests_total{backend="embedded",model="efficientnet_lite0",protocol="rest",status="200"}' in text
    assert "gateway_request_latency_seconds_bucket" in text
    assert 'gateway_errors_total{code="invalid_image",status="400"}' in text


def test_route_and_backend_parameters(api, chelsea_jpeg):
    assert classify(api, chelsea_jpeg, model="mobilenet_v2", route="triton-tf").status_code in (200, 503)
    assert classify(api, chelsea_jpeg, route="embedded").json()["route"] == "embedded"
    assert classify(api, chelsea_jpeg, route="embedded", backend="embedded").json()["route"] == "embedded"
    err = assert_error(classify(api, chelsea_jpeg, route="embedded", backend="triton"), 404, "unknown_backend")
    assert "route 'embedded' on backend 'triton'" in err["message"]
    assert_error(classify(api, chelsea_jpeg, route="nope"), 404, "unknown_backend")
    assert_error(classify(api, chelsea_jpeg, route=""), 400, "invalid_parameter")


def test_every_answer_is_counted_even_a_crash(make_api, chelsea_jpeg):
    """Model metrics come from the service for every outcome, a 500 included; the app counts
    every HTTP answer, those that never reach a model too."""
    from gateway.backends.base import Backend, BackendSettings

    class Crashing(Backend):
        def ready(self, route):
            return True

        def infer_batch(self, route, batch):
            raise RuntimeError("a bug, not a backend fault")

    config = load_yaml_config()
    config["models"] = {"efficientnet_lite0": {**config["models"]["efficientnet_lite0"],
                                              "routes": [{"backend": "embedded"}]}}
    api = make_api(config, backends={"embedded": Crashing("embedded", BackendSettings(kind="crashing"))})
    err = assert_error(classify(api, chelsea_jpeg), 500, "internal_error")
    assert "RuntimeError" in err["message"]
    api.get("/v1/nothing-here")
    text = api.get("/metrics").text
    assert 'gateway_requests_total{backend="none",model="efficientnet_lite0",protocol="rest",status="500"}' in text
    assert 'gateway_http_responses_total{endpoint="unmatched",method="GET",status="404"}' in text
    assert 'gateway_http_responses_total{endpoint="/v1/classify",method="POST",status="500"}' in text
