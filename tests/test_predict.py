"""``facefind.indexer.predict`` and ``facefind predict``: probabilities, present attributes, embeddings,
face boxes, the JSON schema, the gallery page, the default model and one-line errors.

A freshly initialised mobilenet_v3_small at 64 px stands in for a trained model; its BatchNorm
statistics are set from a batch of synthetic faces and its thresholds at the per-attribute
median, so different images get clearly different embeddings and about half of them show each
attribute (a raw fresh network gives every image nearly the same output).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import check_page, tiny_checkpoint  # tests/ is on sys.path (pytest's prepend import mode)
from facefind.retrieval.cli import app

N_FACES = 24


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA root (original layout)."""
    from facefind.trainer.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "celeba"
    synthesize(root, n=N_FACES, seed=11)
    return root


@pytest.fixture(scope="module")
def attributes(faces: Path) -> list[str]:
    from facefind.trainer.celeba import read_attributes

    return read_attributes(faces / "list_attr_celeba.txt").attributes


@pytest.fixture(scope="module")
def images(faces: Path) -> list[Path]:
    return sorted((faces / "img_align_celeba").glob("*.jpg"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, attributes: list[str], images: list[Path]) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", attributes, calibrate=images)


@pytest.fixture(scope="module")
def predictor(model: Path):
    from facefind.retrieval.index import open_predictor

    return open_predictor(model, "cpu")


def invoke(*args: str | Path, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


# -- the library ------------------------------------------------------------------------------


def test_predictions_follow_the_checkpoint(predictor, images: list[Path], attributes: list[str]) -> None:
    preds = predictor.predict(images[:5])
    thresholds = dict(zip(attributes, predictor.thresholds.tolist()))
    assert [p.path for p in preds] == [str(i) for i in images[:5]]
    for p in preds:
        assert list(p.probabilities) == attributes
        assert all(0.0 <= v <= 1.0 for v in p.probabilities.values())
        assert p.present == [a for a in attributes if p.probabilities[a] >= thresholds[a]]
        assert p.face_box is None  # aligned 178x218 crops go straight in
        assert p.image_size == (178, 218)
        assert p.embedding.shape == (32,) and p.embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(p.embedding)) - 1.0) < 1e-4
    # median thresholds: attributes really differ between images, and so do embeddings
    assert len({tuple(p.present) for p in preds}) > 1
    assert float(preds[0].embedding @ preds[1].embedding) < 0.99


def test_batching_and_arrays_give_the_same_answer(model: Path, predictor, images: list[Path]) -> None:
    from facefind.retrieval.index import open_predictor
    from facefind.trainer.decode import read_rgb

    whole = predictor.predict(images[:5])
    small = open_predictor(model, "cpu")
    small.batch_size = 2
    pieces = small.predict(images[:5])
    arrays = predictor.predict_images([read_rgb(p) for p in images[:5]], ["a", "b", "c", "d", "e"])
    for a, b, c in zip(whole, pieces, arrays):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-4)
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5)
        np.testing.assert_allclose(a.embedding, c.embedding, atol=1e-6)
    assert [c.path for c in arrays] == ["a", "b", "c", "d", "e"]


