"""The CelebA loader: both layouts, partial folders, and every error it promises to explain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefind.db.errors import DatasetError
from facefind.retrieval.cli import app
from facefind.trainer.celeba import load_celeba, read_attributes

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "celeba-sample"
NAMES = ["5_o_Clock_Shadow", "Eyeglasses", "Male"]


def make_original(root: Path, labels: dict[str, list[int]], splits: dict[str, int] | None = None,
                  present: list[str] | None = None) -> Path:
    """Write a tiny original-layout CelebA folder with CRLF and padded columns, like the real files."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    for name in present if present is not None else labels:
        Image.new("RGB", (8, 10), (120, 80, 60)).save(images / name)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in vals) for name, vals in labels.items()]
    (root / "list_attr_celeba.txt").write_bytes(
        "\r\n".join([str(len(labels)), " ".join(NAMES) + " ", *rows, ""]).encode()
    )
    splits = splits or {name: i % 3 for i, name in enumerate(labels)}
    (root / "list_eval_partition.txt").write_bytes(
        "".join(f"{n} {s}\r\n" for n, s in splits.items()).encode()
    )
    return root


LABELS = {"000001.jpg": [-1, 1, 1], "000002.jpg": [1, -1, 1], "000003.jpg": [-1, -1, -1]}


def test_original_layout_from_root_and_from_image_folder(tmp_path: Path) -> None:
    root = make_original(tmp_path / "celeba", LABELS)
    for path in (root, root / "img_align_celeba"):
        data = load_celeba(path)
        assert data.layout == "original"
        assert data.attributes == NAMES
        assert [p.name for p in data.paths] == ["000001.jpg", "000002.jpg", "000003.jpg"]
        assert data.labels.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, [[0, 1, 1], [1, 0, 1], [0, 0, 0]])
        assert data.split_counts() == {"train": 1, "val": 1, "test": 1}
        assert data.identities is None and data.missing_images == 0


def test_partial_folder_counts_missing_images(tmp_path: Path) -> None:
    root = make_original(tmp_path, LABELS, present=["000002.jpg"])
    data = load_celeba(root)
    assert len(data) == 1 and data.missing_images == 2
    np.testing.assert_array_equal(data.labels, [[1, 0, 1]])
    np.testing.assert_array_equal(data.indices("val"), [0])


def test_kaggle_layout_nested_images_and_csv(tmp_path: Path) -> None:
    images = tmp_path / "img_align_celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    for name in LABELS:
        Image.new("RGB", (8, 10)).save(images / name)
    (tmp_path / "list_attr_celeba.csv").write_text(
        "image_id," + ",".join(NAMES) + "\n" + "".join(f"{n},{','.join(map(str, v))}\n" for n, v in LABELS.items())
    )
    (tmp_path / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(LABELS))
    )
    (tmp_path / "identity_CelebA.txt").write_text("000001.jpg 7\n000002.jpg 7\n000003.jpg 9\n")
    for path in (tmp_path, tmp_path / "img_align_celeba", images):
        data = load_celeba(path)
        assert data.layout == "kaggle" and data.image_dir == images.resolve()
        np.testing.assert_array_equal(data.labels[0], [0, 1, 1])
        np.testing.assert_array_equal(data.identities, [7, 7, 9])
        assert data.split_counts() == {"train": 2, "val": 1, "test": 0}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "list_attr_celeba.txt").unlink(), "looked for list_attr_celeba.txt or list_attr_celeba.csv"),
        (lambda r: (r / "list_eval_partition.txt").unlink(), "split file missing"),
        (lambda r: [p.unlink() for p in (r / "img_align_celeba").iterdir()], "no images"),
        (lambda r: Image.new("RGB", (4, 4)).save(r / "img_align_celeba" / "999999.jpg"), "not listed in list_attr_celeba.txt"),
        (lambda r: _append(r / "list_attr_celeba.txt", "000004.jpg 1 1\r\n"), "list_attr_celeba.txt:6: expected an image name and 3 values, got 2"),
        (lambda r: _append(r / "list_attr_celeba.txt", "000001.jpg 1 1 1\r\n"), "list_attr_celeba.txt:6: duplicate image id 000001.jpg (first on line 3)"),
        (lambda r: _append(r / "list_attr_celeba.txt", "000004.jpg 1 yes 1\r\n"), "list_attr_celeba.txt:6: expected values of -1 or 1 for 000004.jpg"),
        (lambda r: _append(r / "list_attr_celeba.txt", "000004.jpg 1 2 1\r\n"), "list_attr_celeba.txt:6: expected values of -1 or 1"),
        (lambda r: _append(r / "list_eval_partition.txt", "000004.jpg 7\r\n"), "list_eval_partition.txt:4: partition must be one of [0, 1, 2]"),
        (lambda r: (r / "list_attr_celeba.txt").write_text("three\nA B\n"), "list_attr_celeba.txt:1: expected the number of images"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, mutate, message: str) -> None:
    root = make_original(tmp_path, LABELS)
    mutate(root)
    with pytest.raises(DatasetError, match=None) as info:
        load_celeba(root)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_declared_count_must_match(tmp_path: Path) -> None:
    root = make_original(tmp_path, LABELS)
    text = (root / "list_attr_celeba.txt").read_text().replace("3", "4", 1)
    (root / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(DatasetError, match="declares 4 images but lists 3"):
        load_celeba(root)


def test_missing_folder_and_file_argument(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        load_celeba(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_celeba(tmp_path / "f.txt")


def test_read_attributes_never_uses_a_hardcoded_list(tmp_path: Path) -> None:
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text("1\nFoo 9_Bar\na.jpg 1 -1\n")
    ann = read_attributes(path)
    assert ann.attributes == ["Foo", "9_Bar"] and ann.names == ["a.jpg"]
    np.testing.assert_array_equal(ann.labels, [[1, 0]])


def test_dataset_cli_json_and_one_line_error(tmp_path: Path) -> None:
    root = make_original(tmp_path / "d", LABELS, present=["000001.jpg", "000003.jpg"])
    runner = CliRunner()
    result = runner.invoke(app, ["dataset", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "original" and report["images"] == 2 and report["missing_images"] == 1
    assert report["attributes"] == NAMES
    assert report["positive_rate"] == {"5_o_Clock_Shadow": 0.0, "Eyeglasses": 0.5, "Male": 0.5}
    assert report["splits"] == {"train": 1, "val": 0, "test": 1}

    bad = runner.invoke(app, ["dataset", str(tmp_path / "no-such-folder")])
    assert bad.exit_code == 1
    assert bad.stderr.strip().startswith("error: no such folder") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.output


@pytest.mark.celeba
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="real CelebA sample not present")
def test_real_sample() -> None:
    data = load_celeba(SAMPLE)
    assert data.layout == "original" and len(data) == 5371 and len(data.attributes) == 40
    assert data.split_counts() == {"train": 4591, "val": 780, "test": 0}
    assert data.missing_images == 202_599 - 5371
    assert data.attributes[0] == "5_o_Clock_Shadow" and data.identities is not None


def _append(path: Path, text: str) -> None:
    with path.open("a", newline="") as fh:
        fh.write(text)
