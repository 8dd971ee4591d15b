"""Prefixed literals: ``label:NAME``, ``split:train|val|test`` and ``person:ID|NAME`` in expressions.

The oracles are plain Python loops over the arrays the snapshot was built from, never the engine.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from facefind.db.catalog import Catalog
from facefind.db.errors import QuerySyntaxError
from facefind.db.snapshot import Snapshot, load_snapshot
from facefind.retrieval.engine import Engine
from facefind.retrieval.query import Tag, name_resolver, parse

NAMES = ["Eyeglasses", "Male", "Smiling"]
N = 400


def _world(seed: int = 3) -> tuple[Snapshot, dict]:
    """A snapshot whose labels, splits and persons are drawn at random, with every row known."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, size=(len(NAMES), N)).astype(np.float32)
    labels = (rng.uniform(0, 1, size=(len(NAMES), N)) < 0.4).astype(np.int8)
    labels[:, rng.uniform(0, 1, N) < 0.2] = -1           # a fifth of the entries carry no labels
    splits = rng.integers(-1, 3, N).astype(np.int8)
    persons = rng.integers(-1, 5, N).astype(np.int32)
    emb = rng.standard_normal((N, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(10, 10 + N, dtype=np.int64)
    snap = Snapshot(model_id=1, stamp=1, attributes=list(NAMES), thresholds=np.full(3, 0.5, np.float32),
                    ids=ids, probs=probs, emb=emb.astype(np.float16), paths=[f"/img/{i}.jpg" for i in ids],
                    label_attributes=["Male", "Eyeglasses", "Smiling"],  # another order than the model's
                    labels=labels[[1, 0, 2]], splits=splits, persons=persons,
                    person_names={2: "Ada Lovelace", 3: "Grace"})
    return snap, {"probs": probs, "labels": labels, "splits": splits, "persons": persons, "ids": ids}


def _matching(world: dict, keep) -> set[int]:
    return {int(world["ids"][i]) for i in range(N) if keep(i)}


def _all_ids(result) -> set[int]:
    return {h.id for h in result.hits}


def test_label_and_prediction_literals_mix_and_unlabelled_entries_never_match() -> None:
    snap, w = _world()
    eng = Engine(snap)
    p, lab = w["probs"], w["labels"]  # rows in NAMES order: Eyeglasses, Male, Smiling
    cases = {  # expression: (who matches, the label row it names)
        "label:Eyeglasses and not Eyeglasses": (lambda i: lab[0, i] == 1 and p[0, i] < 0.5, 0),
        "Eyeglasses and not label:Eyeglasses": (lambda i: lab[0, i] == 0 and p[0, i] >= 0.5, 0),
        "not label:Male": (lambda i: lab[1, i] == 0, 1),
        "label:smiling or Male > 0.9": (lambda i: lab[2, i] == 1 or (lab[2, i] >= 0 and p[1, i] > 0.9), 2),
    }
    for expr, (keep, row) in cases.items():
        result = eng.query(expr, limit=N)
        assert _all_ids(result) == _matching(w, keep), expr
        assert result.total == len(_matching(w, keep))
        assert result.labelled == int((lab[row] >= 0).sum())
    assert eng.query("Male", limit=0).labelled is None  # said only where labels were asked for


def test_disagreement_query_ranks_the_surest_prediction_first_and_labels_add_no_margin() -> None:
    snap, w = _world()
    probs = w["probs"].copy()
    flipped = 77  # labelled as wearing glasses, and the model is certain it does not
    w["labels"][0, flipped] = 1
    probs[0, flipped] = 0.001
    snap = dataclasses.replace(snap, probs=probs, labels=w["labels"][[1, 0, 2]])
    result = Engine(snap).query("label:Eyeglasses and not Eyeglasses", limit=5)
    assert result.hits[0].id == int(w["ids"][flipped])
    # The score is the margin of `not Eyeglasses` alone: logit(0.5) - logit(p).
    expected = -np.log(0.001 / 0.999)
    assert result.hits[0].score == pytest.approx(expected, rel=1e-4)
    assert result.hits[0].matched == ["label:Eyeglasses", "not Eyeglasses"]
    only_labels = Engine(snap).query("label:Eyeglasses", limit=3)
    assert [h.score for h in only_labels.hits] == [0.0, 0.0, 0.0]
    assert [h.id for h in only_labels.hits] == sorted(h.id for h in only_labels.hits)  # ties by id


def test_split_and_person_literals_select_what_was_recorded() -> None:
    snap, w = _world()
    eng = Engine(snap)
    s, per = w["splits"], w["persons"]
    assert _all_ids(eng.query("split:val", limit=N)) == _matching(w, lambda i: s[i] == 1)
    assert _all_ids(eng.query("not split:train", limit=N)) == _matching(w, lambda i: s[i] in (1, 2))
    assert _all_ids(eng.query("person:3 and Smiling", limit=N)) == _matching(
        w, lambda i: per[i] == 3 and w["probs"][2, i] >= 0.5)
    by_name = eng.query('person:"ada lovelace"', limit=N)
    assert _all_ids(by_name) == _matching(w, lambda i: per[i] == 2)
    assert _all_ids(eng.query("person:Grace", limit=N)) == _matching(w, lambda i: per[i] == 3)
    assert by_name.hits[0].matched == ['person:"Ada Lovelace"']


@pytest.mark.parametrize("expr, message", [
    ("label:Eyeglass", "unknown label 'Eyeglass'; did you mean Eyeglasses?"),
    ("lable:Male", "unknown prefix lable: did you mean label:?"),
    ("split:validation", "unknown split 'validation'"),
    ("label:Male > 0.5", "label: literals are true or false"),
    ("person:Grase", "no person named 'Grase'; did you mean Grace?"),
    ("person:99", "no person 99 in this index"),
    ("Male and label:", "expected a value after 'label:'"),
])
def test_bad_prefixed_literals_get_one_line_with_a_way_out(expr: str, message: str) -> None:
    eng = Engine(_world()[0])
    with pytest.raises(QuerySyntaxError) as err:
        eng.query(expr)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_index_without_labels_splits_or_persons_says_how_to_get_them() -> None:
    snap, _ = _world()
    bare = Engine(dataclasses.replace(snap, label_attributes=None, labels=None, splits=None, persons=None))
    for expr, message in [("label:Male", "index an annotated folder"),
                          ("split:val", "partition file (list_eval_partition.txt)"),
                          ("person:1", "run `facefind index FOLDER --identity`")]:
        with pytest.raises(QuerySyntaxError, match=None) as err:
            bare.query(expr)
        assert message in str(err.value), expr
    no_splits = Engine(dataclasses.replace(snap, splits=np.full(N, -1, np.int8)))
    with pytest.raises(QuerySyntaxError, match="records no splits"):
        no_splits.query("split:test")


def test_the_grammar_reads_and_prints_prefixed_literals() -> None:
    tags = {"label": name_resolver(["Male"], "label"), "person": lambda text: (text, 7)}
    node = parse('label:male and not (person:"Ada L" or Male)', ["Male"], tags)
    assert str(node) == 'label:Male and not (person:"Ada L" or Male)'
    assert node.children[0] == Tag("label", "Male", 0)
    with pytest.raises(QuerySyntaxError, match="attribute names take no quotes"):
        parse('"Male"', ["Male"], tags)
    with pytest.raises(QuerySyntaxError, match="this index has nothing for split: literals"):
        parse("split:val", ["Male"], tags)


def test_index_records_labels_and_splits_in_the_snapshot_and_query_reads_them(web_index, tmp_path) -> None:
    """An annotated synthetic folder indexed end to end: the snapshot carries each file's labels and
    the split from list_eval_partition.txt, and `facefind query` filters on them (without torch)."""
    partition = dict(line.split() for line in (web_index.root / "list_eval_partition.txt").read_text().splitlines()
                     if line.strip())
    with Catalog.open(web_index.index, create=False) as catalog:
        model_id = catalog.latest_model().id
    snap = load_snapshot(web_index.index, model_id)
    assert snap.label_attributes == web_index.attributes
    by_path = dict(zip(snap.paths, range(len(snap.ids))))
    for path, truth in web_index.labels.items():
        row = by_path[path]
        assert [bool(v) for v in snap.labels[:, row]] == [truth[a] for a in snap.label_attributes]
        assert int(snap.splits[row]) == int(partition[path.rsplit("/", 1)[1]])

    attr = web_index.attributes[0]
    expected = sorted(web_index.ids[p] for p, truth in web_index.labels.items()
                      if truth[attr] and partition[p.rsplit("/", 1)[1]] == "0")
    code = ("import json, sys; from facefind.retrieval.cli import main; "
            f"sys.argv = ['facefind', 'query', 'label:{attr} and split:train', '--index', {str(web_index.index)!r},"
            " '--json', '--limit', '1000']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'query imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert sorted(h["id"] for h in result["hits"]) == expected
    assert result["labelled"] == len(web_index.labels)


def test_query_table_says_how_many_images_carry_the_labels(web_index) -> None:
    from typer.testing import CliRunner

    from facefind.retrieval.cli import app

    attr = web_index.attributes[1]
    out = CliRunner().invoke(app, ["query", f"not label:{attr}", "--index", str(web_index.index)])
    assert out.exit_code == 0, out.output
    wanted = sum(1 for truth in web_index.labels.values() if not truth[attr])
    assert f"{wanted:,} of {len(web_index.ids):,} images match" in out.output
    assert f"label: literals read the {len(web_index.labels):,} images that carry those labels" in out.output


def test_names_that_need_quotes_print_so_they_parse_back() -> None:
    snap, w = _world()
    eng = Engine(dataclasses.replace(snap, person_names={2: "Zoë Ng", 3: 'Grace "Amazing" H'}))
    for pid, name in ((2, "Zoë Ng"), (3, 'Grace "Amazing" H')):
        node = eng.parse(str(Tag("person", name, pid)))
        assert node == Tag("person", name, pid)
    with pytest.raises(QuerySyntaxError, match="no person named"):
        eng.query('person:"²"')  # a digit to isdigit(), not an id


def test_an_in_memory_snapshot_of_a_read_only_index_keeps_labels_and_splits(web_index, tmp_path, monkeypatch) -> None:
    """Where the snapshot cannot be written (a read-only index), the one built in memory must still
    answer label: and split: (it once left them out)."""
    import contextlib
    import shutil

    from facefind.db.snapshot import sync, sync_snapshot

    index = tmp_path / "index"
    shutil.copytree(web_index.index, index)
    for gen in index.glob("model-*"):
        shutil.rmtree(gen)  # no snapshot: it must be rebuilt, and cannot be saved
    monkeypatch.setattr(sync, "writer_lock", lambda folder: contextlib.nullcontext(False))
    with Catalog.open(index, create=False) as catalog:
        snap = sync_snapshot(catalog, index)
    assert snap.folder is None and snap.label_attributes == web_index.attributes
    attr = web_index.attributes[0]
    total = Engine(snap).query(f"label:{attr} and split:train", limit=0).total
    partition = dict(line.split() for line in (web_index.root / "list_eval_partition.txt").read_text().splitlines()
                     if line.strip())
    assert total == sum(1 for p, truth in web_index.labels.items()
                        if truth[attr] and partition[p.rsplit("/", 1)[1]] == "0")