def test_predict_is_the_model_on_pixels_decoded_here(model: Path, predictor, images: list[Path]) -> None:
    """An independent path to predict's numbers: PIL decodes each face, torch resizes the uint8
    pixels (antialiased bilinear, as the trainer's cache does) and the checkpoint's own mean/std
    normalise them; the model called directly must give predict's probabilities and unit embedding.
    Predict and index share ``infer``, so their agreement (next test) cannot catch a mistake in it;
    this can. (Resizing in float instead moves embeddings by ~0.02: the uint8 step is part of the
    contract.)"""
    import torch
    from torch.nn import functional as F

    from facefind.trainer.checkpoint import load_model

    net, meta = load_model(model)
    faces = images[:6]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in faces])
    x = F.interpolate(x, size=tuple(meta.img_size), mode="bilinear", antialias=True, align_corners=False)
    x = (x.float() / 255 - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits, embedding = net(x)
    probs, unit = torch.sigmoid(logits).numpy(), F.normalize(embedding, dim=1).numpy()
    preds = predictor.predict(faces)
    np.testing.assert_allclose([list(p.probabilities.values()) for p in preds], probs, atol=1e-4)
    np.testing.assert_allclose([p.embedding for p in preds], unit, atol=1e-4)
    # ... and it can fail: a neighbour's row, or a wrong normalisation, is further off than that
    assert np.abs(probs - np.roll(probs, 1, axis=0)).max() > 0.05
    assert np.abs(unit - np.roll(unit, 1, axis=0)).max() > 0.05


def test_predict_and_index_give_the_same_probabilities(model: Path, tmp_path: Path) -> None:
    """`facefind predict FILE --json` and `facefind index` agree to 1e-4 on every odd file
    (EXIF-rotated, RGBA, CMYK, 16-bit, greyscale, palette): one decoder, one forward pass. Both
    call the same ``infer``, so this guards the routing (both decode these files the same way and
    neither treats them differently), not the arithmetic: the test above checks that."""
    import shutil

    from helpers import ODD, build_corpus

    build_corpus(tmp_path / "corpus")
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ODD:
        shutil.copy(tmp_path / "corpus" / name, folder / name)
    index_dir = tmp_path / "index"
    result = invoke("index", folder, "--model", model, "--index", index_dir, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.stderr
    result = invoke("query", "--json", "--limit", "100", "--index", index_dir)
    assert result.exit_code == 0, result.stderr
    indexed = {Path(h["path"]).name: h["attributes"] for h in json.loads(result.stdout)["hits"]}
    assert set(indexed) == set(ODD)
    files = [folder / name for name in ODD]
    result = invoke("predict", *files, "--model", model, "--json", "--no-detect-face", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    for item in json.loads(result.stdout):
        name = Path(item["path"]).name
        assert list(item["attributes"]) == list(indexed[name])
        np.testing.assert_allclose(list(item["attributes"].values()), list(indexed[name].values()),
                                   atol=1e-4, err_msg=name)
    assert len({tuple(round(v, 3) for v in a.values()) for a in indexed.values()}) > 1  # images differ


def test_face_detection_on_a_faceless_photo_is_a_clear_error(predictor, tmp_path: Path) -> None:
    from facefind.db.errors import ImageError

    photo = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(photo)
    with pytest.raises(ImageError, match=r"no face found in .*wall\.png.*--no-detect-face"):
        predictor.predict([photo])  # not aligned-looking: detection is automatic
    whole = predictor.predict([photo], detect_face=False)[0]
    assert whole.face_box is None and whole.image_size == (320, 240)


def test_a_faceless_photo_fails_alone_and_the_batch_goes_on(predictor, images: list[Path], tmp_path: Path) -> None:
    from facefind.indexer.predict import FailedPrediction, Prediction

    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(wall)
    predictor.batch_size = 2  # the failure sits inside a batch, and a whole batch fails
    try:
        out = predictor.predict([images[0], wall, images[1], wall, wall, images[2]], keep_going=True)
    finally:
        predictor.batch_size = 32
    assert [type(r) for r in out] == [Prediction, FailedPrediction, Prediction, FailedPrediction,
                                      FailedPrediction, Prediction]
    assert [r.path for r in out] == [str(p) for p in (images[0], wall, images[1], wall, wall, images[2])]
    assert "no face found in" in out[1].error and out[1].to_dict() == {"path": str(wall), "error": out[1].error}
    alone = predictor.predict([images[1]])[0]
    np.testing.assert_allclose(out[2].embedding, alone.embedding, atol=1e-5)  # its neighbour changed nothing


def test_prepare_uses_the_checkpoint_size(predictor) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    chw, box = predictor.prepare(rgb, "x", detect_face=False)
    assert chw.shape == (3, 64, 64) and chw.dtype == np.uint8 and box is None


# -- the command ------------------------------------------------------------------------------


def test_predict_json_schema(model: Path, images: list[Path], attributes: list[str]) -> None:
    result = invoke("predict", images[0], images[1], "--model", model, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out, list) and len(out) == 2
    for item, image in zip(out, images[:2]):
        assert set(item) == {"path", "attributes", "present", "face_box"}
        assert item["path"] == str(image)
        assert list(item["attributes"]) == attributes
        assert set(item["present"]) <= set(attributes)
        assert item["face_box"] is None


def test_predict_lists_a_faceless_photo_as_failed_and_prints_the_rest(model: Path, images: list[Path],
                                                                      tmp_path: Path) -> None:
    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(wall)
    missing = tmp_path / "gone.jpg"
    result = invoke("predict", images[0], wall, missing, images[1], "--model", model, "--json", "--device", "cpu")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert [item["path"] for item in out] == [str(images[0]), str(wall), str(missing), str(images[1])]
    assert set(out[1]) == {"path", "error"} and out[1]["error"].startswith(f"no face found in {wall}")
    assert out[2]["error"] == f"no such image: {missing}"
    assert "attributes" in out[0] and "attributes" in out[3]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "2 of 4 images failed" in result.stderr and "Traceback" not in result.stderr
    table = invoke("predict", wall, images[2], "--model", model, "--device", "cpu")
    assert table.exit_code == 1 and images[2].name in table.stdout and "present" in table.stdout
    assert f"error: no face found in {wall}" in table.stderr


def test_predict_table_and_gallery(model: Path, images: list[Path], tmp_path: Path) -> None:
    page = tmp_path / "out" / "predict.html"
    result = invoke("predict", images[2], "--model", model, "--gallery", page, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert images[2].name in result.stdout and "present" in result.stdout
    checker = check_page(page)
    assert checker.images == 1 and checker.boxes == []
    text = " ".join(checker.text)
    assert str(images[2]) in text and "Eyeglasses" in text


def test_predict_errors_are_one_line(model: Path, images: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image at all\n")
    cases = [
        (["predict", tmp_path / "missing.jpg", "--model", model], "no such image"),
        (["predict", junk, "--model", model], "cannot read image"),
        (["predict", images[0], "--model", tmp_path / "nope.pt"], "no checkpoint"),
    ]
    for args, expected in cases:
        result = invoke(*args, "--device", "cpu")
        assert result.exit_code == 1, (args, result.stdout)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_default_model_is_the_newest_checkpoint(model: Path, images: list[Path], tmp_path: Path) -> None:
    env = {"FACEFIND_HOME": str(tmp_path / "home"), "FACEFIND_INDEX": "", "FACEFIND_DB": ""}
    result = invoke("predict", images[0], "--json", "--device", "cpu", env=env)
    assert result.exit_code == 1
    assert "no model to predict with" in result.stderr and "--model" in result.stderr
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    (models / "other.state.pt").write_bytes(b"training state, not a model")
    (models / "tiny.pt").write_bytes(model.read_bytes())
    result = invoke("predict", images[0], "--json", "--device", "cpu", env=env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["path"] == str(images[0])


# -- faces in photos -------------------------------------------------------------------------


def test_predict_finds_and_aligns_a_face_in_a_photo(model: Path, images: list[Path], tmp_path: Path) -> None:
    from facefind.indexer.faces.detect import find_face

    canvas = np.full((360, 480, 3), 180, np.uint8)
    for src in images[:8]:  # dlib's HOG finds most synthetic faces
        canvas[100:318, 250:428] = np.asarray(Image.open(src).convert("RGB"))
        if find_face(canvas) is not None:
            break
    photo = tmp_path / "photo.png"
    Image.fromarray(canvas).save(photo)
    page = tmp_path / "g.html"
    result = invoke("predict", photo, "--model", model, "--json", "--gallery", page, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    x, y, w, h = json.loads(result.stdout)[0]["face_box"]
    assert 250 <= x and x + w <= 428 and 100 <= y and y + h <= 318
    assert len(check_page(page).boxes) == 1


def test_missing_face_models_are_one_line_errors(model: Path, images: list[Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from facefind.indexer.faces import align

    photo = tmp_path / "photo.png"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(photo)
    align._predictor.cache_clear()
    monkeypatch.setattr(align, "MODELS_PACKAGE", "no_such_face_models_package")
    try:
        result = invoke("predict", photo, images[0], "--model", model, "--device", "cpu")
        assert result.exit_code == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "face model shape_predictor_5_face_landmarks.dat is missing" in errors[0]
        index = invoke("index", images[0].parent, "--model", model, "--index", tmp_path / "idx", "--detect-faces")
        assert index.exit_code == 1 and "face model" in index.stderr and "Traceback" not in index.stderr
    finally:
        monkeypatch.undo()
        align._predictor.cache_clear()


def test_a_crop_sized_image_without_a_face_is_used_with_a_warning(model: Path, images: list[Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from helpers import detectable_faces

    red = tmp_path / "red.png"
    Image.new("RGB", (178, 218), (200, 0, 0)).save(red)
    face = tmp_path / "face.png"
    Image.fromarray(detectable_faces(tmp_path / "faces")[0][0]).save(face)
    caplog.set_level(logging.INFO)
    result = invoke("predict", red, face, "--model", model, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert [item["face_box"] for item in json.loads(result.stdout)] == [None, None]  # both used whole
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"no face found in {red}" in warned[0] and "--detect-face" in warned[0]
    strict = invoke("predict", red, "--model", model, "--detect-face", "--device", "cpu")
    assert strict.exit_code == 1 and f"error: no face found in {red}" in strict.stderr


def test_a_faceless_photo_is_reported_once(model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(wall)
    caplog.set_level(logging.INFO)
    result = invoke("predict", wall, "--model", model, "--device", "cpu")
    assert result.exit_code == 1
    said = [line for line in result.stderr.splitlines() if "no face found" in line]
    said += [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "no face found" in r.getMessage()]
    assert said == [f"error: no face found in {wall}: pass an aligned face crop (like CelebA's 178x218), a photo "
                    "with a clearly visible frontal face, or --no-detect-face to use the whole image"]


def test_the_table_heading_keeps_the_file_name_whole(model: Path, images: list[Path], tmp_path: Path) -> None:
    long = tmp_path / ("a_rather_long_folder_name_" * 3) / "000001.jpg"
    long.parent.mkdir()
    long.write_bytes(images[0].read_bytes())
    result = invoke("predict", long, "--model", model, "--device", "cpu", env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.stderr
    assert f"{long} (whole image): " in result.stdout


def test_the_device_line_is_kept_for_verbose(model: Path, images: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    assert invoke("predict", images[0], "--model", model, "--device", "cpu").exit_code == 0
    assert not [m for m in caplog.messages if m.startswith(("device:", "cpu threads"))]
    caplog.clear()
    assert invoke("-v", "predict", images[0], "--model", model, "--device", "cpu").exit_code == 0
    assert [m for m in caplog.messages if m.startswith("device: cpu, ")]
