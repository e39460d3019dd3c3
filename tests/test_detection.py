"""Object detection without a server: settings, YOLOX decoding, NMS, the letterbox geometry
against the real preprocessing, YOLOX-Nano on real photos through onnxruntime in process,
the model build, and the drawing/printing of `gateway detect`."""
import dataclasses
import io
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from gateway.detection import (
    DetectionSpec,
    class_aware_nms,
    decode_yolox,
    detections,
    iou,
    model_to_photo,
    nms,
    photo_to_model,
)
from gateway.ops.export import yolox
from gateway.preprocess import PreprocessSpec, decode_image, preprocess_bytes, resize
from gateway.tools.detect import drawing_path, format_detections
from gateway.tools.draw import class_colour, draw_detections

from helpers import COCO_LABELS as LABELS
from helpers import HAND_BOXES, YOLOX_PREPROCESS, box, box_iou, post_detect

ROOT = Path(__file__).resolve().parent.parent



# --- settings ---

def test_detection_spec_defaults_and_dict_round_trip():
    spec = DetectionSpec()
    assert spec.to_dict() == {"decoder": "yolox", "strides": [8, 16, 32], "score_threshold": 0.3,
                              "iou_threshold": 0.45, "max_detections": 100, "class_aware": True}
    assert DetectionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("values,field", [
    ({"decoder": "ssd"}, "decoder"),
    ({"strides": []}, "strides"),
    ({"strides": [8, 0]}, "strides"),
    ({"strides": [8.5]}, "strides"),
    ({"score_threshold": 1.5}, "score_threshold"),
    ({"score_threshold": -0.1}, "score_threshold"),
    ({"score_threshold": "0.5"}, "score_threshold"),
    ({"score_threshold": float("nan")}, "score_threshold"),
    ({"iou_threshold": 2}, "iou_threshold"),
    ({"max_detections": 0}, "max_detections"),
    ({"max_detections": 1001}, "max_detections"),
    ({"max_detections": 2.0}, "max_detections"),
    ({"max_detections": True}, "max_detections"),
    ({"class_aware": "yes"}, "class_aware"),
    ({"nms": "fast"}, "nms"),
])
def test_detection_spec_errors_name_the_field(values, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        DetectionSpec.from_dict(values)


def test_query_overrides_parse_strings_and_refuse_bad_values():
    spec = DetectionSpec().with_overrides({"score_threshold": "0.5", "max_detections": "3", "iou_threshold": 0.7})
    assert (spec.score_threshold, spec.max_detections, spec.iou_threshold) == (0.5, 3, 0.7)
    for values, message in [({"score_threshold": "abc"}, "score_threshold: 'abc' is not a number"),
                            ({"score_threshold": "inf"}, "score_threshold: 'inf' is not a finite number"),
                            ({"max_detections": "2.5"}, "max_detections: '2.5' is not an integer"),
                            ({"max_detections": "-1"}, "max_detections: -1 must be"),
                            ({"iou_threshold": "1.01"}, "iou_threshold: 1.01 must be"),
                            ({"strides": "8"}, "strides: not a detection parameter")]:
        with pytest.raises(ValueError, match=f"^{message}"):
            DetectionSpec().with_overrides(values)


# --- NMS ---

def test_iou():
    assert iou(box(0, 0, 10, 10), np.array([box(0, 0, 10, 10), box(5, 0, 15, 10), box(20, 20, 30, 30)])) \
        == pytest.approx([1.0, 50 / 150, 0.0])
    assert iou(box(0, 0, 0, 0), np.array([box(0, 0, 0, 0)])).tolist() == [0.0]  # empty union: no overlap


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([box(0, 0, 10, 10), box(1, 0, 11, 10), box(50, 50, 60, 60)])
    scores = np.array([0.6, 0.9, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]  # IoU(0, 1) = 90/110 > 0.5
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]  # 0.82 <= 0.9: both kept, best first


def test_nms_suppresses_only_above_the_threshold():
    boxes = np.array([box(0, 0, 10, 10), box(5, 0, 15, 10)])  # IoU exactly 1/3
    assert nms(boxes, [0.9, 0.8], 1 / 3).tolist() == [0, 1]
    assert nms(boxes, [0.9, 0.8], 0.33).tolist() == [0]


def test_nms_empty_input():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert class_aware_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int), 0.5).tolist() == []


