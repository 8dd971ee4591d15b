"""Every face in a photo is its own index entry (issue 15 §2), end to end through the CLI.

A folder of composed photos: a group photo of three synthetic faces (dlib's HOG finds the drawn
faces), a pair, a photo with no face, and an aligned 178x218 crop that is also one of the group's
faces. ``index --detect-faces --identity`` must make one entry per face with its box, one for the
crop, and list the faceless photo as failed; every face is then searchable (by attributes, by
look, by person), ``--paths`` prints each file once, galleries and the web page show the face
rather than the whole photo, and re-indexing a changed photo replaces all of its faces.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefind.retrieval.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from helpers import GROUP, PAIR, PhotoIndex, compose, inside, reap, regions  # noqa: E402


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok_json(*args: str | Path) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def photos(photo_index: PhotoIndex) -> dict:
    """The composed photos indexed by ``index --detect-faces --identity`` (conftest's photo_index,
    shared with the web tests; read-only: a test that changes it works on a copy)."""
    made = photo_index.photos
    return {"base": made.base, "folder": made.folder, "faces": made.faces, "model": made.model,
            "index": photo_index.index, "report": photo_index.report, "hits": photo_index.hits}


def _by_file(hits: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for h in hits:
        out.setdefault(Path(h["path"]).name, []).append(h)
    return out


def test_each_face_is_an_entry_with_its_box_and_a_faceless_photo_fails(photos: dict) -> None:
    report = photos["report"]
    assert (report["indexed"], report["faces"], report["failed"]) == (3, 6, 1)
    assert report["failures"] == [{"path": str(photos["folder"] / "empty.jpg"), "reason": "no face found"}]
    assert report["identity"] == {"described": 6, "no_face": 0}
    files = _by_file(photos["hits"])
    assert sorted(files) == ["crop.jpg", "group.jpg", "pair.png"]
    for name, layout in (("group.jpg", GROUP), ("pair.png", PAIR)):
        found = files[name]
        assert sorted(h["face"] for h in found) == list(range(len(layout)))
        for region in regions(layout):  # each pasted face is found exactly once
            assert sum(inside(h["box"], region) for h in found) == 1, (name, region, [h["box"] for h in found])
    largest = max(files["group.jpg"], key=lambda h: h["box"][2])
    assert largest["face"] == 0 and inside(largest["box"], regions(GROUP)[2])  # numbered largest first
    [crop] = files["crop.jpg"]
    assert (crop["face"], crop["box"]) == (0, None)  # an aligned crop is itself, unboxed
    assert len({h["id"] for h in photos["hits"]}) == 6


def test_paths_prints_each_file_once_in_rank_order(photos: dict) -> None:
    result = run("query", "--index", photos["index"], "--limit", "100", "--paths")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    expected = list(dict.fromkeys(h["path"] for h in photos["hits"]))
    assert lines == expected and len(lines) == 3


def test_a_face_in_a_group_photo_is_found_by_person(photos: dict) -> None:
    """The crop and the group's first face are the same picture: ranking by person from the
    crop's entry finds that face inside the group photo first, marked as the same person."""
    files = _by_file(photos["hits"])
    crop_id = files["crop.jpg"][0]["id"]
    out = ok_json("query", "--index", photos["index"], "--like-id", crop_id, "--by", "person", "--limit", "3")
    hits = out["hits"]
    assert hits[0]["id"] == crop_id
    assert Path(hits[1]["path"]).name == "group.jpg" and inside(hits[1]["box"], regions(GROUP)[0])
    assert hits[1]["same_person"] is True and hits[1]["distance"] < 0.3
    look = ok_json("query", "--index", photos["index"], "--like-id", hits[1]["id"], "--limit", "6")
    assert look["hits"][0]["id"] == hits[1]["id"] and look["hits"][0]["box"] == hits[1]["box"]


