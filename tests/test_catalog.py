"""The catalog: schema, upsert semantics, generations, failures, runs, labels, bulk reads.

Tests that take ``catalog`` (or ``catalog_backend``) run against SQLite and against a real
PostgreSQL server (tests/pg.py), since facefind promises the same behaviour on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from facefind.db.backend import COPY_MIN_ROWS
from facefind.db import vectors
from facefind.db.catalog import Catalog, IndexedImage, normalize_path
from facefind.db.errors import CatalogError
from facefind.db.schema import failures_table
from helpers import add_labels, identity_count  # tests/ is on sys.path (pytest's prepend import mode)

K, D = 5, 8
NAMES = [f"Attr_{i}" for i in range(K)]


def rows_for(paths: list[str], seed: int = 0, size: int = 100, mtime: float = 1.0) -> list[IndexedImage]:
    rng = np.random.default_rng(seed)
    return [
        IndexedImage(p, size, mtime, 178, 218, rng.random(K, dtype=np.float32),
                     rng.standard_normal(D, dtype=np.float32))
        for p in paths
    ]


def stored(rows: list[IndexedImage]) -> np.ndarray:
    """The embeddings the catalog keeps for these rows: as they are, rounded to float16."""
    return np.stack([r.embedding for r in rows]).astype(np.float16)


@pytest.fixture
def catalog(catalog_backend, tmp_path: Path) -> Catalog:
    cat = Catalog.open(tmp_path / "index")
    yield cat
    cat.close()


@pytest.fixture
def model(catalog: Catalog) -> int:
    return catalog.register_model("a" * 64, "resnet18", NAMES, [0.5] * K, D, "/models/a.pt", {"epochs": 1})


def test_schema_is_created_with_wal_foreign_keys_and_large_pages(tmp_path: Path) -> None:
    cat = Catalog.open(tmp_path / "index")
    assert cat.sqlite_file == (tmp_path / "index" / "catalog.db").absolute()
    engine = sa.create_engine(f"sqlite:///{cat.sqlite_file}")
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"images", "models", "predictions", "labels", "label_sets", "failures", "runs", "meta"} <= tables
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 16384
    engine.dispose()
    with cat._writer.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    # Reopening keeps the same catalog (same random id); a fresh folder gets another one.
    assert Catalog.open(tmp_path / "index").catalog_id == cat.catalog_id
    assert Catalog.open(tmp_path / "other").catalog_id != cat.catalog_id
    cat.close()


def test_open_refuses_missing_or_damaged_catalogs(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no index at"):
        Catalog.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "catalog.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match="cannot open the catalog"):
        Catalog.open(bad)


def test_register_model_is_idempotent_on_sha256(catalog: Catalog, model: int) -> None:
    again = catalog.register_model("a" * 64, "resnet18", NAMES, [0.5] * K, D, "/moved/a.pt")
    assert again == model
    assert catalog.get_model(model).checkpoint == "/moved/a.pt"  # a moved checkpoint is followed
    other = catalog.register_model("b" * 64, "resnet50", NAMES, [0.3] * K, D, None)
    assert other != model
    assert [m.id for m in catalog.models()] == [model, other]
    assert catalog.latest_model().id == other
    assert catalog.latest_model(require_predictions=True) is None
    catalog.write_batch(model, rows_for(["/x/1.jpg"]))
    assert catalog.latest_model(require_predictions=True).id == model
    rec = catalog.get_model(model)
    assert rec.attributes == NAMES and rec.thresholds == [0.5] * K and rec.meta == {"epochs": 1}
    with pytest.raises(CatalogError, match="no model with id 999"):
        catalog.get_model(999)
    with pytest.raises(ValueError):
        catalog.register_model("c" * 64, "x", NAMES, [0.5], D, None)


def test_same_path_twice_gives_one_image_and_one_prediction(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg"], seed=1))
    last = rows_for(["/x/a.jpg"], seed=2)
    catalog.write_batch(model, rows_for(["/x/a.jpg"], seed=3) + last)  # twice in one batch too
    preds = catalog.export(model)[1]
    assert preds.paths == ["/x/a.jpg", "/x/b.jpg"]
    np.testing.assert_array_equal(preds.probs[0], last[0].probs)
    info = catalog.info(model)
    assert info["images"] == 2 and info["predictions"] == 2


def test_large_batches_insert_replace_and_keep_ids_as_row_by_row(catalog: Catalog, model: int) -> None:
    """Batches past ``COPY_MIN_ROWS`` (PostgreSQL: binary COPY, straight in for new files, through
    a staging table for known ones): ids follow the rows' order, a known file keeps its id, the
    last row of a path wins, a changed file loses the other model's predictions."""
    n = 3 * COPY_MIN_ROWS
    paths = [f"/big/{i:03d}.jpg" for i in range(n)][::-1]  # ids in row order, not path order
    other = catalog.register_model("b" * 64, "resnet50", NAMES, [0.5] * K, D, None)
    catalog.write_batch(other, rows_for(paths, seed=9))
    first = rows_for(paths, seed=1)
    for i, r in enumerate(first):
        r.labels = np.array([1, -1, 1, -1, i % 2])
    catalog.write_batch(model, first, label_names=NAMES)
    preds = catalog.export(model)[1]
    assert preds.paths == paths
    ids = dict(zip(preds.paths, preds.ids.tolist()))
    np.testing.assert_array_equal(preds.emb, stored(first))

    changed = rows_for(paths[: n // 2], seed=2, size=200, mtime=2.0)  # new content
    again = rows_for(paths[n // 2:], seed=3) + rows_for(paths[n // 2:], seed=4)  # unchanged, twice
    catalog.write_batch(model, changed + again + rows_for(["/big/new.jpg"], seed=5))
    preds = catalog.export(model)[1]
    assert preds.paths == paths + ["/big/new.jpg"]
    assert dict(zip(preds.paths[:n], preds.ids[:n].tolist())) == ids
    want = changed + again[len(again) // 2:] + rows_for(["/big/new.jpg"], seed=5)
    np.testing.assert_array_equal(preds.probs, np.stack([r.probs for r in want]))
    np.testing.assert_array_equal(preds.emb, stored(want))
    assert catalog.export(other)[1].paths == paths[n // 2:]
    assert catalog.known_files(model)[paths[0]] == (200, 2.0)
    face_ids, values = catalog.labels_for(NAMES)  # labels of a large batch: a COPY upsert too
    assert len(face_ids) == n and values.tolist() == [[1, 0, 1, 0, i % 2] for i in range(n)]


def test_two_large_upserts_of_one_table_in_one_transaction(catalog: Catalog) -> None:
    """PostgreSQL's staging table is per session and emptied at commit: a second COPY upsert in the
    same transaction must not see the first one's rows again (ON CONFLICT would refuse them)."""
    columns = ["path", "reason", "at"]
    with catalog._write(shared=True) as conn:
        for reason in ("first", "second"):
            catalog._upsert_rows(conn, failures_table, ["path"], columns, ["reason", "at"],
                                 [(f"/f/{i:03d}.jpg", reason, 1.0) for i in range(COPY_MIN_ROWS + 8)])
    assert {(f.path, f.reason) for f in catalog.failures()} == {
        (f"/f/{i:03d}.jpg", "second") for i in range(COPY_MIN_ROWS + 8)}


def test_paths_are_normalised(catalog: Catalog, model: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    catalog.write_batch(model, rows_for(["sub/../a.jpg"]))
    catalog.write_batch(model, rows_for([str(tmp_path / "a.jpg")]))
    assert catalog.image_paths() == [str(tmp_path / "a.jpg")]
    assert normalize_path("~/x.jpg") == os.path.join(os.path.expanduser("~"), "x.jpg")
    assert catalog.image_paths(under=tmp_path) == [str(tmp_path / "a.jpg")]
    assert catalog.image_paths(under=tmp_path / "sub") == []


def test_changed_file_keeps_its_id_and_drops_other_models_predictions(catalog: Catalog, model: int) -> None:
    other = catalog.register_model("b" * 64, "resnet50", NAMES, [0.5] * K, D, None)
    catalog.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg"], size=100))
    catalog.write_batch(other, rows_for(["/x/a.jpg", "/x/b.jpg"], size=100))
    ids_before = catalog.export(model)[1].ids
    other_stamp = catalog.stamp(other)

    catalog.write_batch(model, rows_for(["/x/a.jpg"], seed=5, size=200, mtime=2.0))

    preds = catalog.export(model)[1]
    np.testing.assert_array_equal(preds.ids, ids_before)
    assert catalog.known_files(model)["/x/a.jpg"] == (200, 2.0)
    # The other model described the old content: its prediction for a.jpg is gone, b.jpg stays.
    assert catalog.export(other)[1].paths == ["/x/b.jpg"]
    assert catalog.stamp(other) == other_stamp + 1
    # Rewriting an unchanged file does not touch the other model.
    catalog.write_batch(model, rows_for(["/x/b.jpg"], size=100))
    assert catalog.stamp(other) == other_stamp + 1


def test_undecodable_file_names_become_failures_not_crashes(catalog: Catalog, model: int) -> None:
    bad = os.fsdecode(b"/x/caf\xe9.jpg")  # Latin-1 bytes in a file name, as os.scandir returns them
    catalog.write_batch(model, rows_for([bad, "/x/ok.jpg"]))
    assert catalog.export(model)[1].paths == ["/x/ok.jpg"]
    assert [(f.path, "UTF-8" in f.reason) for f in catalog.failures()] == [("/x/caf\\xe9.jpg", True)]
    catalog.record_failures([(bad, "truncated")])
    assert len(catalog.failures()) == 1


def test_failures_upsert_and_are_cleared_when_the_file_succeeds(catalog: Catalog, model: int) -> None:
    catalog.record_failures([("/x/a.jpg", "truncated"), ("/x/b.jpg", "empty file")])
    catalog.record_failures([("/x/a.jpg", "not an image")])
    assert [(f.path, f.reason) for f in catalog.failures()] == [("/x/a.jpg", "not an image"), ("/x/b.jpg", "empty file")]
    catalog.write_batch(model, rows_for(["/x/a.jpg"]))
    assert [f.path for f in catalog.failures()] == ["/x/b.jpg"]


def test_unique_constraints_make_duplicates_impossible(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, rows_for(["/x/a.jpg"]))
    image_id = int(catalog.export(model)[1].ids[0])
    insert = sa.text("INSERT INTO predictions (model_id, face_id, probs, embedding) VALUES (:m, :i, :b, :b)")
    with catalog._writer.connect() as conn:
        with pytest.raises(sa.exc.IntegrityError):
            with conn.begin():
                conn.exec_driver_sql("INSERT INTO images (path, size, mtime, added) VALUES ('/x/a.jpg', 1, 1, 1)")
        with pytest.raises(sa.exc.IntegrityError):
            with conn.begin():
                conn.execute(insert, {"m": model, "i": image_id, "b": b"\0"})
        with pytest.raises(sa.exc.IntegrityError):  # foreign keys are enforced
            with conn.begin():
                conn.execute(insert, {"m": model, "i": 12345, "b": b"\0"})


def test_write_batch_is_atomic(catalog: Catalog, model: int) -> None:
    rows = rows_for(["/x/a.jpg", "/x/b.jpg"])
    rows[1].labels = np.ones(K)  # labels without names: fails inside the transaction
    stamp = catalog.stamp(model)
    with pytest.raises(ValueError, match="label_names"):
        catalog.write_batch(model, rows)
    assert catalog.info(model)["images"] == 0 and catalog.stamp(model) == stamp
    bad = rows_for(["/x/c.jpg"])
    bad[0].embedding = np.zeros(D + 1, np.float32)
    with pytest.raises(ValueError, match="embedding"):
        catalog.write_batch(model, bad)


def test_stamp_changes_exactly_when_predictions_change(catalog: Catalog, model: int) -> None:
    s0 = catalog.stamp(model)
    catalog.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg"]))
    s1 = catalog.stamp(model)
    assert s1 > s0
    catalog.record_failures([("/x/c.jpg", "bad")])
    add_labels(catalog, NAMES, {"/x/a.jpg": np.ones(K)})
    catalog.write_batch(model, [])
    assert catalog.stamp(model) == s1
    assert catalog.prune(["/x/a.jpg"]) == 1
    assert catalog.stamp(model) > s1
    with pytest.raises(CatalogError):
        catalog.stamp(12345)


def test_load_predictions_round_trip_in_id_order(catalog: Catalog, model: int) -> None:
    paths = [f"/x/{i:03d}.jpg" for i in range(50)]
    written = rows_for(paths, seed=7)
    for start in range(0, 50, 16):
        catalog.write_batch(model, written[start:start + 16])
    stamp, preds = catalog.export(model)
    assert stamp == catalog.stamp(model)
    assert preds.ids.dtype == np.int64 and np.all(np.diff(preds.ids) > 0)
    assert preds.paths == paths
    assert preds.probs.dtype == np.float32 and preds.probs.shape == (50, K)
    assert preds.emb.dtype == np.float32 and preds.emb.shape == (50, D)
    np.testing.assert_array_equal(preds.probs, np.stack([r.probs for r in written]))
    np.testing.assert_array_equal(preds.emb, stored(written))
    empty = catalog.register_model("e" * 64, "x", NAMES, [0.5] * K, D, None)
    assert catalog.export(empty)[1].probs.shape == (0, K)


def test_float32_rows_of_older_versions_and_float16_rows_export_side_by_side(catalog: Catalog, model: int) -> None:
    """Schema v4 stores embeddings as float16 (2*D bytes); rows written before hold float32 (4*D)
    and are not rewritten: export tells them apart by length, also within one read chunk and on
    both sides of a chunk boundary, and publishes both as the same normalised float16 rows."""
    n = 8_192 + 50  # two read chunks
    written = rows_for([f"/mix/{i:05d}.jpg" for i in range(n)], seed=11)
    for start in range(0, n, 2_048):
        catalog.write_batch(model, written[start:start + 2_048])
    ids = catalog.export(model)[1].ids
    old = [0, 1, 7, 8_191, 8_192, n - 1]  # rows as an older facefind wrote them (float32 bytes)
    with catalog._write() as conn:
        conn.execute(sa.text("UPDATE predictions SET embedding = :blob WHERE face_id = :face"),
                     [{"blob": np.asarray(written[i].embedding, np.float32).tobytes(), "face": int(ids[i])}
                      for i in old])
        lengths = dict(conn.execute(sa.text("SELECT length(embedding), count(*) FROM predictions "
                                            "GROUP BY length(embedding)")).all())
    assert lengths == {2 * D: n - len(old), 4 * D: len(old)}
    want = stored(written).astype(np.float32)
    want[old] = np.stack([written[i].embedding for i in old])  # float32 rows come back exactly
    _, preds = catalog.export(model)
    assert preds.emb.dtype == np.float32
    np.testing.assert_array_equal(preds.emb, want)
    _, published = catalog.export(model, stored=True)
    assert published.emb.dtype == np.float16
    np.testing.assert_array_equal(published.emb, vectors.stored_fp16(want))

    only_old = catalog.register_model("f" * 64, "x", NAMES, [0.5] * K, D, None)  # a chunk of float32 rows only
    catalog.write_batch(only_old, written[:3])
    with catalog._write() as conn:
        conn.execute(sa.text("UPDATE predictions SET embedding = :blob WHERE model_id = :m AND face_id = :face"),
                     [{"blob": np.asarray(written[i].embedding, np.float32).tobytes(), "m": only_old,
                       "face": int(ids[i])} for i in range(3)])
    np.testing.assert_array_equal(catalog.export(only_old)[1].emb, np.stack([r.embedding for r in written[:3]]))


def test_embeddings_beyond_float16_are_refused_with_the_batch(catalog: Catalog, model: int) -> None:
    rows = rows_for(["/x/fine.jpg", "/x/huge.jpg"])
    rows[1].embedding = rows[1].embedding * 1e5
    with pytest.raises(ValueError, match="beyond float16's range"):
        catalog.write_batch(model, rows)
    assert catalog.image_paths() == []
    big = rows_for(["/x/big.jpg"])[0]
    big.embedding = np.full(D, 60_000.0, np.float32)  # large but representable: stored
    catalog.write_batch(model, [big])
    assert catalog.export(model)[1].emb.tolist() == [[60_000.0] * D]


def test_known_files_lists_only_this_models_predictions(catalog: Catalog, model: int) -> None:
    other = catalog.register_model("b" * 64, "resnet50", NAMES, [0.5] * K, D, None)
    catalog.write_batch(model, rows_for(["/x/a.jpg"], size=10, mtime=1.5))
    catalog.write_batch(other, rows_for(["/x/b.jpg"]))
    assert catalog.known_files(model) == {"/x/a.jpg": (10, 1.5)}


def test_prune_removes_images_predictions_labels_and_failures(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg"]))
    add_labels(catalog, NAMES, {"/x/a.jpg": np.ones(K), "/x/b.jpg": np.zeros(K)})
    catalog.record_failures([("/x/gone.jpg", "bad")])
    assert catalog.prune(["/x/a.jpg", "/x/gone.jpg", "/x/never.jpg"]) == 1
    info = catalog.info(model)
    assert (info["images"], info["predictions"], info["labels"], info["failures"]) == (1, 1, 1, 0)
    assert catalog.prune([]) == 0
    # The id of a pruned image is never handed out again (snapshots and users refer to ids).
    top = int(catalog.export(model)[1].ids.max())
    catalog.prune(["/x/b.jpg"])
    catalog.write_batch(model, rows_for(["/x/c.jpg"]))
    assert catalog.export(model)[1].ids.tolist() == [top + 1]


def test_labels_from_batches_and_annotation_files(catalog: Catalog, model: int) -> None:
    rows = rows_for(["/x/a.jpg", "/x/b.jpg"])
    rows[0].labels = np.array([1, -1, 1, -1, 1])  # CelebA's -1/1
    catalog.write_batch(model, rows, label_names=NAMES)
    stored = add_labels(catalog, NAMES, {"/x/b.jpg": np.array([0, 1, 0, 1, 0]), "/x/unknown.jpg": np.ones(K)})
    assert stored == 1
    ids, matrix = catalog.labels_for(["Attr_4", "Attr_1"])
    assert ids.tolist() == catalog.export(model)[1].ids.tolist()
    assert matrix.dtype == np.uint8 and matrix.tolist() == [[1, 0], [0, 1]]
    # An image labelled with another name list lacking a requested name is left out.
    catalog.write_batch(model, rows_for(["/x/c.jpg"]))
    add_labels(catalog, ["Attr_4", "Other"], {"/x/c.jpg": np.array([1, 1])})
    assert len(catalog.labels_for(["Attr_4", "Attr_1"])[0]) == 2
    assert len(catalog.labels_for(["Attr_4"])[0]) == 3
    with pytest.raises(ValueError):
        add_labels(catalog, NAMES, {"/x/a.jpg": np.ones(K + 1)})


def test_runs_left_running_become_interrupted(catalog: Catalog, model: int) -> None:
    first = catalog.start_run(model, "/data")
    second = catalog.start_run(model, "/data")
    by_id = {r.id: r for r in catalog.runs()}
    assert by_id[first].status == "interrupted" and by_id[first].finished is not None
    assert by_id[second].status == "running" and by_id[second].finished is None
    catalog.finish_run(second, "finished", {"indexed": 3}, {"infer": 1.5})
    last = catalog.runs(limit=1)[0]
    assert (last.id, last.status, last.counts, last.timings) == (second, "finished", {"indexed": 3}, {"infer": 1.5})
    assert catalog.info()["last_run"]["status"] == "finished"
    with pytest.raises(ValueError):
        catalog.finish_run(second, "running")


def test_a_run_of_another_live_process_is_not_marked_interrupted(catalog: Catalog, model: int) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = catalog.start_run(model, "/data")
        with catalog._writer.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET pid = :pid WHERE id = :id"), {"pid": sleeper.pid, "id": theirs})
        catalog.start_run(model, "/data")
        assert {r.id: r.status for r in catalog.runs()}[theirs] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    catalog.start_run(model, "/data")  # now it is dead
    assert {r.id: r.status for r in catalog.runs()}[theirs] == "interrupted"


def test_info_counts(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]))
    catalog.record_failures([("/x/d.jpg", "bad")])
    info = catalog.info()
    assert info["model_id"] == model
    assert (info["images"], info["predictions"], info["labels"], info["failures"]) == (3, 3, 0, 1)
    assert info["models"][0]["predictions"] == 3 and info["models"][0]["thresholds"] == [0.5] * K
    assert info["disk_bytes"] > 0


def test_concurrent_writers_wait_instead_of_failing(catalog_backend, tmp_path: Path) -> None:
    cat = Catalog.open(tmp_path / "index")
    model = cat.register_model("a" * 64, "r", NAMES, [0.5] * K, D, None)
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            other = Catalog.open(tmp_path / "index")  # its own engine, like another process
            for b in range(15):
                other.write_batch(model, rows_for([f"/{tag}/{b}-{i}.jpg" for i in range(20)]))
                other.record_failures([(f"/{tag}/bad-{b}.jpg", "bad")])
            other.close()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cat.info(model)["predictions"] == 2 * 15 * 20
    assert cat.stamp(model) == 2 * 15
    cat.close()


# ------------------------------------------------------------------------------------ PostgreSQL


def test_postgres_schema_isolation_and_one_writer_at_a_time(pg_url: str, tmp_path: Path) -> None:
    """An exclusive writer (schema, models, runs) holds the advisory write lock for its whole
    transaction: batches wait for it; readers never wait and see one consistent view; the schema is
    the same tables as on SQLite."""
    cat = Catalog(pg_url)
    model = cat.register_model("a" * 64, "r", NAMES, [0.5] * K, D, None)
    with cat._reader.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {"images", "models", "predictions", "labels", "label_sets", "failures", "runs", "meta"} <= tables
    assert cat.sqlite_file is None and cat.disk_bytes() > 0
    assert Catalog(pg_url).catalog_id == cat.catalog_id

    other = Catalog(pg_url)
    started, done = threading.Event(), threading.Event()
    with cat._write() as conn:  # an exclusive writer in the middle of its transaction
        conn.execute(sa.insert(sa.table("failures", sa.column("path"), sa.column("reason"), sa.column("at"))),
                     {"path": "/x/pending.jpg", "reason": "r", "at": 1.0})

        def second_writer() -> None:
            started.set()
            other.record_failures([("/x/b.jpg", "bad")])
            done.set()

        thread = threading.Thread(target=second_writer)
        thread.start()
        started.wait()
        assert not done.wait(0.5)  # queued behind the lock, not failing
        assert [f.path for f in other.failures()] == []  # readers: not blocked, see no half batch
    thread.join(10)
    assert done.is_set()
    assert [f.path for f in cat.failures()] == ["/x/b.jpg", "/x/pending.jpg"]
    cat.write_batch(model, rows_for(["/x/a.jpg"]))
    assert cat.info(model)["predictions"] == 1
    other.close()
    cat.close()


def test_postgres_batches_of_two_writers_commit_beside_each_other(pg_url: str) -> None:
    """The writers of a sharded run share the write lock: a batch commits while another writer's
    batch is still open, and both bump the model's generation once."""
    cat, other = Catalog(pg_url), Catalog(pg_url)
    model = cat.register_model("a" * 64, "r", NAMES, [0.5] * K, D, None)
    before = cat.stamp(model)
    done = threading.Event()
    with cat._write(shared=True) as conn:  # writer A, mid-batch: holds the shared lock and its rows
        conn.execute(sa.insert(sa.table("failures", sa.column("path"), sa.column("reason"), sa.column("at"))),
                     {"path": "/a/pending.jpg", "reason": "r", "at": 1.0})
        thread = threading.Thread(target=lambda: (other.write_batch(model, rows_for(["/b/1.jpg", "/b/2.jpg"])),
                                                  done.set()))
        thread.start()
        assert done.wait(20)  # writer B did not wait for A
        assert other.info(model)["predictions"] == 2 and [f.path for f in other.failures()] == []
    thread.join(10)
    assert [f.path for f in cat.failures()] == ["/a/pending.jpg"]
    assert cat.stamp(model) == before + 1
    other.close()
    cat.close()


def test_postgres_connection_problems_are_one_line(pg_server, tmp_path: Path) -> None:
    cases = {
        "missing database": (pg_server.url("no_such_db"), "does not exist"),
        "no server": (f"postgresql+psycopg://postgres@/x?host={tmp_path}", "server is running"),
        "not a URL": ("not a url", "not a database URL"),
        "other backend": ("mysql://u@h/db", "supports SQLite and PostgreSQL"),
    }
    for what, (url, text) in cases.items():
        with pytest.raises(CatalogError, match=text) as err:
            Catalog(url)
        assert "\n" not in str(err.value), what
    empty = pg_server.create_database()
    with pytest.raises(CatalogError, match="not a facefind catalog"):
        Catalog(empty, create=False)


def test_a_postgres_url_without_psycopg_says_what_to_install(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "psycopg" or m.startswith("psycopg.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the postgres extra were not installed
    with pytest.raises(CatalogError, match=r"needs the psycopg package: pip install 'facefind\[postgres\]'$"):
        Catalog(pg_url)


# ------------------------------------------------------------------------------------ schema versions


def _v1_catalog(tmp_path: Path) -> tuple[Catalog, int]:
    cat = Catalog.open(tmp_path / "index")
    model = cat.register_model("a" * 64, "r", NAMES, [0.5] * K, D, None)
    cat.write_batch(model, rows_for(["/x/a.jpg", "/x/b.jpg"]))
    cat.close()
    return cat, model


def _columns(cat: Catalog) -> dict[str, set[str]]:
    with cat._reader.connect() as conn:
        inspector = sa.inspect(conn)
        return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}


def test_a_version_step_upgrades_on_open_to_the_fresh_schema(
    catalog_backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A version step as a future facefind adds one (a column from the table definitions, a new
    table), from today's version: the catalog opens, keeps its rows and id, and ends with the
    schema a new catalog gets."""
    import facefind.db.schema as dbc

    old, model = _v1_catalog(tmp_path)
    images = dbc.images
    face_table = sa.Table("faces_v2", dbc.metadata, sa.Column("id", sa.Integer, primary_key=True),
                          sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id")))
    try:
        images.append_column(sa.Column("face_count", sa.Integer, nullable=False, server_default="1"))

        def v1_to_v2(conn: sa.Connection) -> None:
            dbc.add_columns(conn, images, "face_count")
            dbc.metadata.create_all(conn, tables=[face_table])

        now = dbc.SCHEMA_VERSION
        monkeypatch.setattr(dbc, "SCHEMA_VERSION", now + 1)
        monkeypatch.setitem(dbc.MIGRATIONS, now, v1_to_v2)
        upgraded = Catalog.open(tmp_path / "index")
        assert upgraded.catalog_id == old.catalog_id
        assert upgraded.export(model)[1].paths == ["/x/a.jpg", "/x/b.jpg"]
        with upgraded._reader.connect() as conn:
            assert conn.execute(sa.select(dbc.meta_table.c.value).where(dbc.meta_table.c.key == "schema_version")
                                ).scalar() == str(now + 1)
            assert conn.execute(sa.select(images.c.face_count)).scalars().all() == [1, 1]
        upgraded.write_batch(model, rows_for(["/x/c.jpg"]))  # the new column's default fills new rows
        assert Catalog.open(tmp_path / "index").catalog_id == old.catalog_id  # a second open: no step
        fresh = Catalog(f"sqlite:///{tmp_path / 'fresh.db'}" if catalog_backend.is_sqlite
                        else request.getfixturevalue("pg_server").create_database())
        assert _columns(upgraded) == {t: c for t, c in _columns(fresh).items() if t in _columns(upgraded)}
        upgraded.close()
        fresh.close()
    finally:
        images._columns.remove(images.c.face_count)
        dbc.metadata.remove(face_table)


def test_catalogs_this_facefind_cannot_read_say_what_to_run(
    catalog_backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import facefind.db.schema as dbc

    _v1_catalog(tmp_path)
    now = dbc.SCHEMA_VERSION
    monkeypatch.setattr(dbc, "SCHEMA_VERSION", now + 1)  # a newer facefind without a step from now
    with pytest.raises(CatalogError, match=rf"schema version {now}, which this facefind cannot upgrade to "
                                           rf"{now + 1}: re-index into a new --index folder$"):
        Catalog.open(tmp_path / "index")
    monkeypatch.setattr(dbc, "SCHEMA_VERSION", now)
    cat = Catalog.open(tmp_path / "index")
    with cat._writer.begin() as conn:  # as a newer facefind leaves it
        conn.execute(sa.update(dbc.meta_table).where(dbc.meta_table.c.key == "schema_version")
                     .values(value=str(now + 2)))
    cat.close()
    with pytest.raises(CatalogError, match=rf"schema version {now + 2}, written by a newer facefind .*pip install -U facefind\)$"):
        Catalog.open(tmp_path / "index")


def _v1_metadata() -> sa.MetaData:
    """The catalog schema exactly as facefind 0.1 (schema version 1) created it, frozen here on
    purpose: it must never follow later edits of db/schema.py, so that the tests below prove a
    real v1 (and v2) catalog still opens after every future schema change."""
    md = sa.MetaData()
    sa.Table("meta", md, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False))
    sa.Table("images", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("path", sa.Text, nullable=False, unique=True), sa.Column("size", sa.BigInteger, nullable=False),
             sa.Column("mtime", sa.Float, nullable=False), sa.Column("width", sa.Integer),
             sa.Column("height", sa.Integer), sa.Column("added", sa.Float, nullable=False), sqlite_autoincrement=True)
    sa.Table("models", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("sha256", sa.String(64), nullable=False, unique=True),
             sa.Column("arch", sa.String(128), nullable=False), sa.Column("attributes", sa.JSON, nullable=False),
             sa.Column("thresholds", sa.JSON, nullable=False), sa.Column("embedding_dim", sa.Integer, nullable=False),
             sa.Column("checkpoint", sa.Text), sa.Column("meta", sa.JSON), sa.Column("created", sa.Float, nullable=False),
             sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"), sqlite_autoincrement=True)
    sa.Table("predictions", md,
             sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("probs", sa.LargeBinary, nullable=False), sa.Column("embedding", sa.LargeBinary, nullable=False),
             sa.Index("ix_predictions_image", "image_id"))
    sa.Table("label_sets", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("key", sa.String(64), nullable=False, unique=True), sa.Column("names", sa.JSON, nullable=False))
    sa.Table("labels", md,
             sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("label_set_id", sa.Integer, sa.ForeignKey("label_sets.id"), nullable=False),
             sa.Column("values", sa.LargeBinary, nullable=False))
    sa.Table("failures", md, sa.Column("path", sa.Text, primary_key=True), sa.Column("reason", sa.Text, nullable=False),
             sa.Column("at", sa.Float, nullable=False))
    sa.Table("runs", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")),
             sa.Column("root", sa.Text, nullable=False), sa.Column("started", sa.Float, nullable=False),
             sa.Column("finished", sa.Float), sa.Column("status", sa.String(16), nullable=False),
             sa.Column("counts", sa.JSON), sa.Column("timings", sa.JSON), sa.Column("host", sa.String(255)),
             sa.Column("pid", sa.Integer), sqlite_autoincrement=True)
    return md


def _create_v1(url: str) -> None:
    md = _v1_metadata()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(md.tables["meta"].insert(), [{"key": "schema_version", "value": "1"},
                                                  {"key": "catalog_id", "value": "v1catalog"}])
        conn.execute(md.tables["images"].insert(), {"path": "/x/a.jpg", "size": 1, "mtime": 1.0, "added": 1.0})
    engine.dispose()


def _create_v2(url: str) -> dict[str, np.ndarray]:
    """A v2 catalog (v1 plus ``identities`` keyed by image, frozen like v1) holding one model's
    predictions of three files, a descriptor for the first, and the id of a fourth, pruned file
    used up; returns the stored probabilities by path."""
    md = _v1_metadata()
    sa.Table("identities", md,
             sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("descriptor", sa.LargeBinary))
    t = md.tables
    rng = np.random.default_rng(7)
    probs = {p: rng.random(K, dtype=np.float32) for p in ("/x/a.jpg", "/x/b.jpg", "/x/c.jpg")}
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(t["meta"].insert(), [{"key": "schema_version", "value": "2"},
                                          {"key": "catalog_id", "value": "v2catalog"}])
        model = conn.execute(t["models"].insert().values(
            sha256="a" * 64, arch="r", attributes=NAMES, thresholds=[0.5] * K, embedding_dim=D, created=1.0,
            generation=3)).inserted_primary_key[0]
        for path in [*probs, "/x/pruned.jpg"]:
            image = conn.execute(t["images"].insert().values(path=path, size=1, mtime=1.0, added=1.0)
                                 ).inserted_primary_key[0]
            if path in probs:
                conn.execute(t["predictions"].insert().values(model_id=model, image_id=image,
                                                              probs=probs[path].tobytes(),
                                                              embedding=np.ones(D, np.float32).tobytes()))
        conn.execute(t["images"].delete().where(t["images"].c.path == "/x/pruned.jpg"))
        conn.execute(t["identities"].insert(), [{"image_id": 1, "descriptor": np.full(128, 0.5, np.float32).tobytes()},
                                                {"image_id": 2, "descriptor": None}])
    engine.dispose()
    return probs


def test_a_v2_catalog_upgrades_to_one_face_per_file_keeping_ids(
    catalog_backend, tmp_path: Path
) -> None:
    """v2 -> v3 turns every image into one whole-file face with the image's own id, moves
    predictions and descriptors onto it, leaves the model's generation (so snapshots stay valid),
    and continues the face ids after the images' (a pruned id included): a new file's face id is
    its image id on both backends."""
    url = catalog_backend.url_for(tmp_path / "index")
    (tmp_path / "index").mkdir()
    probs = _create_v2(url)
    cat = Catalog(url)
    stamp, preds = cat.export(1)
    assert stamp == 3 and preds.ids.tolist() == [1, 2, 3] and preds.image_ids.tolist() == [1, 2, 3]
    assert preds.paths == list(probs) and preds.faces.tolist() == [0, 0, 0] and (preds.boxes == -1).all()
    for i, path in enumerate(probs):
        np.testing.assert_array_equal(preds.probs[i], probs[path])
    assert preds.has_identity.tolist() == [True, False, False] and preds.identity[0, 0] == 0.5
    assert identity_count(cat) == (2, 1)
    assert cat.known_files(1, identity=True) == {"/x/a.jpg": (1, 1.0), "/x/b.jpg": (1, 1.0)}
    cat.write_batch(1, rows_for(["/x/new.jpg"]))
    ids, paths = cat.export(1)[1].ids.tolist(), cat.export(1)[1].paths
    assert dict(zip(paths, ids))["/x/new.jpg"] == 5  # after the pruned image's 4, as images.id is
    with cat._reader.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM images WHERE path = '/x/new.jpg'")).scalar() == 5
    cat.close()


def test_a_v1_catalog_opens_with_this_facefind(catalog_backend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A catalog written by facefind's first schema opens (upgraded by MIGRATIONS when the schema
    has moved on) and then has exactly the tables and columns of a new catalog. A version bump
    without a step fails here with the one-line message instead."""
    url = catalog_backend.url_for(tmp_path / "index")
    (tmp_path / "index").mkdir()
    _create_v1(url)
    old = Catalog(url)
    assert old.catalog_id == "v1catalog" and old.image_paths() == ["/x/a.jpg"]
    fresh = Catalog(f"sqlite:///{tmp_path / 'fresh.db'}" if catalog_backend.is_sqlite
                    else request.getfixturevalue("pg_server").create_database())
    assert _columns(old) == _columns(fresh)
    old.close()
    fresh.close()


# ------------------------------------------------------------------------------------ faces


def _faces(path: str, boxes: list[tuple[int, int, int, int]], seed: int = 0, size: int = 100,
           mtime: float = 1.0, identity: bool = False) -> list[IndexedImage]:
    rng = np.random.default_rng(seed)
    return [IndexedImage(path, size, mtime, 640, 480, rng.random(K, dtype=np.float32),
                         rng.standard_normal(D, dtype=np.float32), face=i, box=box, described=identity,
                         identity=np.full(128, i, np.float32) if identity else None)
            for i, box in enumerate(boxes)]


def test_each_face_of_a_photo_is_an_entry_with_its_box(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, _faces("/p/group.jpg", [(10, 20, 60, 60), (200, 30, 40, 40)])
                        + rows_for(["/p/crop.jpg"]))
    stamp, preds = catalog.export(model)
    assert preds.paths == ["/p/group.jpg", "/p/group.jpg", "/p/crop.jpg"]
    assert preds.faces.tolist() == [0, 1, 0] and preds.image_ids[0] == preds.image_ids[1] != preds.image_ids[2]
    assert preds.boxes.tolist() == [[10, 20, 60, 60], [200, 30, 40, 40], [-1, -1, -1, -1]]
    assert len(set(preds.ids.tolist())) == 3
    assert catalog.known_files(model) == {"/p/group.jpg": (100, 1.0), "/p/crop.jpg": (100, 1.0)}
    info = catalog.info(model)
    assert (info["images"], info["faces"], info["predictions"]) == (2, 3, 3)


def test_a_changed_photo_replaces_all_of_its_faces(catalog: Catalog, model: int) -> None:
    """Faces it still has keep their ids (by number) with new boxes and predictions; faces it no
    longer has go, with their predictions, descriptors and other models' predictions; every
    model that lost a prediction gets a new generation."""
    other = catalog.register_model("b" * 64, "r", NAMES, [0.5] * K, D, None)
    three = _faces("/p/g.jpg", [(0, 0, 50, 50), (60, 0, 40, 40), (120, 0, 35, 35)], identity=True)
    catalog.write_batch(model, three)
    catalog.write_batch(other, _faces("/p/g.jpg", [(0, 0, 50, 50), (60, 0, 40, 40), (120, 0, 35, 35)]))
    before = catalog.export(model)[1]
    other_stamp = catalog.stamp(other)
    one = _faces("/p/g.jpg", [(5, 5, 52, 52)], seed=1, size=200, mtime=2.0, identity=True)
    catalog.write_batch(model, one)
    stamp, after = catalog.export(model)
    assert after.ids.tolist() == before.ids[:1].tolist()  # face 0 keeps its id
    assert after.boxes.tolist() == [[5, 5, 52, 52]]
    np.testing.assert_array_equal(after.probs[0], one[0].probs)
    assert after.has_identity.tolist() == [True] and identity_count(catalog) == (1, 1)
    assert len(catalog.export(other)[1].ids) == 0  # the other model described the old content
    assert catalog.stamp(other) > other_stamp
    with catalog._reader.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM faces")).scalar() == 1


def test_an_unchanged_photo_written_again_keeps_its_faces(catalog: Catalog, model: int) -> None:
    rows = _faces("/p/g.jpg", [(0, 0, 50, 50), (60, 0, 40, 40)])
    catalog.write_batch(model, rows)
    first = catalog.export(model)[1]
    catalog.write_batch(model, rows)
    again = catalog.export(model)[1]
    assert again.ids.tolist() == first.ids.tolist() and again.boxes.tolist() == first.boxes.tolist()


def test_labels_describe_whole_file_entries_only(catalog: Catalog, model: int) -> None:
    """Ground truth is per file: a CelebA crop's labels belong to its one entry; a photo's faces
    (with boxes) are not what the file's labels describe."""
    crop, photo = rows_for(["/d/000001.jpg"])[0], _faces("/d/000002.jpg", [(0, 0, 40, 40), (50, 0, 40, 40)])
    crop.labels = np.array([1, -1, 1, -1, 1])
    for r in photo:
        r.labels = np.array([-1, -1, -1, -1, -1])
    catalog.write_batch(model, [crop, *photo], label_names=NAMES)
    ids, matrix = catalog.labels_for(NAMES)
    preds = catalog.export(model)[1]
    assert ids.tolist() == [int(preds.ids[preds.paths.index("/d/000001.jpg")])]
    assert matrix.tolist() == [[1, 0, 1, 0, 1]]


def test_prune_forgets_every_face_of_a_gone_file(catalog: Catalog, model: int) -> None:
    catalog.write_batch(model, _faces("/p/g.jpg", [(0, 0, 50, 50), (60, 0, 40, 40)], identity=True)
                        + rows_for(["/p/keep.jpg"]))
    assert catalog.prune(["/p/g.jpg"]) == 1
    assert catalog.export(model)[1].paths == ["/p/keep.jpg"]
    with catalog._reader.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM faces")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM identities")).scalar() == 0


def test_a_failed_batch_leaves_none_of_a_files_faces(catalog: Catalog, model: int, monkeypatch) -> None:
    """Kill safety per face: the faces, predictions and descriptors of a batch commit together, so
    a batch that fails after its faces were written leaves no face of its files behind."""
    catalog.write_batch(model, rows_for(["/p/before.jpg"]))

    def fail(*_args: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(Catalog, "_bump", staticmethod(fail))  # the transaction's last step
    with pytest.raises(RuntimeError, match="power cut"):
        catalog.write_batch(model, _faces("/p/g.jpg", [(0, 0, 50, 50), (60, 0, 40, 40)], identity=True))
    monkeypatch.undo()
    assert catalog.export(model)[1].paths == ["/p/before.jpg"]
    with catalog._reader.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM faces")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM images")).scalar() == 1


def test_catalog_bench_writes_every_row_directly_through_the_writer_stage_and_from_two_processes(
        tmp_path: Path) -> None:
    """`facefind bench catalog`'s three write figures each come from n rows that really landed."""
    from facefind.retrieval.bench.catalog import run_catalog_bench  # the bench imports the indexer (torch)

    result = run_catalog_bench([], n=600, d=16, batch_size=64, query_runs=1, out=tmp_path, writers=2)
    (row,) = result["catalogs"]
    assert row["rows_per_second"] > 0 and row["writer_stage_rows_per_second"] > 0
    assert row["sharded_rows_per_second"] > 0 and row["sharded_speedup"] > 0
    with Catalog(f"sqlite:///{tmp_path / 'index-0' / 'catalog.db'}") as cat:
        assert [m["predictions"] for m in cat.info()["models"]] == [600, 600, 600]
        assert len(cat.image_paths()) == 3 * 600


def test_labels_and_splits_reach_the_export_aligned_with_its_rows(catalog: Catalog, model: int) -> None:
    """A batch large enough for PostgreSQL's COPY path; two label sets with different names; files
    without labels. The export's (L, N) labels hold -1 wherever a row has no such label."""
    rng = np.random.default_rng(4)
    rows = rows_for([f"/data/{i:03d}.jpg" for i in range(70)])
    first, second = ["A", "B"], ["B", "C", "D"]
    for i, r in enumerate(rows[:40]):
        r.labels, r.split = rng.integers(0, 2, 2), i % 3
    catalog.write_batch(model, rows[:50], label_names=first)   # 40 labelled, 10 not
    for r in rows[50:]:
        r.labels = rng.integers(0, 2, 3)                         # labelled, no split
    catalog.write_batch(model, rows[50:], label_names=second)
    preds = catalog.export(model)[1]
    assert preds.label_names == ["A", "B", "C", "D"]
    at = {p: i for i, p in enumerate(preds.paths)}
    for r in rows:
        col = preds.labels[:, at[r.path]].tolist()
        if r.labels is None:
            assert col == [-1, -1, -1, -1]
        elif len(r.labels) == 2:
            assert col == [*r.labels.tolist(), -1, -1]
        else:
            assert col == [-1, *r.labels.tolist()]
        assert preds.splits[at[r.path]] == (-1 if r.split is None else r.split)


def test_export_of_detected_faces_with_labels_beside_them_carries_no_labels(catalog: Catalog, model: int) -> None:
    """Labels describe whole files; an index of detected faces (every entry boxed) has none to show,
    and its export must still work (it raised IndexError once)."""
    rows = rows_for(["/photos/a.jpg", "/photos/b.jpg"])
    for r in rows:
        r.box, r.labels = (1, 2, 30, 40), np.ones(2, np.int8)
    catalog.write_batch(model, rows, label_names=["A", "B"])
    preds = catalog.export(model)[1]
    assert len(preds.ids) == 2 and preds.labels is None and preds.splits is None