def test_class_aware_nms_never_suppresses_across_classes():
    boxes = np.array([box(0, 0, 10, 10), box(0, 0, 10, 10.5), box(1, 0, 10, 10), box(100, 100, 110, 110)])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    classes = np.array([0, 17, 0, 17])  # 0 and 2 overlap (same class), 1 overlaps 0 but is a dog
    assert class_aware_nms(boxes, scores, classes, 0.5).tolist() == [3, 0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [3, 0]  # class-agnostic: the dog box goes too


def test_nms_max_detections_keeps_the_best():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 1000, (50, 2))
    boxes = np.concatenate([corners, corners + 5], axis=1)  # small, far apart: nothing overlaps much
    scores = rng.uniform(0, 1, 50)
    best5 = np.argsort(-scores)[:5].tolist()
    assert nms(boxes, scores, 0.5, max_detections=5).tolist() == best5
    assert class_aware_nms(boxes, scores, np.arange(50) % 3, 0.5, max_detections=5).tolist() == best5


# --- YOLOX decoding ---

def test_decode_yolox_on_a_hand_built_tensor():
    # a 64x64 input: grids 8x8 (stride 8), 4x4 (16), 2x2 (32) = 84 anchor points, row-major
    raw = np.zeros((84, 5 + 4), dtype=np.float32)
    anchor = 64 + 1 * 4 + 2  # stride 16, row 1, column 2
    raw[anchor, :5] = [0.5, 0.25, math.log(2), math.log(3), 0.9]
    raw[anchor, 5:] = [0.1, 0.2, 0.05, 0.8]
    boxes, scores, classes = decode_yolox(raw, (64, 64), (8, 16, 32))
    # centre ((0.5 + 2) * 16, (0.25 + 1) * 16) = (40, 20); size (2 * 16, 3 * 16) = (32, 48)
    np.testing.assert_allclose(boxes[anchor], [24, -4, 56, 44], rtol=1e-6)  # float32 exp/log
    assert scores[anchor] == pytest.approx(0.72) and classes[anchor] == 3
    # an all-zero point at stride 8, row 0, column 1: centre (8, 0), size 8x8
    np.testing.assert_allclose(boxes[1], [4, -4, 12, 4])
    assert scores[1] == 0.0
    batched, _, _ = decode_yolox(np.stack([raw, raw]), (64, 64), (8, 16, 32))
    assert batched.shape == (2, 84, 4) and np.array_equal(batched[1], boxes)


def test_decode_yolox_refuses_a_wrong_number_of_anchor_points():
    with pytest.raises(ValueError, match="3549"):
        decode_yolox(np.zeros((3548, 85), dtype=np.float32), (416, 416), (8, 16, 32))


# --- letterbox geometry: model space <-> the photo's pixels ---

