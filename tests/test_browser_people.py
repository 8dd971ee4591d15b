"""The People view (issue 26): /api/people through FastAPI's TestClient, and the page in a real
Chromium against a real `facefind serve` (as tests/test_browser.py does, never `playwright install`).

The index is built in tmp_path from seeded synthetic identity descriptors (tests/test_people.py's
``make_index``) over small JPEGs written there, grouped and named through the real CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.snapshot import load_snapshot, sync_snapshot
from facefind.retrieval.bench.people import synthetic_descriptors
from helpers import api, serve_index
from test_people import ATTRIBUTES, cli, people_json  # tests/ is on sys.path (pytest's prepend import mode)

N = 60


def build(folder: Path, grouped: bool = True) -> Path:
    """An index of N real (tiny, flat-coloured) JPEGs with synthetic descriptors of ~6 identities."""
    images = folder / "faces"
    images.mkdir(parents=True)
    x, truth = synthetic_descriptors(N, seed=4, per_person=10)
    rng = np.random.default_rng(1)
    probs = rng.random((N, 2)).astype(np.float32)
    rows = []
    for i in range(N):
        path = images / f"{i:03d}.jpg"
        Image.new("RGB", (178, 218), tuple(int(c) for c in rng.integers(0, 255, 3))).save(path)
        rows.append(IndexedImage(str(path), path.stat().st_size, path.stat().st_mtime, 178, 218, probs[i],
                                 rng.random(4).astype(np.float32), described=True, identity=x[i]))
    idx = folder / "index"
    catalog = Catalog.open(idx)
    model = catalog.register_model("ef" * 32, "test", ATTRIBUTES, [0.5, 0.5], 4, None)
    catalog.write_batch(model, rows)
    sync_snapshot(catalog, idx, model)
    catalog.close()
    if grouped:
        first = people_json(idx)["persons"][0]
        assert cli("people", "name", str(first["id"]), "Ada Lovelace", "--index", str(idx)).exit_code == 0
    return idx


def snapshot(idx: Path):
    with Catalog.open(idx, create=False) as catalog:
        return load_snapshot(idx, catalog.latest_model().id)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("people-web"))


@pytest.fixture(scope="module")
def client(index: Path, tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    with TestClient(create_app(index, device="cpu", thumbs_dir=tmp_path_factory.mktemp("thumbs")),
                    base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c


def test_api_people_lists_what_the_cli_lists(client, index: Path) -> None:
    listed = people_json(index)["persons"]
    got = client.get("/api/people").json()
    assert got["total"] == len(listed)
    assert [(p["id"], p["name"], p["count"]) for p in got["persons"]] == \
        [(p["id"], p["name"], p["count"]) for p in listed]
    faces = {p["id"]: set(p["faces"]) for p in listed}
    assert all(p["representative"] in faces[p["id"]] for p in got["persons"])
    big = client.get("/api/people", params={"min_faces": 8}).json()
    assert big["persons"] and all(p["count"] >= 8 for p in big["persons"])


def test_api_person_of_a_face_and_person_queries(client, index: Path) -> None:
    ada = people_json(index)["persons"][0]
    face = ada["faces"][-1]
    assert client.get(f"/api/people/of/{face}").json() == {"id": ada["id"], "name": "Ada Lovelace"}
    snap = snapshot(index)
    smiling = {int(i) for i, p in zip(snap.ids, snap.probs[0]) if p >= snap.thresholds[0]}
    res = client.get("/api/query", params={"q": 'person:"ada lovelace" and Smiling', "limit": 1000}).json()
    assert {h["id"] for h in res["hits"]} == set(ada["faces"]) & smiling
    bad = client.get("/api/people/of/99999")
    assert bad.status_code == 404 and "no image with id 99999" in bad.json()["error"]
    unknown = client.get("/api/query", params={"q": "person:Adda"})
    assert unknown.status_code == 400 and "no person named 'Adda'" in unknown.json()["error"]


def test_api_people_without_persons_says_how_to_get_them(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    idx = build(tmp_path, grouped=False)
    with TestClient(create_app(idx, device="cpu", thumbs_dir=tmp_path / "thumbs"), base_url="http://127.0.0.1:8000") as c:
        res = c.get("/api/people")
    assert res.status_code == 404 and "run `facefind people`" in res.json()["error"]


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def server(index: Path):
    yield from serve_index(index)


def test_people_view_opens_a_person_and_the_chips_work_inside_it(browser, server, index: Path) -> None:
    from playwright.sync_api import expect

    persons = api(server, "/api/people")["persons"]
    ada = persons[0]
    # The page's own Content-Security-Policy stays on (these checks need no eval): the view's
    # styles must come from a stylesheet it allows, not from an injected <style>.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.goto(server.url)
    expect(pg.locator("#count")).to_have_text(f"{N} of {N} images match")
    pg.click("#people-btn")
    cards = pg.locator("#people .person")
    expect(cards).to_have_count(len(persons))
    expect(cards.first.locator(".pname")).to_have_text("Ada Lovelace")
    expect(cards.first.locator(".pcount")).to_have_text(f"{ada['count']} faces")
    expect(cards.first.locator("img")).to_have_attribute("src", f"/api/images/{ada['representative']}/thumb")
    expect(cards.first).to_have_css("flex-direction", "column")  # people.css applies under the CSP
    cards.first.click()
    expect(pg.locator("#people")).to_be_hidden()
    expect(pg.locator("#expr")).to_have_value(f"person:{ada['id']}")
    expect(pg.locator("#count")).to_have_text(f"{ada['count']} of {N} images match")
    pg.click('#chips .chip[data-name="Smiling"]')  # a chip narrows inside the person
    want = api(server, "/api/query", q='person:"Ada Lovelace" and Smiling', limit=1000)
    expect(pg.locator("#expr")).to_have_value(f"person:{ada['id']} and Smiling")
    expect(pg.locator("#count")).to_have_text(f"{want['total']} of {N} images match")
    assert 0 < want["total"] < ada["count"]
    pg.locator(".card[data-id]").first.click()  # the face panel names the person
    expect(pg.locator("#panel .personline")).to_have_text("person: Ada Lovelace")
    pg.keyboard.press("Escape")
    # A quoted name survives a chip click whole (the page's tokenizer keeps "..." as one token).
    pg.fill("#expr", 'person:"Ada Lovelace"')
    pg.press("#expr", "Enter")
    expect(pg.locator("#count")).to_have_text(f"{ada['count']} of {N} images match")
    pg.click('#chips .chip[data-name="Smiling"]')
    expect(pg.locator("#expr")).to_have_value('person:"Ada Lovelace" and Smiling')
    expect(pg.locator("#count")).to_have_text(f"{want['total']} of {N} images match")
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_a_rename_on_the_cli_reaches_the_running_server(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    idx = build(tmp_path)
    ada = people_json(idx)["persons"][0]
    app = create_app(idx, device="cpu", thumbs_dir=tmp_path / "thumbs", check_every=0)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get(f"/api/people/of/{ada['faces'][0]}").json()["name"] == "Ada Lovelace"
        assert cli("people", "name", str(ada["id"]), "Ada King", "--index", str(idx)).exit_code == 0
        assert c.get(f"/api/people/of/{ada['faces'][0]}").json()["name"] == "Ada King"
        assert "no person named 'Ada Lovelace'" in c.get("/api/query", params={"q": 'person:"Ada Lovelace"'}).json()["error"]
        res = c.get("/api/query", params={"q": 'person:"ada king"', "limit": 1000}).json()
        assert {h["id"] for h in res["hits"]} == set(ada["faces"])
