"""Search by person: ``index --identity`` stores dlib identity descriptors, ``similar --by person``
ranks by them (issue 15 §3).

Checked: the engine's person ranking against a brute-force oracle, with filters and rows that
have no descriptor; the catalog writes a descriptor in its prediction's transaction (a failing
batch leaves neither), drops it when the file changes or goes, and re-reads files indexed without
one (catalogs from before the identities table upgrade on open: tests/test_catalog.py); through the CLI on synthetic
faces (which HOG detects) the index stores descriptors and refuses ``--by person`` in one line
when it has none; and on the real CelebA sample (skipped without it) another photo of the same
person ranks first among other people. A kill -9 under --identity is in test_photo_faces.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facefind.retrieval.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from helpers import identity_count, tiny_checkpoint  # noqa: E402

SAMPLE = Path(os.environ.get("FACEFIND_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "celeba-sample"))
celeba = pytest.mark.skipif(not (SAMPLE / "identity_CelebA.txt").is_file(), reason="no real CelebA sample")

K, D = 3, 8
NAMES = ["Smiling", "Male", "Eyeglasses"]


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------- engine (no dlib)


def _snapshot(n: int, seed: int = 0):
    from facefind.db.snapshot import Snapshot

    rng = np.random.default_rng(seed)
    ids = np.arange(10, 10 + n, dtype=np.int64)
    identity = (rng.standard_normal((n, 128)) * 0.05).astype(np.float16)
    has = rng.random(n) < 0.8
    identity[~has] = 0
    return Snapshot(model_id=1, stamp=1, attributes=NAMES, thresholds=np.full(K, 0.5, np.float32), ids=ids,
                    probs=rng.random((K, n), dtype=np.float32), emb=np.ones((n, D), np.float16) / np.sqrt(D),
                    paths=[f"/x/{i}.jpg" for i in ids], identity=identity, has_identity=has)


def test_person_ranking_is_exact_over_filtered_rows_with_a_descriptor() -> None:
    from facefind.retrieval.engine import Engine

    snap = _snapshot(300)
    engine = Engine(snap)
    planted = int(np.flatnonzero(snap.has_identity & (snap.probs[0] >= 0.5))[7])
    q = snap.identity[planted].astype(np.float32) + 0.001
    result = engine.query("Smiling", person=q, limit=15)
    keep = np.flatnonzero(snap.has_identity & (snap.probs[0] >= 0.5))
    dist = np.linalg.norm(snap.identity[keep].astype(np.float64) - q, axis=1)
    oracle = [int(snap.ids[keep[i]]) for i in sorted(range(len(keep)), key=lambda i: (dist[i], snap.ids[keep[i]]))]
    assert result.ranking == "person" and result.total == len(keep)
    assert [h.id for h in result.hits] == oracle[:15]
    assert result.hits[0].id == int(snap.ids[planted])
    hits = result.to_dict()["hits"]
    assert hits[0]["same_person"] is True and hits[0]["distance"] < 0.02
    assert all(h["same_person"] == (h["distance"] < 0.6) for h in hits)
    assert all(abs(h["distance"] - d) < 1e-4 for h, d in zip(hits, sorted(dist)[:15]))
    # by an indexed image's id: the same ranking from its stored descriptor
    again = engine.query("Smiling", person_id=int(snap.ids[planted]), limit=3)
    assert again.hits[0].id == int(snap.ids[planted]) and again.hits[0].distance == 0.0


def test_person_ranking_refuses_without_descriptors_and_for_a_faceless_id() -> None:
    from dataclasses import replace

    from facefind.db.errors import CatalogError
    from facefind.retrieval.engine import Engine

    snap = _snapshot(20)
    bare = Engine(replace(snap, identity=None, has_identity=None))
    with pytest.raises(CatalogError, match=r"^this index has no identity descriptors: run `facefind index FOLDER --identity`"):
        bare.query(None, person=np.zeros(128, np.float32))
    faceless = int(snap.ids[np.flatnonzero(~snap.has_identity)[0]])
    with pytest.raises(CatalogError, match="has no identity descriptor"):
        Engine(snap).query(None, person_id=faceless)


# ---------------------------------------------------------------------------- catalog


def _row(path: str, seed: int, *, described: bool = False, identity: np.ndarray | None = None,
         mtime: float = 1.0, labels: np.ndarray | None = None):
    from facefind.db.catalog import IndexedImage

    rng = np.random.default_rng(seed)
    return IndexedImage(path, 100, mtime, 178, 218, rng.random(K, dtype=np.float32),
                        rng.standard_normal(D, dtype=np.float32), labels=labels,
                        described=described, identity=identity)


def test_descriptors_commit_with_their_prediction_and_follow_the_file(
    catalog_backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facefind.db.catalog import Catalog

    cat = Catalog.open(tmp_path / "index")
    model = cat.register_model("a" * 64, "r", NAMES, [0.5] * K, D, None)
    va, vb = np.full(128, 0.1, np.float32), np.full(128, -0.2, np.float32)
    cat.write_batch(model, [_row("/x/a.jpg", 1, described=True, identity=va),
                            _row("/x/b.jpg", 2, described=True),          # looked: no face
                            _row("/x/c.jpg", 3)])                         # indexed without --identity
    _, preds = cat.export(model)
    assert preds.paths == ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]
    assert preds.has_identity.tolist() == [True, False, False]
    np.testing.assert_array_equal(preds.identity[0], va)
    assert set(cat.known_files(model, identity=True)) == {"/x/a.jpg", "/x/b.jpg"}  # c is read again
    assert identity_count(cat) == (2, 1)

    # One transaction: a batch that fails after its descriptors were written leaves nothing.
    def boom(*_a, **_k):
        raise RuntimeError("killed mid-batch")

    monkeypatch.setattr(Catalog, "_store_labels", boom)
    with pytest.raises(RuntimeError):
        cat.write_batch(model, [_row("/x/d.jpg", 4, described=True, identity=vb, labels=np.ones(K))],
                        label_names=NAMES)
    monkeypatch.undo()
    _, after = cat.export(model)
    assert after.paths == preds.paths and identity_count(cat) == (2, 1)

    # Describing an image another model also predicted makes that model's snapshot stale.
    other = cat.register_model("b" * 64, "r", NAMES, [0.5] * K, D, None)
    cat.write_batch(other, [_row("/x/c.jpg", 6)])
    before = cat.stamp(other)
    cat.write_batch(model, [_row("/x/c.jpg", 3, described=True, identity=vb)])
    assert cat.stamp(other) == before + 1 and cat.export(other)[1].has_identity.tolist() == [True]

    # A changed file loses its old descriptor unless the new run describes it; a pruned one too.
    cat.write_batch(model, [_row("/x/a.jpg", 5, mtime=2.0)])
    assert cat.export(model)[1].has_identity.tolist() == [False, False, True]
    cat.write_batch(model, [_row("/x/a.jpg", 5, mtime=3.0, described=True, identity=vb)])
    np.testing.assert_array_equal(cat.export(model)[1].identity[0], vb)
    cat.prune(["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"])
    assert identity_count(cat) == (0, 0)
    cat.close()


# ---------------------------------------------------------------------------- CLI, synthetic faces


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.synth import synthesize

    base = tmp_path_factory.mktemp("identity")
    synthesize(base / "celeba", n=10, seed=5)
    images = base / "celeba" / "img_align_celeba"
    ann = read_attributes(base / "celeba" / "list_attr_celeba.txt")
    model = tiny_checkpoint(base / "model.pt", ann.attributes, calibrate=sorted(images.glob("*.jpg")))
    return base, images, model


def test_index_identity_stores_descriptors_and_similar_refuses_without_them(synthetic) -> None:
    base, images, model = synthetic
    index = base / "index"
    query = sorted(images.glob("*.jpg"))[0]
    assert run("index", images, "--model", model, "--index", index, "--workers", "0", "--json").exit_code == 0

    refused = run("similar", query, "--by", "person", "--index", index)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [
        "error: this index has no identity descriptors: run `facefind index FOLDER --identity` to add them, "
        "then search with --by person"]

    # --identity over an index built without it reads every file again, then nothing more.
    first = run("index", images, "--model", model, "--index", index, "--workers", "0", "--identity", "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["indexed"] == 10 and report["identity"]["described"] == 10
    assert report["identity"]["no_face"] <= 2  # HOG finds (nearly) every synthetic face
    again = json.loads(run("index", images, "--model", model, "--index", index, "--workers", "0",
                           "--identity", "--json").stdout)
    assert again["indexed"] == 0 and again["unchanged"] == 10

    out = run("similar", query, "--by", "person", "--where", "not Eyeglasses or Eyeglasses", "--index", index,
              "--json", "--limit", "3")
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)["hits"]
    assert json.loads(out.stdout)["ranking"] == "person"
    assert hits[0]["path"] == str(query) and hits[0]["distance"] < 1e-3 and hits[0]["same_person"] is True
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    bad = run("similar", query, "--by", "face", "--index", index)
    assert bad.exit_code == 1 and "--by must be look or person" in bad.stderr


# ---------------------------------------------------------------------------- real sample


def _people(n_others: int) -> tuple[list[str], list[str]]:
    """Two images of one person, and one image each of ``n_others`` other people, from the sample."""
    present = {p.name for p in (SAMPLE / "img_align_celeba").iterdir()}
    by_person: dict[str, list[str]] = {}
    for line in (SAMPLE / "identity_CelebA.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in present:
            by_person.setdefault(parts[1], []).append(parts[0])
    people = sorted(by_person, key=int)
    pair = next(by_person[p][:2] for p in people if len(by_person[p]) >= 2)
    owner = next(p for p in people if pair[0] in by_person[p])
    others = [by_person[p][0] for p in people if p != owner][:n_others]
    return pair, others


@celeba
def test_by_person_ranks_the_same_persons_other_photo_first(tmp_path: Path) -> None:
    from facefind.trainer.celeba import read_attributes

    (query_name, same_name), others = _people(12)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in [same_name, *others]:  # links, never copies of CelebA images
        (folder / name).symlink_to(SAMPLE / "img_align_celeba" / name)
    ann = read_attributes(SAMPLE / "list_attr_celeba.txt")
    model = tiny_checkpoint(tmp_path / "model.pt", ann.attributes, calibrate=sorted(folder.glob("*.jpg")))
    done = run("index", folder, "--model", model, "--index", tmp_path / "index", "--workers", "0", "--identity")
    assert done.exit_code == 0, done.output
    query = SAMPLE / "img_align_celeba" / query_name
    out = json.loads(run("similar", query, "--by", "person", "--index", tmp_path / "index", "--json").stdout)
    hits = out["hits"]
    assert hits[0]["path"] == str(folder / same_name) and hits[0]["same_person"] is True
    # ... above every other person, including the one the attribute embedding finds most alike
    look = json.loads(run("similar", query, "--by", "look", "--index", tmp_path / "index", "--json").stdout)
    lookalike = next(h["path"] for h in look["hits"] if h["path"] != str(folder / same_name))
    assert next(h for h in hits if h["path"] == lookalike)["same_person"] is False
