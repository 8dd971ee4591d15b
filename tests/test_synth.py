"""Tests for facefind.trainer.synth: CelebA-format synthetic faces (formats, determinism, labels, cues)."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefind.db.errors import DatasetError
from facefind.trainer import synth
from facefind.trainer.synth import ATTRIBUTES, LABEL_ONLY, RENDERED, SynthSummary, synthesize

REAL = Path(__file__).resolve().parents[2] / "shared" / "celeba-sample"
# One row of the real list_attr_celeba.txt: the first value after one space, the other 39
# right-aligned in 2 columns ("000001.jpg -1  1  1 -1 ..."), CRLF.
ROW = re.compile(rb"\d{6}\.jpg -?1(?: -1|  1){39}\r\n")
N = 40


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _second_column(path: Path) -> np.ndarray:
    """The numbers after the image names in a 'name value' CelebA text file."""
    return np.array([int(line.split()[1]) for line in path.read_text(encoding="ascii").splitlines()])


def _labels_txt(root: Path) -> np.ndarray:
    lines = (root / "list_attr_celeba.txt").read_bytes().split(b"\r\n")
    return np.array([[int(v) for v in line.split()[1:]] for line in lines[2:] if line])


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "faces"
    synthesize(out, N, seed=11)
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "big"
    synthesize(out, 400, seed=5)
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_differs(original: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "again", N, seed=11)
    synthesize(tmp_path / "other", N, seed=12)
    first, again, other = _files(original), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    jpgs = [k for k in first if k.endswith(".jpg")]
    assert sum(first[k] != other[k] for k in jpgs) == len(jpgs)
    assert first["list_attr_celeba.txt"] != other["list_attr_celeba.txt"]


def test_images_are_178x218_rgb_jpegs_numbered_from_1(original: Path) -> None:
    paths = sorted((original / "img_align_celeba").iterdir())
    assert [p.name for p in paths] == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (178, 218), "RGB")


def test_original_annotation_files_have_celeba_format(original: Path) -> None:
    attr = (original / "list_attr_celeba.txt").read_bytes()
    assert attr.count(b"\n") == attr.count(b"\r\n") == N + 2
    lines = attr.split(b"\r\n")
    assert lines[0] == str(N).encode()
    assert lines[1] == " ".join(ATTRIBUTES).encode() + b" "  # the real file has a trailing space
    rows = attr.split(b"\r\n", 2)[2]
    matched = ROW.findall(rows)
    assert len(matched) == N and b"".join(matched) == rows
    assert [r[:10] for r in matched] == [f"{i:06d}.jpg".encode() for i in range(1, N + 1)]

    partition = (original / "list_eval_partition.txt").read_bytes()
    assert re.fullmatch(rb"(?:\d{6}\.jpg [012]\r\n){%d}" % N, partition)
    identity = (original / "identity_CelebA.txt").read_bytes()
    assert re.fullmatch(rb"(?:\d{6}\.jpg [1-9]\d*\r\n){%d}" % N, identity)


@pytest.mark.celeba
@pytest.mark.skipif(not (REAL / "list_attr_celeba.txt").is_file(), reason="no ../shared/celeba-sample")
def test_row_format_is_the_real_files(original: Path) -> None:
    with open(REAL / "list_attr_celeba.txt", "rb") as f:
        head = f.read(200_000)
    real_lines = head.split(b"\r\n")
    assert real_lines[1] == (original / "list_attr_celeba.txt").read_bytes().split(b"\r\n")[1]
    real_rows = [line + b"\r\n" for line in real_lines[2:-1]]
    assert len(real_rows) > 1000 and all(ROW.fullmatch(r) for r in real_rows)
    with open(REAL / "list_eval_partition.txt", "rb") as f:
        assert f.read(26) == b"000001.jpg 0\r\n000002.jpg 0"


def test_kaggle_layout_holds_the_same_faces_in_kaggle_files(original: Path, tmp_path: Path) -> None:
    out = tmp_path / "kaggle"
    summary = synthesize(out, N, seed=11, layout="kaggle")
    assert summary.layout == "kaggle"
    nested = out / "img_align_celeba" / "img_align_celeba"
    assert sorted(p.name for p in (out / "img_align_celeba").iterdir()) == ["img_align_celeba"]
    for i in (1, N):
        name = f"{i:06d}.jpg"
        assert (nested / name).read_bytes() == (original / "img_align_celeba" / name).read_bytes()

    lines = (out / "list_attr_celeba.csv").read_text(encoding="ascii").splitlines()
    assert lines[0] == "image_id," + ",".join(ATTRIBUTES)
    values = np.array([[int(v) for v in line.split(",")[1:]] for line in lines[1:]])
    assert [line.split(",")[0] for line in lines[1:]] == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    assert set(np.unique(values)) <= {-1, 1}
    np.testing.assert_array_equal(values, _labels_txt(original))

    parts = (out / "list_eval_partition.csv").read_text(encoding="ascii").splitlines()
    assert parts[0] == "image_id,partition"
    original_parts = (original / "list_eval_partition.txt").read_text(encoding="ascii").splitlines()
    assert [line.replace(",", " ") for line in parts[1:]] == original_parts
    assert (out / "identity_CelebA.txt").read_bytes() == (original / "identity_CelebA.txt").read_bytes()
    assert not (out / "list_attr_celeba.txt").exists()


def test_splits_are_80_10_10_in_order_and_identities_stay_within_a_split(big: Path) -> None:
    splits = _second_column(big / "list_eval_partition.txt")
    assert np.bincount(splits).tolist() == [320, 40, 40]
    assert (np.diff(splits) >= 0).all()
    ids = _second_column(big / "identity_CelebA.txt")
    runs = np.split(ids, np.flatnonzero(np.diff(ids)) + 1)
    assert max(len(r) for r in runs) <= 8 and np.mean([len(r) for r in runs]) > 2
    assert len(set(ids.tolist())) == len(runs)  # each identity is one run of images
    for label in set(ids.tolist()):
        assert len(set(splits[ids == label].tolist())) == 1
    assert synth._plan(1, 0)[0].tolist() == [0]


def test_identity_photos_share_identity_level_attributes(big: Path) -> None:
    labels = _labels_txt(big) > 0
    ids = _second_column(big / "identity_CelebA.txt")
    col = {name: i for i, name in enumerate(ATTRIBUTES)}
    for label in set(ids.tolist()):
        rows = labels[ids == label]
        for name in ("Male", "Young", "Big_Nose", "Pale_Skin", "Chubby", "Goatee", "Mustache"):
            assert len(set(rows[:, col[name]].tolist())) == 1, name
    smiling = labels[:, col["Smiling"]]
    assert any(len(set(smiling[ids == label].tolist())) == 2 for label in set(ids.tolist()))


def _check_rules(a: dict[str, bool]) -> None:
    hair = [a[c] for c in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]
    assert sum(hair) <= 1
    assert a["No_Beard"] == (a["No_Beard"] and not a["Goatee"] and not a["Mustache"])
    if not a["Male"]:
        assert a["No_Beard"] and not a["Goatee"] and not a["Mustache"] and not a["Sideburns"]
    if a["Bald"]:
        assert not any(hair) and not a["Bangs"] and not a["Straight_Hair"] and not a["Wavy_Hair"]
    if a["Wearing_Hat"]:
        assert not a["Bald"] and not a["Bangs"] and not a["Receding_Hairline"]
    assert not (a["Straight_Hair"] and a["Wavy_Hair"]) and not (a["Bangs"] and a["Receding_Hairline"])


def test_written_labels_follow_the_consistency_rules(big: Path) -> None:
    rows = list(_labels_txt(big))
    assert len(rows) == len(list((big / "img_align_celeba").glob("*.jpg"))) > 0
    for row in rows:
        _check_rules(dict(zip(ATTRIBUTES, (row > 0).tolist())))


def test_sampled_rates_and_correlations_resemble_celeba() -> None:
    rng = np.random.default_rng(0)
    slots = synth._N_SLOTS
    draws = [synth._sample_attributes(rng.random(slots), rng.random(slots)) for _ in range(20_000)]
    for a in draws[:2000]:
        _check_rules(a)
    m = np.array([[a[name] for name in ATTRIBUTES] for a in draws])
    col = {name: m[:, i] for i, name in enumerate(ATTRIBUTES)}
    real = {
        "Male": 0.417,
        "Young": 0.774,
        "Smiling": 0.482,
        "Eyeglasses": 0.065,
        "No_Beard": 0.835,
        "Heavy_Makeup": 0.387,
        "Wearing_Lipstick": 0.472,
        "Blond_Hair": 0.148,
        "Wearing_Hat": 0.049,
    }
    for name, rate in real.items():
        assert abs(col[name].mean() - rate) < 0.02, name
    male, smiling, young = col["Male"], col["Smiling"], col["Young"]
    assert col["Mustache"][~male].sum() == 0 and col["Wearing_Necktie"][male].mean() > 0.12
    assert col["Heavy_Makeup"][male].mean() < 0.01 < 0.5 < col["Heavy_Makeup"][~male].mean()
    assert col["Mouth_Slightly_Open"][smiling].mean() > col["Mouth_Slightly_Open"][~smiling].mean() + 0.4
    assert col["Gray_Hair"][~young].mean() > 5 * col["Gray_Hair"][young].mean()
    assert col["Wearing_Lipstick"][col["Heavy_Makeup"]].mean() > 0.9


def _toggle_pair(name: str) -> tuple[dict[str, bool], dict[str, bool]]:
    """A plain young woman, and the same with ``name`` switched (plus what it implies)."""
    base = {attr: False for attr in ATTRIBUTES} | {"Young": True, "No_Beard": True, "_hairless": False}
    flipped = dict(base, **{name: not base[name]})
    if name in ("Goatee", "Mustache"):
        flipped["No_Beard"] = False
    if name == "Bald":
        flipped["_hairless"] = True
    return base, flipped


def _pictures(a: dict[str, bool], pose: bool = True) -> tuple[np.ndarray, bytes]:
    u = np.full(synth._N_SLOTS, 0.5)
    face = synth._make_identity(u, a, np.random.default_rng(1))
    scene = synth._scene(np.random.default_rng(2))
    if not pose:
        scene = dataclasses.replace(scene, cx=89.0, cy=118.0, scale=1.0, roll=0.0, yaw=0.0, clutter=())
    image = synth._render(a, face, scene)
    return np.asarray(image, dtype=np.int16), synth._finish(image, a["Blurry"], scene)


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_each_rendered_attribute_changes_the_picture_and_label_only_ones_do_not(name: str) -> None:
    base, flipped = _toggle_pair(name)
    (pixels0, jpeg0), (pixels1, jpeg1) = _pictures(base), _pictures(flipped)
    changed = int((np.abs(pixels1 - pixels0).max(axis=2) > 25).sum())
    if name in LABEL_ONLY:
        assert changed == 0 and jpeg0 == jpeg1
    elif name == "Blurry":  # applied when finishing: less fine detail in the decoded picture
        sharp = np.asarray(Image.open(io.BytesIO(jpeg0)).convert("L"), dtype=float)
        blurred = np.asarray(Image.open(io.BytesIO(jpeg1)).convert("L"), dtype=float)
        assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(sharp, axis=1)).mean()
    else:
        assert name in RENDERED
        assert changed >= 40, f"{name} changes only {changed} pixels"


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("Eyeglasses", (98, 124)),
        ("Wearing_Hat", (40, 105)),
        ("Smiling", (134, 160)),
        ("Wearing_Necktie", (175, 218)),
        ("Bangs", (70, 120)),
        ("Wearing_Lipstick", (136, 156)),
        ("Narrow_Eyes", (100, 120)),
    ],
)
def test_cues_are_drawn_where_they_belong(name: str, rows: tuple[int, int]) -> None:
    base, flipped = _toggle_pair(name)
    diff = np.abs(_pictures(flipped, pose=False)[0] - _pictures(base, pose=False)[0]).max(axis=2) > 25
    ys = np.flatnonzero(diff.any(axis=1))
    assert ys.size and rows[0] <= ys.min() and ys.max() <= rows[1], (ys.min(), ys.max())


def test_hair_colour_shows_in_the_written_jpegs(big: Path) -> None:
    labels = _labels_txt(big) > 0
    col = {name: i for i, name in enumerate(ATTRIBUTES)}
    no_hat = ~labels[:, col["Wearing_Hat"]]

    def crown_brightness(name: str) -> float:
        ids = np.flatnonzero(labels[:, col[name]] & no_hat)[:25] + 1
        assert len(ids) >= 10, name
        images = [Image.open(big / "img_align_celeba" / f"{i:06d}.jpg").convert("L") for i in ids]
        return float(np.mean([np.asarray(im)[60:78, 75:103] for im in images]))  # crown, above the brows

    assert crown_brightness("Blond_Hair") > crown_brightness("Black_Hair") + 60
    assert crown_brightness("Blond_Hair") > crown_brightness("Brown_Hair") + 30
    assert crown_brightness("Brown_Hair") > crown_brightness("Black_Hair") + 10


def test_progress_counts_every_image_and_summary_reports_speed(tmp_path: Path) -> None:
    calls: list[int] = []
    summary = synthesize(tmp_path / "out", 70, seed=3, progress=calls.append)
    assert sum(calls) == 70 and max(calls) <= 32
    assert isinstance(summary, SynthSummary) and summary.n == 70 and summary.out == tmp_path / "out"
    assert summary.images_per_second == pytest.approx(70 / summary.seconds)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, ">= 1"),
        ({"n": -5}, ">= 1"),
        ({"n": 2.5}, ">= 1"),
        ({"seed": -1}, "seed"),
        ({"layout": "tfds"}, "original, kaggle"),
    ],
)
def test_bad_arguments_raise_dataset_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"n": 3, "seed": 0, "layout": "original"} | kwargs
    with pytest.raises(DatasetError, match=message):
        synthesize(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_refuses_folders_holding_something_else(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        synthesize(tmp_path / "file", 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        synthesize(foreign, 3)
    assert _files(foreign) == {"notes.txt": b"mine"}

    done = tmp_path / "done"
    synthesize(done, 12, seed=1)
    before = _files(done)
    for other in ({"seed": 2}, {"n": 13}, {"layout": "kaggle"}):
        with pytest.raises(DatasetError, match="does not hold this synthetic dataset"):
            synthesize(done, **({"n": 12, "seed": 1} | other))
    assert _files(done) == before


def test_rerun_with_same_arguments_rewrites_and_completes_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "faces"
    (tmp_path / "faces").mkdir()  # an empty folder is fine
    synthesize(out, 12, seed=4)
    before = _files(out)
    (out / "img_align_celeba" / "000007.jpg").unlink()  # as after an interrupted run
    synthesize(out, 12, seed=4)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]  # nothing written beside it