def coloured_bbox(pixels: np.ndarray, colour) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) edges of the pixels closer to ``colour`` than to the grey background."""
    near = np.abs(pixels.astype(np.int32) - colour).sum(axis=-1) < np.abs(pixels.astype(np.int32) - 128).sum(axis=-1)
    ys, xs = np.nonzero(near)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def jpeg(img: Image.Image, exif=None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=98, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def photo_with_rectangle(size, rect) -> Image.Image:
    img = Image.new("RGB", size, (128, 128, 128))
    img.paste((255, 0, 0), tuple(rect))
    return img


@pytest.mark.parametrize("name,size,rect", [
    ("landscape", (1280, 720), (300, 100, 900, 600)),
    ("portrait", (720, 1280), (100, 300, 600, 1000)),
    ("tiny", (12, 6), (3, 1, 9, 4)),
])
@pytest.mark.parametrize("position", ["top_left", "center"])
def test_letterbox_round_trip(name, size, rect, position):
    spec = PreprocessSpec(size=(416, 416), resize="letterbox", pad_position=position, channels="RGB")
    photo = photo_with_rectangle(size, rect)
    # algebra: photo -> model -> photo is the identity
    np.testing.assert_allclose(model_to_photo(photo_to_model(box(*rect), size, spec), size, spec), rect,
                               atol=1e-9)
    # against the real resize: where the rectangle really lands, mapped back, is where it was
    in_model = coloured_bbox(resize(photo, spec), (255, 0, 0))
    np.testing.assert_allclose(photo_to_model(box(*rect), size, spec), in_model, atol=1.0)  # resampling blur
    scale = min(416 / size[0], 416 / size[1])
    np.testing.assert_allclose(model_to_photo(box(*in_model), size, spec), rect, atol=1.0 / scale)


def test_letterbox_round_trip_of_an_exif_rotated_photo():
    stored = photo_with_rectangle((300, 200), (40, 20, 100, 60))  # as the camera wrote the pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = jpeg(stored, exif)
    photo = decode_image(data, draft_size=YOLOX_PREPROCESS.decode_size())
    assert photo.size == (200, 300)  # upright: portrait
    shown = (200 - 60, 40, 200 - 20, 100)  # the rectangle after the rotation
    assert coloured_bbox(np.asarray(photo), (255, 0, 0)) == pytest.approx(shown, abs=1)  # JPEG blur
    spec = PreprocessSpec(size=(416, 416), resize="letterbox", channels="RGB")
    in_model = coloured_bbox(resize(photo, spec), (255, 0, 0))
    np.testing.assert_allclose(model_to_photo(box(*in_model), photo.size, spec), shown, atol=1.5)  # + JPEG blur


def test_boxes_are_clipped_to_the_photo():
    spec = PreprocessSpec(size=(416, 416), resize="letterbox")
    # a 832x416 photo fills the top half of the canvas (scale 0.5): the box spills into the padding
    assert model_to_photo(box(-10, 100, 300, 300), (832, 416), spec).tolist() == [0, 200, 600, 416]


def test_stretch_maps_back_and_center_crop_is_refused():
    spec = PreprocessSpec(size=(100, 200), resize="stretch")
    assert model_to_photo(box(50, 25, 100, 50), (400, 400), spec).tolist() == [100, 100, 200, 200]
    with pytest.raises(ValueError, match="^resize: 'center_crop'"):
        model_to_photo(box(0, 0, 1, 1), (400, 400), PreprocessSpec(resize="center_crop"))


# --- detections(): raw batch -> the response's lists ---

def raw_with(points: list[tuple[int, list[float], int, float]]) -> np.ndarray:
    """A 416-input YOLOX output with the given (anchor, [cx, cy, log w, log h], class, score) points."""
    raw = np.zeros((3549, 85), dtype=np.float32)
    for anchor, geometry, cls, score in points:
        raw[anchor, :4] = geometry
        raw[anchor, 4] = 1.0
        raw[anchor, 5 + cls] = score
    return raw


def test_detections_sorted_thresholded_capped_and_in_photo_pixels():
    # stride 8 points: anchor = row * 52 + column; a 832x624 photo has scale 0.5 (fills the width)
    raw = raw_with([(10 * 52 + 10, [0.5, 0.5, 2.0, 2.0], 0, 0.9),   # person around model (84, 84)
                    (10 * 52 + 11, [0.5, 0.5, 2.0, 2.0], 0, 0.8),   # the same person again: suppressed
                    (10 * 52 + 12, [0.5, 0.5, 2.0, 2.0], 16, 0.7),  # a dog overlapping her: kept
                    (30 * 52 + 30, [0.5, 0.5, 1.0, 1.0], 2, 0.5),   # a car
                    (40 * 52 + 40, [0.5, 0.5, 1.0, 1.0], 3, 0.2)])  # below the threshold
    spec = DetectionSpec(score_threshold=0.3)
    (found,) = detections(raw[None], [(832, 624)], LABELS, YOLOX_PREPROCESS, spec)
    assert [(d["label"], d["index"]) for d in found] == [("person", 0), ("dog", 16), ("car", 2)]
    assert [d["score"] for d in found] == pytest.approx([0.9, 0.7, 0.5])
    half = math.exp(2.0) * 8 / 2
    assert found[0]["box"] == pytest.approx({"x1": (84 - half) * 2, "y1": (84 - half) * 2,
                                             "x2": (84 + half) * 2, "y2": (84 + half) * 2}, rel=1e-5)
    one = spec.with_overrides({"max_detections": "1"})
    (top1,) = detections(raw[None], [(832, 624)], LABELS, YOLOX_PREPROCESS, one)
    assert [d["label"] for d in top1] == ["person"]
    agnostic = detections(raw[None], [(832, 624)], LABELS, YOLOX_PREPROCESS, DetectionSpec(class_aware=False))
    assert [d["label"] for d in agnostic[0]] == ["person", "car"]


def test_detections_drop_boxes_wholly_in_the_padding():
    # a 832x416 photo covers model rows 0..208; a box around row 300 is padding only
    raw = raw_with([(37 * 52 + 10, [0.5, 0.5, 1.0, 1.0], 0, 0.9)])
    assert detections(raw[None], [(832, 416)], LABELS, YOLOX_PREPROCESS, DetectionSpec()) == [[]]


def test_detections_refuse_output_that_does_not_fit():
    raw = np.zeros((1, 3549, 85), dtype=np.float32)
    with pytest.raises(ValueError, match="80 classes, the model has 2 labels"):
        detections(raw, [(10, 10)], ["a", "b"], YOLOX_PREPROCESS, DetectionSpec())
    with pytest.raises(ValueError, match="N=2"):
        detections(raw, [(10, 10), (10, 10)], LABELS, YOLOX_PREPROCESS, DetectionSpec())


# --- YOLOX-Nano on real photos, onnxruntime in process ---

@pytest.fixture(scope="module")
def session():
    path = ROOT / "onnx/yolox_nano.onnx"
    if not path.is_file():
        pytest.skip("onnx/yolox_nano.onnx is not built: run `make setup` (gateway models build)")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def photo_jpegs(scene_photos):
    return scene_photos


def detect(session, jpegs: list[bytes], preprocess=YOLOX_PREPROCESS, spec=None):
    spec = spec or DetectionSpec()
    sizes = [decode_image(j).size for j in jpegs]
    batch = np.stack([preprocess_bytes(j, preprocess) for j in jpegs])
    return detections(session.run(None, {"images": batch})[0], sizes, LABELS, preprocess, spec)


def test_the_built_model_takes_any_batch_and_equals_the_vendored_original(session, photo_jpegs):
    batch = np.stack([preprocess_bytes(j, YOLOX_PREPROCESS) for j in photo_jpegs.values()])
    original = ort.InferenceSession(str(ROOT / yolox.SOURCE), providers=["CPUExecutionProvider"])
    alone = np.concatenate([original.run(None, {"images": x[None]})[0] for x in batch])
    # batch 3 vs batch 1 may take other conv kernels (oneDNN/MLAS per CPU: ~1e-6); values are
    # offsets, log-sizes and sigmoid scores of order 1..20, so 1e-4 is noise, not a change
    np.testing.assert_allclose(session.run(None, {"images": batch})[0], alone, atol=1e-4)


# Boxes measured by hand on scikit-image's photos (x1, y1, x2, y2): the astronaut from her hair
# to the bottom edge, shoulders included, helmet excluded; the cup rim to the handle's bottom;
# the cat's head and fur (it fills the frame, background on the right).



def test_yolox_nano_finds_the_astronaut_the_cup_and_the_cat(session, photo_jpegs):
    found = dict(zip(photo_jpegs, detect(session, list(photo_jpegs.values()))))
    for name, (label, hand_box) in HAND_BOXES.items():
        best = found[name][0]
        assert best["label"] == label, (name, found[name])
        assert box_iou(best["box"], hand_box) > 0.8, (name, best)
    assert found["astronaut"][0]["score"] > 0.8 and found["coffee"][0]["score"] > 0.8
    assert found["chelsea"][0]["score"] > 0.5
    assert "person" not in [d["label"] for d in found["coffee"] + found["chelsea"]]
    for name, dets in found.items():  # clipped to the photo
        w, h = decode_image(photo_jpegs[name]).size
        assert all(0 <= d["box"]["x1"] < d["box"]["x2"] <= w and 0 <= d["box"]["y1"] < d["box"]["y2"] <= h
                   for d in dets)


def test_yolox_nano_wants_bgr(session, photo_jpegs):
    """The README's channel order, checked: in RGB the cat's score halves and a dog appears."""
    rgb = dataclasses.replace(YOLOX_PREPROCESS, channels="RGB")
    low = DetectionSpec(score_threshold=0.05)
    bgr_cat = detect(session, [photo_jpegs["chelsea"]], spec=low)[0]
    rgb_cat = detect(session, [photo_jpegs["chelsea"]], rgb, low)[0]

    def cat(dets):
        return max(d["score"] for d in dets if d["label"] == "cat")

    assert cat(bgr_cat) > cat(rgb_cat) + 0.15


def test_a_portrait_and_an_exif_rotated_photo_find_her_in_their_own_pixels(session, photo_jpegs):
    """The astronaut padded into a portrait photo, and the same stored sideways with EXIF
    orientation 8: the person box lands on her in each photo's own (upright) coordinates."""
    astronaut = Image.open(io.BytesIO(photo_jpegs["astronaut"]))
    portrait = Image.new("RGB", (512, 900), (200, 200, 200))
    portrait.paste(astronaut, (0, 300))
    sideways = portrait.transpose(Image.Transpose.ROTATE_270)  # stored rotated: 900x512
    exif = Image.Exif()
    exif[0x0112] = 8  # display: rotate 90 degrees counter-clockwise, i.e. upright again
    plain, rotated = detect(session, [jpeg(portrait), jpeg(sideways, exif)])
    expected = (18, 318, 365, 812)  # the hand box, 300 px lower
    for found in (plain, rotated):
        assert found[0]["label"] == "person" and found[0]["score"] > 0.8
        assert box_iou(found[0]["box"], expected) > 0.8, found[0]
    assert box_iou(plain[0]["box"], [rotated[0]["box"][k] for k in ("x1", "y1", "x2", "y2")]) > 0.95


