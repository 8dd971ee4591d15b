"""`facefind serve`'s JSON API, through FastAPI's TestClient, against a small real index.

The index is built by the indexer from synthetic faces with a fresh mobilenet_v3_small (see
helpers.tiny_checkpoint) whose checkpoint also carries a training history and validation metrics.
Checked: /api/query equals `facefind query --json` (with --eval's block) and a brute-force count;
paging; "more like this"; attributes, image details, thumbnails made once and cached, files only by
catalog id; bad expressions, uploads (indexed face first, broken images with predict's reason,
413, bombs, nothing kept); tokens and Host checks; a new snapshot picked up without a restart;
exports; that no endpoint changes the index and no response carries a traceback. By person
(``by=person``, on a second small index built with ``--identity``): the same face in another photo
ranks right after the face itself, as ``--by person --json`` ranks it, by id, upload and export, and
every refusal (no descriptors, a faceless id or photo, a bad ``by``) is one line. The faces of a
photo (a third index of composed group photos, ``index --detect-faces --identity``): hits carry the
CLI's id/path/face/box, and an entry names every face of its file, which serves the whole file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

# tests/ is on sys.path (prepend import mode)
from helpers import GROUP, HISTORY, PAIR, Built, People, PhotoIndex, inside, png_header_only, regions, serving
from facefind.retrieval.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
N_FACES = 40  # helpers.build_index's default (the web_index fixture)


@pytest.fixture(scope="module")
def built(web_index: Built) -> Built:
    return web_index


@pytest.fixture(scope="module")
def client(built: Built, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(built.index, tmp_path_factory.mktemp("thumbs"))


@pytest.fixture(scope="module")
def people(people_index: People) -> People:
    return people_index


@pytest.fixture(scope="module")
def people_client(people: People, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(people.index, tmp_path_factory.mktemp("people-thumbs"))


@pytest.fixture(scope="module")
def photo_client(photo_index: PhotoIndex, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(photo_index.index, tmp_path_factory.mktemp("photo-thumbs"))


def cli_json(*args: str | Path) -> dict:
    result = CliRunner().invoke(cli_app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def one_line_error(response, status: int, expected: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert expected in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text
    return body


def _truth(b: Built, path: str, expr: str) -> bool:
    """The test expressions, evaluated by hand on the stored probabilities."""
    p, t = b.probs[path], b.thresholds
    on = {a: p[a] >= t[a] for a in b.attributes}
    return {"Eyeglasses or not Male": on["Eyeglasses"] or not on["Male"],
            "Smiling and not Young": on["Smiling"] and not on["Young"],
            "Male": on["Male"]}[expr]


# -- query ------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    {"q": "Eyeglasses or not Male", "limit": 7, "offset": 2},
    {"q": "Smiling and not Young", "limit": 1000},
    {"limit": 5, "offset": 3},
    {"q": "Male", "like_id": 3, "limit": 6},
])
def test_query_is_the_cli_json(client, built: Built, params: dict) -> None:
    got = ok(client.get("/api/query", params=params))
    args = ["query"] + ([params["q"]] if "q" in params else [])
    for key in ("limit", "offset", "like_id"):
        if key in params:
            args += [f"--{key.replace('_', '-')}", str(params[key])]
    args += ["--index", str(built.index)] + (["--eval"] if "q" in params else [])
    assert got == cli_json(*args)
    if "q" in params:
        assert set(got["quality"]) >= {"precision_at_k", "recall", "base_rate"}


def test_threshold_sets_are_those_of_the_cli(client, built: Built) -> None:
    """`?thresholds=` is `query --thresholds`: the two sets give different answers, each the CLI's."""
    answers = {}
    for name in ("accuracy", "f1"):
        got = ok(client.get("/api/query", params={"q": "Male", "thresholds": name, "limit": 100}))
        assert got == cli_json("query", "Male", "--thresholds", name, "--index", built.index,
                               "--limit", "100", "--eval")
        assert got["thresholds"] == name
        answers[name] = got["total"]
        image = ok(client.get(f"/api/images/{got['hits'][0]['id']}", params={"q": "Male", "thresholds": name}))
        assert image["threshold_set"] == name and image["matched"] == ["Male"]
    assert answers["f1"] > answers["accuracy"]
    sets = ok(client.get("/api/attributes"))
    assert set(sets["threshold_sets"]) == {"accuracy", "f1"}
    assert all(a["thresholds"]["f1"] < a["thresholds"]["accuracy"] for a in sets["attributes"])
    one_line_error(client.get("/api/query", params={"q": "Male", "thresholds": "recall"}), 400,
                   "bad thresholds: Input should be 'accuracy' or 'f1'")