def test_gallery_and_web_thumbnails_show_the_face_not_the_photo(photos: dict, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    page = tmp_path / "g.html"
    assert run("query", "--index", photos["index"], "--limit", "100", "--gallery", page).exit_code == 0
    html = page.read_text(encoding="utf-8")
    assert html.count('class="card"') == 6 and "group.jpg [face 2]" in html
    group = _by_file(photos["hits"])["group.jpg"]
    with TestClient(create_app(photos["index"], thumbs_dir=tmp_path / "thumbs", device="cpu"),
                    base_url="http://127.0.0.1:8000") as client:
        sizes = []
        for h in group:
            got = client.get(f"/api/images/{h['id']}/thumb")
            assert got.status_code == 200
            sizes.append(Image.open(io.BytesIO(got.content)).size)
        full = Image.open(io.BytesIO(client.get(f"/api/images/{group[0]['id']}/full").content)).size
    assert full == (800, 340)
    for (w, h) in sizes:  # a face with its surroundings: about square, not the 800x340 group
        assert 0.6 < w / h < 1.4, sizes


def test_check_and_repair_keep_the_faces(photos: dict, tmp_path: Path) -> None:
    import shutil

    index = tmp_path / "index"
    shutil.copytree(photos["index"], index)
    assert run("check", "--index", index).exit_code == 0
    for gen in (index / "model-1").glob("gen-*"):
        shutil.rmtree(gen)
    broken = run("check", "--index", index)
    assert broken.exit_code == 1
    assert run("check", "--index", index, "--repair").exit_code == 0
    again = ok_json("query", "--index", index, "--limit", "100")["hits"]
    assert [(h["id"], h["face"], h["box"]) for h in again] == [(h["id"], h["face"], h["box"]) for h in photos["hits"]]
    crop_id = _by_file(again)["crop.jpg"][0]["id"]
    by_person = ok_json("query", "--index", index, "--like-id", crop_id, "--by", "person", "--limit", "2")
    assert Path(by_person["hits"][1]["path"]).name == "group.jpg"  # the descriptors survived the repair


def test_reindexing_a_changed_photo_replaces_all_of_its_faces(photos: dict, tmp_path: Path) -> None:
    import shutil

    folder, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(photos["folder"], folder)
    common = ("--model", photos["model"], "--index", index, "--workers", "0", "--detect-faces")
    ok_json("index", folder, *common)
    before = _by_file(ok_json("query", "--index", index, "--limit", "100")["hits"])["group.jpg"]
    one = [(1, 300, 60, 1.0)]  # the group photo, cropped down to one person
    Image.fromarray(compose(photos["faces"], one, (340, 800))).save(folder / "group.jpg", quality=95)
    os.utime(folder / "group.jpg", (1e9, 1e9))
    report = ok_json("index", folder, *common)
    assert (report["indexed"], report["faces"], report["unchanged"]) == (1, 1, 2)
    hits = ok_json("query", "--index", index, "--limit", "100")["hits"]
    [after] = _by_file(hits)["group.jpg"]
    assert len(hits) == 4 and inside(after["box"], regions(one)[0])
    assert after["id"] == next(h["id"] for h in before if h["face"] == 0)  # face 0 keeps its id
    gone = max(h["id"] for h in before if h["face"] == 2)
    refused = run("query", "--index", index, "--like-id", gone)
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert f"id {gone} is not in the index" in refused.stderr


def test_the_engine_lists_every_face_of_a_file(photos: dict) -> None:
    from facefind.retrieval.index import open_index

    files = _by_file(photos["hits"])
    with open_index(photos["index"]) as idx:
        for name in ("group.jpg", "pair.png", "crop.jpg"):
            expected = sorted((h["id"], h["face"], None if h["box"] is None else tuple(h["box"])) for h in files[name])
            for h in files[name]:
                assert sorted(idx.engine.same_file(h["id"])) == expected


@pytest.mark.slow
def test_kill_9_while_indexing_photos_leaves_every_face_once(photos: dict, tmp_path: Path) -> None:
    """kill -9 twice while photos of two and three faces and aligned crops are indexed with
    identities (``--detect-faces --identity``, a file per batch, decoding in a worker process),
    then a resumed run: after each kill every file has all of its faces or none, each face with
    its descriptor; at the end every face's row equals an uninterrupted run's, and each stored
    descriptor is the one ``faces_of`` computes for that face of that file (nothing shifted).

    (test_identity's kill -9 under --identity, over aligned crops, is folded in here: the crops.)"""
    import random
    import signal
    import sqlite3
    import subprocess
    import time

    from facefind.db.catalog import Catalog
    from facefind.indexer.faces.detect import faces_of
    from facefind.trainer.decode import read_rgb

    folder = tmp_path / "photos"
    folder.mkdir()
    expected = {}
    for i in range(4):
        layout, size = (GROUP, (340, 800)) if i % 2 == 0 else (PAIR, (300, 520))
        name = f"p{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(compose(photos["faces"], layout, size, background=215 + 4 * i)).save(folder / name)
        expected[str(folder / name)] = len(layout)
    for i in range(2):  # aligned crops: one whole-file entry each, described like any face
        Image.fromarray(photos["faces"][3 + i]).save(folder / f"crop{i}.jpg", quality=95)
        expected[str(folder / f"crop{i}.jpg")] = 1
    common = ("--model", photos["model"], "--workers", "0", "--detect-faces", "--identity")
    clean = ok_json("index", folder, "--index", tmp_path / "clean", *common)
    assert clean["faces"] == sum(expected.values()) == 12, clean
    assert clean["identity"] == {"described": 12, "no_face": 0}, clean

    idx = tmp_path / "index"
    args = [sys.executable, "-m", "facefind.retrieval.cli", "index", str(folder), "--index", str(idx), "--workers", "1",
            "--detect-faces", "--identity", "--batch-size", "1", "--model", str(photos["model"])]
    env = {k: v for k, v in os.environ.items() if k != "FACEFIND_DB"}

    def per_file(table: str) -> dict[str, int]:
        try:
            with sqlite3.connect(f"file:{idx / 'catalog.db'}?mode=ro", uri=True, timeout=30) as db:
                return dict(db.execute(f"SELECT path, count(*) FROM {table} JOIN faces ON faces.id = face_id "
                                       "JOIN images ON images.id = image_id GROUP BY path").fetchall())
        except sqlite3.OperationalError:  # not created yet
            return {}

    rng = random.Random(15)
    for n, target in enumerate((3, 7)):
        proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while proc.poll() is None and sum(per_file("predictions").values()) < target:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        code = reap(proc)  # the decoder process must not outlive it
        stored = per_file("predictions")
        assert all(stored[p] == expected[p] for p in stored), stored  # never part of a photo
        assert per_file("identities") == stored  # each face with its descriptor, in its transaction
        if n == 0:  # the first kill lands mid-run (a later one may find the work done)
            assert code == -signal.SIGKILL and 0 < sum(stored.values()) < 12, stored
    resumed = ok_json("index", folder, "--index", idx, *common)
    assert resumed["failed"] == 0 and per_file("predictions") == expected == per_file("identities")

    def rows(where: Path) -> dict[tuple[str, int], tuple[list[int], np.ndarray, np.ndarray]]:
        with Catalog.open(where, create=False) as cat:
            preds = cat.export(1)[1]
        assert preds.has_identity.all()
        return {(p, int(f)): (b.tolist(), pr, ident)
                for p, f, b, pr, ident in zip(preds.paths, preds.faces, preds.boxes, preds.probs, preds.identity)}

    got, want = rows(idx), rows(tmp_path / "clean")
    assert sorted(got) == sorted(want) and len(got) == 12
    for key, (box, probs, _) in want.items():
        assert got[key][0] == box
        np.testing.assert_allclose(got[key][1], probs, atol=1e-5)
    for path, count in expected.items():  # each descriptor is its own face's, computed here from the file
        entries = faces_of(read_rgb(path), identity=True)
        assert len(entries) == count, path
        for entry in entries:
            assert got[(path, entry.number)][0] == ([-1] * 4 if entry.box is None else list(entry.box))
            np.testing.assert_allclose(got[(path, entry.number)][2], entry.identity, atol=1e-5)


def test_detect_faces_over_a_folder_indexed_whole_reads_its_photos_again(photos: dict, tmp_path: Path) -> None:
    """A folder indexed without --detect-faces holds each photo as one whole-file entry; running
    --detect-faces then reads the photos again (each face its own entry) but not the aligned crop,
    and a later plain run leaves the faces alone (unchanged files)."""
    index = tmp_path / "index"
    common = ("--model", photos["model"], "--index", index, "--workers", "0")
    plain = ok_json("index", photos["folder"], *common)
    assert (plain["indexed"], plain["faces"]) == (4, 4)  # the faceless photo too: it is a picture
    again = ok_json("index", photos["folder"], *common, "--detect-faces")
    assert (again["indexed"], again["faces"], again["unchanged"], again["failed"]) == (2, 5, 1, 1)
    files = _by_file(ok_json("query", "--index", index, "--limit", "100")["hits"])
    # the faceless photo is a failure now, and its whole-file entry is gone with it
    assert {name: len(hits) for name, hits in files.items()} == {"group.jpg": 3, "pair.png": 2, "crop.jpg": 1}
    assert ok_json("index", photos["folder"], *common, "--detect-faces")["indexed"] == 0  # nothing left to redo
    later = ok_json("index", photos["folder"], *common)  # a plain run: faces stay, the faceless photo is a picture
    assert (later["indexed"], later["unchanged"]) == (1, 3)