# --- the model build (gateway/ops/export/yolox.py) ---

def test_free_batch_rewrites_exactly_the_three_head_reshapes():
    import onnx
    from onnx import numpy_helper

    model = yolox.free_batch(onnx.load(str(ROOT / yolox.SOURCE)))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    reshapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    shapes = [numpy_helper.to_array(i).tolist() for i in model.graph.initializer if i.name in reshapes]
    assert shapes == [[0, 85, -1]] * 3


def test_build_checks_the_sha256_and_places_the_model_for_each_backend(tmp_path):
    from gateway.ops.export.table import ENTRIES, Context

    (tmp_path / yolox.SOURCE).parent.mkdir(parents=True)
    shutil.copy(ROOT / yolox.SOURCE, tmp_path / yolox.SOURCE)
    entry, context = ENTRIES["yolox_nano"], Context(tmp_path, "imagenet", lambda *_: None)
    entry.builder(context, entry)
    onnx_file, triton_file = (tmp_path / t for t in entry.exported)
    assert entry.exported == ["onnx/yolox_nano.onnx", "model_repository/yolox_nano/1/model.onnx"]
    assert onnx_file.read_bytes() == triton_file.read_bytes()
    assert entry.recorded["weights"] == "coco" and entry.files == entry.exported
    tampered = bytearray((tmp_path / yolox.SOURCE).read_bytes())
    tampered[-1] ^= 1
    (tmp_path / yolox.SOURCE).write_bytes(bytes(tampered))
    with pytest.raises(RuntimeError, match="sha256"):
        entry.builder(context, entry)