def test_query_counts_and_pages_agree_with_brute_force(client, built: Built) -> None:
    expr = "Eyeglasses or not Male"
    everything = ok(client.get("/api/query", params={"q": expr, "limit": 1000}))
    expected = {p for p in built.probs if _truth(built, p, expr)}
    assert 0 < len(expected) < N_FACES, "the expression should split the faces"
    assert everything["total"] == len(expected) and {h["path"] for h in everything["hits"]} == expected
    pages = []
    for offset in range(0, everything["total"], 4):
        page = ok(client.get("/api/query", params={"q": expr, "limit": 4, "offset": offset, "eval": "false"}))
        assert "quality" not in page and page["offset"] == offset
        pages += page["hits"]
    assert [h["id"] for h in pages] == [h["id"] for h in everything["hits"]]
    assert "engine;dur=" in client.get("/api/query", params={"q": expr}).headers["server-timing"]


def test_more_like_this_ranks_the_face_first_and_keeps_the_filter(client, built: Built) -> None:
    expr = "Eyeglasses or not Male"
    matching = [p for p in built.probs if _truth(built, p, expr)]
    target = built.ids[matching[len(matching) // 2]]
    out = ok(client.get("/api/query", params={"q": expr, "like_id": target, "limit": 100}))
    assert out["ranking"] == "similarity" and out["hits"][0]["id"] == target
    assert out["hits"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert {h["path"] for h in out["hits"]} == set(matching)
    one_line_error(client.get("/api/query", params={"like_id": 99999}), 404, "no image with id 99999")


@pytest.mark.parametrize("expr, position, words", [
    ("Eyeglases and Male", 0, "did you mean Eyeglasses"),
    ("Male and", 8, "expected"),
    ("Smiling > 2", 10, "not a probability"),
    ("Male and (Young", 15, ")"),
])
def test_a_bad_expression_is_400_with_its_position(client, expr: str, position: int, words: str) -> None:
    body = one_line_error(client.get("/api/query", params={"q": expr}), 400, words)
    assert body["position"] == position and body["expression"] == expr


def test_bad_parameters_are_one_line_400s(client) -> None:
    for params in ({"limit": -1}, {"limit": 10**6}, {"offset": "x"}, {"like": "%%%"}, {"like": "AAAA"},
                   {"like": "AAAA", "like_id": 1}, {"like_id": 10**30}, {"like_id": -3}):
        body = client.get("/api/query", params=params)
        assert body.status_code == 400 and set(body.json()) >= {"error"}, (params, body.text)


# -- by person ----------------------------------------------------------------------------------


def test_by_person_ranks_the_same_face_in_another_photo_next(people_client, people: People) -> None:
    original, other = people.ids[str(people.original)], people.ids[str(people.other)]
    info = ok(people_client.get("/api/info"))
    assert info["has_identity"] and info["identities"] == len(people.ids) - 1  # all but the faceless one
    assert ok(people_client.get("/api/attributes"))["has_identity"] is True
    out = ok(people_client.get("/api/query", params={"like_id": original, "by": "person", "limit": 100}))
    assert out == cli_json("query", "--like-id", original, "--by", "person", "--limit", "100",
                           "--index", people.index)
    hits = out["hits"]
    assert out["ranking"] == "person" and out["total"] == info["identities"]
    assert [h["id"] for h in hits[:2]] == [original, other]  # the other photo above every other face
    assert hits[0]["distance"] == 0.0 and hits[1]["distance"] < 0.3
    assert hits[0]["same_person"] is True and hits[1]["same_person"] is True
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert all(h["same_person"] == (h["distance"] < 0.6) for h in hits) and not all(h["same_person"] for h in hits)
    look = ok(people_client.get("/api/query", params={"like_id": original, "limit": 100}))
    assert look["ranking"] == "similarity" and "distance" not in look["hits"][0]
    # the export streams the same ranking
    paths = people_client.get("/api/export", params={"like_id": original, "by": "person", "format": "paths"})
    assert paths.text.splitlines() == [h["path"] for h in hits]


def test_an_upload_by_person_is_similar_by_person_and_pages_by_its_descriptor(people_client, people: People,
                                                                              tmp_path: Path) -> None:
    upload = tmp_path / "me.jpg"
    shutil.copy(people.original, upload)
    out = ok(people_client.post("/api/similar", files={"file": ("me.jpg", upload.read_bytes(), "image/jpeg")},
                                data={"by": "person", "limit": "4"}))
    reference = out.pop("reference")
    assert out == cli_json("similar", upload, "--by", "person", "--limit", "4", "--index", people.index)
    assert [h["path"] for h in out["hits"][:2]] == [str(people.original), str(people.other)]
    assert reference["name"] == "me.jpg" and reference["by"] == "person" and "face_box" not in reference
    # the kept descriptor pages the same search (the same distances) through /api/query
    rest = ok(people_client.get("/api/query", params={"like": reference["id"], "by": "person",
                                                      "offset": 1, "limit": 3}))
    assert rest["hits"] == out["hits"][1:]
    # a filter is kept
    thresholds = {a["name"]: a["threshold"] for a in ok(people_client.get("/api/attributes"))["attributes"]}
    where = "not Male" if out["hits"][0]["attributes"]["Male"] >= thresholds["Male"] else "Male"
    filtered = ok(people_client.post("/api/similar", files={"file": ("me.jpg", upload.read_bytes())},
                                     data={"by": "person", "q": where}))
    assert filtered["ranking"] == "person" and filtered["hits"]
    assert all(h["matched"] == [where] and h["path"] != str(people.original) for h in filtered["hits"])


def test_by_person_refusals_are_one_line(client, people_client, people: People, built: Built) -> None:
    from facefind.retrieval.engine import NO_IDENTITY

    face = built.images[0].read_bytes()
    # an index built without --identity says what to run, before any photo is read
    assert ok(client.get("/api/info"))["has_identity"] is False
    assert ok(client.get("/api/attributes"))["has_identity"] is False
    # (409: the request is well formed, the index is not built for it; the document says so)
    body = one_line_error(client.get("/api/query", params={"like_id": 1, "by": "person"}), 409, NO_IDENTITY)
    assert body["error"] == NO_IDENTITY
    one_line_error(client.post("/api/similar", files={"file": ("a.jpg", face)}, data={"by": "person"}),
                   409, NO_IDENTITY)
    one_line_error(client.get("/api/export", params={"like_id": 1, "by": "person"}), 409, NO_IDENTITY)
    # a bad by, anywhere: the schema's enum, exactly
    for got in (people_client.get("/api/query", params={"like_id": 1, "by": "face"}),
                people_client.post("/api/similar", files={"file": ("a.jpg", face)}, data={"by": "face"}),
                people_client.get("/api/export", params={"like_id": 1, "by": "PERSON"})):
        one_line_error(got, 400, "bad by: Input should be 'look' or 'person'")
    # no reference at all is a mistake, not a silent confidence ranking
    original = people.ids[str(people.original)]
    assert ok(people_client.get("/api/query", params={"like_id": original, "by": "person"}))["ranking"] == "person"
    one_line_error(people_client.get("/api/query", params={"q": "Male", "by": "person"}), 409, "give like_id")
    # a face without a descriptor, an unknown id, a descriptor of the wrong size, a photo without a face
    faceless = people.ids[str(people.faceless)]
    one_line_error(people_client.get("/api/query", params={"like_id": faceless, "by": "person"}), 409,
                   f"image {faceless} has no identity descriptor")
    one_line_error(people_client.get("/api/query", params={"like_id": 99999, "by": "person"}), 404,
                   "no image with id 99999")
    look = ok(people_client.post("/api/similar", files={"file": ("a.jpg", face)}))["reference"]["id"]
    one_line_error(people_client.get("/api/query", params={"like": look, "by": "person"}), 409,
                   "like= names a photo searched by look: search by the photo again with by=person")
    blank = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (300, 300), (200, 200, 200)).save(blank, format="PNG")
    one_line_error(people_client.post("/api/similar", files={"file": ("wall.png", blank.getvalue())},
                                      data={"by": "person"}), 400, "no face found in wall.png")
    one_line_error(people_client.post("/api/similar", files={"file": ("notes.jpg", b"not a picture" * 9)},
                                      data={"by": "person"}), 400, "cannot read image notes.jpg")


# -- attributes, images, files ------------------------------------------------------------------


def test_attributes_have_thresholds_and_rates(client, built: Built) -> None:
    out = ok(client.get("/api/attributes"))
    assert [a["name"] for a in out["attributes"]] == built.attributes and out["has_labels"]
    for a in out["attributes"]:
        name = a["name"]
        assert a["threshold"] == pytest.approx(built.thresholds[name])
        assert a["positive_rate"] == pytest.approx(
            np.mean([p[name] >= np.float32(built.thresholds[name]) for p in built.probs.values()]))
        assert a["label_rate"] == pytest.approx(np.mean([lab[name] for lab in built.labels.values()]))


def test_image_details(client, built: Built) -> None:
    path = str(built.images[4])
    image_id = built.ids[path]
    out = ok(client.get(f"/api/images/{image_id}", params={"q": "Male or not Male"}))
    assert out["path"] == path and out["attributes"] == pytest.approx(built.probs[path], abs=0)
    assert out["labels"] == built.labels[path]
    male = built.probs[path]["Male"] >= built.thresholds["Male"]
    assert out["matched"] == (["Male"] if male else ["not Male"])
    assert set(out["present"]) == {a for a in built.attributes if built.probs[path][a] >= built.thresholds[a]}
    assert (out["face"], out["box"]) == (0, None)
    assert out["faces"] == [{"id": image_id, "face": 0, "box": None}]  # a whole-file entry: only itself


def test_thumbnails_are_made_once_and_cached(client, built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from facefind.retrieval.web import thumbs

    made = []
    real = thumbs.make_thumbnail
    monkeypatch.setattr(thumbs, "make_thumbnail", lambda *a: made.append(a) or real(*a))
    # made ahead: the first view's thumbnails are in the cache before anyone asks (thumbs.Warmer)
    client.app.state.warmer.thread.join(120)
    first_view = ok(client.get("/api/query", params={"limit": 60}))["hits"]
    assert len(first_view) == min(60, N_FACES)
    for hit in first_view:
        assert client.get(f"/api/images/{hit['id']}/thumb").status_code == 200
    assert made == []
    # one the cache lacks is made on the first request, once
    image_id = built.ids[str(built.images[7])]
    cache = client.app.state.thumbs
    key = cache.key(str(built.images[7]), os.stat(built.images[7]))
    (cache.folder / key[:2] / f"{key}.jpg").unlink()
    first = client.get(f"/api/images/{image_id}/thumb")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert "max-age" in first.headers["cache-control"] and first.headers["etag"]
    with Image.open(io.BytesIO(first.content)) as img:
        assert max(img.size) == thumbs.THUMB_SIZE and img.format == "JPEG"
    second = client.get(f"/api/images/{image_id}/thumb")
    assert second.content == first.content and len(made) == 1
    again = client.get(f"/api/images/{image_id}/thumb", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content and len(made) == 1
    cached = list(client.app.state.thumbs.folder.rglob("*.jpg"))
    assert any(p.read_bytes() == first.content for p in cached)


def test_a_changed_file_gets_a_new_thumbnail(client, built: Built, tmp_path: Path) -> None:
    from facefind.retrieval.web.thumbs import ThumbnailCache

    src = tmp_path / "face.jpg"
    shutil.copy(built.images[0], src)
    cache = ThumbnailCache(tmp_path / "thumbs")
    before = cache.get(str(src))
    assert cache.get(str(src)).etag == before.etag
    shutil.copy(built.images[1], src)
    os.utime(src, ns=(1, 1))
    assert cache.get(str(src)).etag != before.etag


def test_full_image_is_the_catalogued_file(client, built: Built) -> None:
    path = built.images[2]
    got = client.get(f"/api/images/{built.ids[str(path)]}/full")
    assert got.status_code == 200 and got.content == path.read_bytes()
    assert got.headers["content-type"] == "image/jpeg" and got.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("url", [
    "/api/images/../../etc/passwd/full",
    "/api/images/..%2f..%2f..%2fetc%2fpasswd/full",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumb",
    "/api/images/%2Fetc%2Fpasswd/full",
    "/api/images//etc/passwd/full",
    "/api/images/1%2f..%2f..%2fetc%2fpasswd/full",
    "/api/images/99999/full",
    "/api/images/-1/thumb",
    "/api/images/0x1/full",
    "/api/images/1.0/full",
    "/api/images/%EF%BC%91/full",  # a full-width digit one
    "/api/images/99999",
    "/static/../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
])
def test_files_only_by_catalog_id(client, url: str) -> None:
    got = client.get(url)
    assert got.status_code == 404, (url, got.status_code, got.text[:200])
    assert b"root:" not in got.content and got.json()["error"]


def test_a_catalogued_file_that_is_gone_is_404(built: Built, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    index = tmp_path / "index"
    shutil.copytree(built.index, index)
    moved = tmp_path / "gone.jpg"
    os.replace(built.images[5], moved)
    try:
        with TestClient(create_app(index), base_url="http://127.0.0.1") as c:
            image_id = built.ids[str(built.images[5])]
            one_line_error(c.get(f"/api/images/{image_id}/full"), 404, "file is gone")
            one_line_error(c.get(f"/api/images/{image_id}/thumb"), 404, "file is gone")
    finally:
        os.replace(moved, built.images[5])


# -- the faces of a photo ----------------------------------------------------------------------


def test_query_hits_of_faces_are_the_cli_json(photo_client, photo_index: PhotoIndex) -> None:
    got = ok(photo_client.get("/api/query", params={"limit": 100}))
    assert got["hits"] == photo_index.hits
    assert {h["face"] for h in got["hits"]} == {0, 1, 2} and sum(h["box"] is None for h in got["hits"]) == 1


def test_an_entry_lists_every_face_of_its_file(photo_client, photo_index: PhotoIndex) -> None:
    """Each face of the group photo (and of the pair) names all the faces of its file, by face
    number, with the boxes its hits carry; each box lies on one pasted face."""
    for name, layout in (("group.jpg", GROUP), ("pair.png", PAIR)):
        entries = photo_index.of(name)
        faces = [{"id": h["id"], "face": h["face"], "box": h["box"]} for h in entries]
        assert [f["face"] for f in faces] == list(range(len(layout)))
        for region in regions(layout):
            assert sum(inside(f["box"], region) for f in faces) == 1, (name, region, faces)
        for h in entries:
            out = ok(photo_client.get(f"/api/images/{h['id']}"))
            assert (out["id"], out["path"], out["face"], out["box"]) == (h["id"], h["path"], h["face"], h["box"])
            assert out["faces"] == faces
    [crop] = photo_index.of("crop.jpg")
    out = ok(photo_client.get(f"/api/images/{crop['id']}"))
    assert out["box"] is None and out["faces"] == [{"id": crop["id"], "face": 0, "box": None}]
    one_line_error(photo_client.get("/api/images/424242"), 404, "no image with id 424242")


def test_every_face_of_a_photo_serves_the_whole_file(photo_client, photo_index: PhotoIndex) -> None:
    group = photo_index.of("group.jpg")
    files = {photo_client.get(f"/api/images/{h['id']}/full").content for h in group}
    assert files == {(photo_index.photos.folder / "group.jpg").read_bytes()}


# -- uploads -----------------------------------------------------------------------------------


def test_an_uploaded_indexed_face_comes_back_first(client, built: Built) -> None:
    path = built.images[11]
    out = ok(client.post("/api/similar", files={"file": ("me.jpg", path.read_bytes(), "image/jpeg")},
                         data={"limit": "5"}))
    assert out["ranking"] == "similarity" and out["hits"][0]["path"] == str(path)
    assert out["hits"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    reference = out["reference"]
    assert reference["name"] == "me.jpg" and reference["by"] == "look"
    # the reference is a short content hash (the same photo: the same link), kept server-side, that
    # pages the same search through /api/query
    assert len(reference["id"]) == 24
    same = ok(client.post("/api/similar", files={"file": ("other-name.jpg", path.read_bytes())}, data={"limit": "1"}))
    assert same["reference"]["id"] == reference["id"]
    again = ok(client.get("/api/query", params={"like": reference["id"], "limit": 5, "offset": 0}))
    assert again["hits"] == out["hits"]
    assert ok(client.get("/api/query", params={"like": reference["id"], "limit": 2, "offset": 3}))["hits"] == out["hits"][3:5]
    # an empty choice is refused as the schema says, not read as "the default"
    one_line_error(client.post("/api/similar", files={"file": ("me.jpg", path.read_bytes())},
                               data={"detect_face": ""}), 400, "bad detect_face: it is empty")
    # one it does not hold (expired, or before a restart) says what to do
    one_line_error(client.get("/api/query", params={"like": "0" * 24}), 404,
                   "this photo search has expired (the server keeps a photo's reference for a day")
    one_line_error(client.get("/api/query", params={"like": reference["id"], "like_id": 1}), 409,
                   "give like or like_id, not both")
    # a filter is kept: a face that fails it is not returned
    male = built.probs[str(path)]["Male"] >= built.thresholds["Male"]
    where = "not Male" if male else "Male"
    filtered = ok(client.post("/api/similar", files={"file": ("me.jpg", path.read_bytes())}, data={"q": where}))
    assert filtered["hits"] and all(h["path"] != str(path) for h in filtered["hits"])
    assert filtered["expression"] == where


def test_a_broken_upload_gets_predicts_reason(client, built: Built, tmp_path: Path) -> None:
    cases = {"notes.jpg": b"hello, this is not a picture\n" * 10,
             "cut.jpg": built.images[0].read_bytes()[:300],
             "empty.png": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        result = CliRunner().invoke(cli_app, ["predict", str(tmp_path / name), "--model", str(built.model),
                                              "--device", "cpu"])
        assert result.exit_code == 1
        reason = result.stderr.strip().splitlines()[-1].split(f"{tmp_path / name}: ", 1)[1]
        body = one_line_error(client.post("/api/similar", files={"file": (name, data)}), 400, reason)
        assert body["error"] == f"cannot read image {name}: {reason}"


def test_uploads_are_capped_bomb_guarded_and_never_kept(client, built: Built, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from PIL import Image

    from facefind.retrieval.web.app import MAX_UPLOAD

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big = b"\xff\xd8" + b"\0" * (MAX_UPLOAD + 10)
    one_line_error(client.post("/api/similar", files={"file": ("big.jpg", big)}), 413, "20 MB")

    def chunks():  # no Content-Length: the cap is counted while reading
        for _ in range(22):
            yield b"\0" * (1 << 20)

    got = client.post("/api/similar", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert got.status_code == 413 and "20 MB" in got.json()["error"]
    # a PNG that claims 20,000 x 20,000 pixels in a few bytes
    bomb = png_header_only(20_000, 20_000)
    one_line_error(client.post("/api/similar", files={"file": ("bomb.png", bomb)}), 400,
                   "decompression bomb (400000000 pixels)")
    # a large upload (spooled to disk by the form parser) leaves nothing behind
    noise = np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > 2 << 20
    got = client.post("/api/similar", files={"file": ("noise.png", buf.getvalue())}, data={"detect_face": "false"})
    assert got.status_code == 200, got.text
    assert list(spool.iterdir()) == []
    assert client.get("/api/info").status_code == 200  # still serving


@pytest.fixture(scope="module")
def live_server(built: Built, tmp_path_factory: pytest.TempPathFactory):
    """The app under a real uvicorn on a free loopback port (what `facefind serve` runs): its URL."""
    import threading
    import time

    import uvicorn

    from facefind.retrieval.web.app import create_app
    from facefind.retrieval.web.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    app = create_app(built.index, device="cpu", thumbs_dir=tmp_path_factory.mktemp("live-thumbs"))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_a_too_large_upload_is_a_413_every_client_reads(live_server: str) -> None:
    """urllib writes the whole body before reading the answer: the server must not close mid-body."""
    import socket
    import urllib.error
    import urllib.request

    from facefind.retrieval.web.guard import MAX_UPLOAD

    body = b"\0" * (MAX_UPLOAD + (1 << 20))  # 21 MB
    for _ in range(3):
        request = urllib.request.Request(f"{live_server}/api/similar", data=body, method="POST",
                                         headers={"Content-Type": "multipart/form-data; boundary=x"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert "larger than 20 MB" in json.loads(refused.value.read())["error"]
    # a client that asks first (Expect: 100-continue, as curl does) hears the 413 before sending anything
    host, port = live_server.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /api/similar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                     "Content-Type: multipart/form-data; boundary=x\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = conn.makefile("rb")
        status = answer.readline().decode()
        length = next(int(line.split(b":")[1]) for line in iter(answer.readline, b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while answer.readline() not in (b"\r\n", b""):
            pass
        error = json.loads(answer.read(length))["error"]
    assert status.startswith("HTTP/1.1 413") and "larger than 20 MB" in error
    # the server is still serving
    with urllib.request.urlopen(f"{live_server}/api/info", timeout=30) as answer:
        assert answer.status == 200


# -- safety -----------------------------------------------------------------------------------


def _index_state(index: Path) -> dict[str, str]:
    return {str(p.relative_to(index)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(index.rglob("*")) if p.is_file() and "thumbs" not in p.parts}


def test_no_endpoint_changes_the_index(client, built: Built) -> None:
    before = _index_state(built.index)
    image_id = built.ids[str(built.images[0])]
    for url in ("/", "/model", "/api/attributes", "/api/query?q=Male", f"/api/query?like_id={image_id}",
                f"/api/images/{image_id}", f"/api/images/{image_id}/thumb", f"/api/images/{image_id}/full",
                "/api/info", "/api/model", "/api/export?format=json", "/openapi.json"):
        assert client.get(url).status_code == 200, url
    client.post("/api/similar", files={"file": ("a.jpg", built.images[0].read_bytes())})
    for method in ("PUT", "DELETE", "PATCH"):
        got = client.request(method, f"/api/images/{image_id}")
        assert got.status_code == 405 and got.json()["error"]
    assert _index_state(built.index) == before


def test_a_bug_is_a_500_without_traceback_and_the_server_keepsserving(client, monkeypatch) -> None:
    from facefind.retrieval.engine import Engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals /etc/shadow")

    monkeypatch.setattr(Engine, "query", broken)
    got = client.get("/api/query", params={"q": "Male"})
    assert got.status_code == 500 and "Traceback" not in got.text and "shadow" not in got.text
    assert got.json()["error"].startswith("internal error")
    monkeypatch.undo()
    assert client.get("/api/query", params={"q": "Male"}).status_code == 200


def test_token_is_required_on_every_request(built: Built) -> None:
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    token = "s3cret-token-42"
    with TestClient(create_app(built.index, token=token), base_url="http://203.0.113.5:8000") as c:
        for url in ("/", "/api/query?q=Male", "/api/images/1/thumb", "/docs", "/openapi.json", "/static/app.js",
                    "/api/query?q=Male&token=wrong"):
            got = c.get(url)
            assert got.status_code == 401 and "token" in got.json()["error"], url
        assert c.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/info", headers={"Authorization": "Bearer nope"}).status_code == 401
        first = c.get(f"/?token={token}")
        assert first.status_code == 200 and "HttpOnly" in first.headers["set-cookie"]
        assert c.get("/api/images/1/thumb").status_code == 200  # the cookie now carries it


def test_without_token_only_loopback_hosts_are_answered(client) -> None:
    for host in ("evil.example", "evil.example:8000", "192.168.1.4", "127.0.0.1.evil.example"):
        got = client.get("/api/info", headers={"Host": host})
        assert got.status_code == 403 and "--token" in got.json()["error"], host
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 200, host


def test_cli_refuses_a_public_bind_without_a_token(built: Built) -> None:
    for args in (["--host", "0.0.0.0"], ["--host", "192.168.1.4"], ["--host", "0.0.0.0", "--token", "short"]):
        result = CliRunner().invoke(cli_app, ["serve", "--index", str(built.index), *args])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 1 and len(lines) == 1 and "--token" in lines[0], result.stderr


# -- live reload, exports, info ---------------------------------------------------------------


def test_a_new_snapshot_generation_is_served_without_restart(built: Built, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from facefind.db.catalog import Catalog, IndexedImage
    from facefind.db.snapshot import sync_snapshot
    from facefind.retrieval.web.app import create_app

    index = tmp_path / "index"
    shutil.copytree(built.index, index)
    extra = tmp_path / "new.jpg"
    shutil.copy(built.images[0], extra)
    with TestClient(create_app(index, check_every=0.0), base_url="http://127.0.0.1") as c:
        assert ok(c.get("/api/info"))["n_indexed"] == N_FACES
        with Catalog.open(index) as catalog:
            model = catalog.latest_model()
            catalog.write_batch(model.id, [IndexedImage(str(extra), 1, 1.0, 178, 218,
                                                        np.full(len(built.attributes), 0.99, np.float32),
                                                        np.ones(model.embedding_dim, np.float32))])
            sync_snapshot(catalog, index)  # what `facefind index` does when it finishes
        assert ok(c.get("/api/info"))["n_indexed"] == N_FACES + 1
        hits = ok(c.get("/api/query", params={"q": "Male > 0.98"}))["hits"]
        assert [h["path"] for h in hits] == [str(extra)]


def test_export_streams_every_match(client, built: Built) -> None:
    import csv

    expr = "Eyeglasses or not Male"
    everything = cli_json("query", expr, "--index", built.index, "--limit", "1000")
    got = client.get("/api/export", params={"q": expr, "format": "csv"})
    assert got.status_code == 200 and "attachment" in got.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(got.text)))
    assert [int(r["id"]) for r in rows] == [h["id"] for h in everything["hits"]]
    assert float(rows[0]["Male"]) == everything["hits"][0]["attributes"]["Male"]
    paths = client.get("/api/export", params={"q": expr, "format": "paths"}).text.splitlines()
    assert paths == [h["path"] for h in everything["hits"]]
    as_json = client.get("/api/export", params={"q": expr, "format": "json"}).json()
    assert as_json == everything
    assert client.get("/api/export", params={"format": "xml"}).status_code == 400


def test_export_pages_through_the_engine(client, built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    from facefind.retrieval.web.routes import search as web

    monkeypatch.setattr(web, "EXPORT_PAGE", 3)
    paths = client.get("/api/export", params={"format": "paths", "like_id": 2}).text.splitlines()
    assert paths == [h["path"] for h in cli_json("query", "--like-id", "2", "--index", built.index,
                                                 "--limit", "1000")["hits"]]


def test_info_model_page_and_docs(client, built: Built) -> None:
    info = ok(client.get("/api/info"))
    assert info["n_indexed"] == N_FACES and info["model"]["arch"] == "mobilenet_v3_small"
    assert info["has_labels"] and not info["token_required"]
    model = ok(client.get("/api/model"))
    assert [h["epoch"] for h in model["history"]] == [1, 2, 3]
    assert model["history"][2]["val"]["macro_f1"] == pytest.approx(HISTORY[2]["val"]["macro_f1"])
    assert set(model["val_metrics"]["per_attribute"]) == set(built.attributes)
    assert client.get("/docs").status_code == 200
    spec = ok(client.get("/openapi.json"))
    assert {"/api/query", "/api/similar", "/api/export", "/api/images/{image_id}/thumb"} <= set(spec["paths"])
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in "".join(p.read_text() for p in (ROOT / "retrieval/web/static").iterdir()
                                 if p.suffix in (".html", ".css")).replace("http://www.w3.org", "")


def test_query_command_never_imports_the_server(built: Built) -> None:
    probe = ("import sys\nfrom facefind.retrieval.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', [m for m in ('fastapi', 'uvicorn', 'starlette', 'multipart') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe, "query", "Male", "--index", str(built.index)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