# --- `gateway detect`: drawing and printing ---

SAMPLE = [{"label": "person", "index": 0, "score": 0.9251, "box": {"x1": 20, "y1": 40, "x2": 120, "y2": 180}},
          {"label": "dog", "index": 16, "score": 0.5, "box": {"x1": 130, "y1": 0, "x2": 190, "y2": 90}}]


def test_class_colours_are_distinct():
    colours = [class_colour(i) for i in range(80)]
    assert len(set(colours)) == 80
    close = [(i, j) for i in range(10) for j in range(i + 1, 10)
             if sum(abs(a - b) for a, b in zip(colours[i], colours[j])) < 60]
    assert not close  # the first classes (the common ones) are far apart


def test_draw_detections_draws_boxes_and_labels_in_class_colours():
    photo = Image.new("RGB", (200, 200), (128, 128, 128))
    drawn = np.asarray(draw_detections(photo, SAMPLE))
    assert np.asarray(photo).max() == 128  # the input is not modified
    person, dog = class_colour(0), class_colour(16)
    assert tuple(drawn[100, 20]) == person and tuple(drawn[180, 70]) == person  # left and bottom edges
    assert tuple(drawn[60, 190]) == dog
    # the person's label sits above the box; the dog box touches the top, so its label is inside
    assert (np.abs(drawn[20:39, 20:60].astype(int) - person).sum(axis=-1) == 0).mean() > 0.3
    assert (np.abs(drawn[1:15, 131:189].astype(int) - dog).sum(axis=-1) == 0).mean() > 0.3
    label_text = drawn[20:39, 20:120]
    assert len({tuple(p) for p in label_text.reshape(-1, 3)}) > 2  # text on the label, not a blank bar
    assert tuple(drawn[150, 150]) == (128, 128, 128)  # elsewhere the photo is untouched


def test_format_detections_prints_one_line_per_box():
    text = format_detections("astronaut.png", SAMPLE)
    assert text.splitlines() == [
        "Image 'astronaut.png': 2 detections",
        "    0.9251 (0) = person  x1=20.0 y1=40.0 x2=120.0 y2=180.0",
        "    0.5000 (16) = dog  x1=130.0 y1=0.0 x2=190.0 y2=90.0",
    ]
    assert format_detections("empty.png", []) == "Image 'empty.png': 0 detections"


def test_drawing_path():
    assert drawing_path("out.png", "photos/a.jpg", several=False) == Path("out.png")
    assert drawing_path("out/boxes.png", "photos/a.jpg", several=True) == Path("out/boxes_a.png")


# --- through the gateway: POST /v1/models/yolox_nano/detect ---

def test_detect_endpoint_finds_the_astronaut_in_her_photos_pixels(api, photo_jpegs):
    resp = post_detect(api, photo_jpegs["astronaut"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["backend"]) == ("yolox_nano", "embedded")
    assert set(body["timings_ms"]) == {"preprocess", "inference", "postprocess", "total"}
    best = body["results"][0]["detections"][0]
    assert best["label"] == "person" and best["index"] == 0 and best["score"] > 0.8
    assert box_iou(best["box"], HAND_BOXES["astronaut"][1]) > 0.8


def test_boxes_stay_in_the_photos_own_pixels_when_jpeg_decoding_is_drafted(api):
    """A 2048x2048 JPEG is decoded at 1/4 scale (draft mode, >= 416 px): the boxes must still be
    in the 2048 px photo's coordinates, i.e. 4x those of the 512 px original."""
    from skimage import data

    small = Image.fromarray(data.astronaut())
    big = jpeg(small.resize((2048, 2048), Image.BICUBIC), None)
    assert decode_image(big, draft_size=(416, 416)).size == (512, 512)  # drafted indeed
    at_512 = post_detect(api, jpeg(small, None)).json()["results"][0]["detections"][0]["box"]
    at_2048 = post_detect(api, big).json()["results"][0]["detections"][0]["box"]
    assert box_iou({k: v / 4 for k, v in at_2048.items()}, tuple(at_512[k] for k in ("x1", "y1", "x2", "y2"))) > 0.95
    assert max(at_2048.values()) > 1500 and max(at_2048.values()) <= 2048


def test_exif_rotated_photo_gets_boxes_in_its_upright_pixels(api):
    """The astronaut stored sideways with EXIF orientation 8: boxes refer to the upright photo."""
    from skimage import data

    upright = Image.fromarray(data.astronaut())
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees clockwise to view: stored rotated counter-clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    resp = post_detect(api, jpeg(stored, exif))
    best = resp.json()["results"][0]["detections"][0]
    assert best["label"] == "person" and box_iou(best["box"], HAND_BOXES["astronaut"][1]) > 0.8


def test_several_images_and_every_body_form(api, photo_jpegs):
    import base64

    order = ["coffee", "astronaut", "chelsea"]
    multipart = api.post("/v1/models/yolox_nano/detect",
                         files=[("image", (f"{n}.jpg", photo_jpegs[n], "image/jpeg")) for n in order])
    as_json = api.post("/v1/models/yolox_nano/detect",
                       json={"images": [base64.b64encode(photo_jpegs[n]).decode() for n in order]})
    for resp in (multipart, as_json):
        assert resp.status_code == 200, resp.text
        tops = [r["detections"][0]["label"] for r in resp.json()["results"]]
        assert tops == ["cup", "person", "cat"]


def test_detection_parameters_and_wrong_tasks_are_clear_errors(api, photo_jpegs):
    from helpers import assert_error

    data = photo_jpegs["coffee"]
    one = post_detect(api, data, max_detections=1).json()["results"][0]["detections"]
    assert len(one) == 1 and one[0]["label"] == "cup"
    strict = post_detect(api, data, score_threshold=0.85).json()["results"][0]["detections"]
    assert [d["label"] for d in strict] == ["cup"]
    for params in ({"score_threshold": "high"}, {"score_threshold": "2"}, {"iou_threshold": "-0.1"},
                   {"max_detections": "0"}, {"max_detections": "1.5"}, {"score_threshold": "nan"},
                   {"top_k": "3"}):
        assert_error(post_detect(api, data, **params), 400, "invalid_parameter")
    assert_error(post_detect(api, b"not an image"), 400, "invalid_image")
    assert_error(api.post("/v1/models/yolox_nano/classify", data=data), 400, "wrong_task")
    assert_error(post_detect(api, data, model="efficientnet_lite0"), 400, "wrong_task")
    assert_error(post_detect(api, data, model="nope"), 404, "unknown_model")


def test_models_listing_and_openapi_describe_the_detector(api):
    detail = api.get("/v1/models/yolox_nano").json()
    assert detail["task"] == "detection" and detail["labels"] == 80 and detail["labels_source"] == "coco"
    assert detail["postprocess"]["iou_threshold"] == 0.45 and detail["preprocess"]["resize"] == "letterbox"
    spec = api.get("/openapi.json").json()
    detect = spec["paths"]["/v1/models/{model}/detect"]["post"]
    assert detect["parameters"][0]["schema"]["enum"] == ["yolox_nano"]
    classify = spec["paths"]["/v1/models/{model}/classify"]["post"]
    assert "yolox_nano" not in classify["parameters"][0]["schema"]["enum"]
