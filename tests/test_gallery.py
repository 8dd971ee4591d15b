"""The HTML gallery: self-contained, well-formed, escaped, robust to missing images."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefind.db.errors import FacefindError
from facefind.db.snapshot import Snapshot
from facefind.retrieval.engine import Engine
from facefind.retrieval.gallery import write_gallery


class PageParser(HTMLParser):
    """Collects tags, images, cards, chips and text; checks that every opened tag is closed."""

    VOID = {"meta", "img", "br", "link"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.cards: list[dict[str, str]] = []
        self.chips_on: list[str] = []
        self.missing = 0
        self.text: list[str] = []
        self._chip_on = False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        classes = a.get("class", "").split()
        if tag == "img":
            self.images.append(a)
        if "card" in classes:
            self.cards.append(a)
        if "missing" in classes:
            self.missing += 1
        self._chip_on = "chip" in classes and "on" in classes
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._chip_on:
            self.chips_on.append(data)
            self._chip_on = False


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (178, 218), colour).save(path, format="JPEG")


@pytest.fixture()
def result(tmp_path: Path):
    folder = tmp_path / "faces"
    folder.mkdir()
    names = ["a.jpg", 'we<ird> & "odd" é.jpg', "gone.jpg", "broken.jpg"]
    for i, name in enumerate(names[:2]):
        _image(folder / name, (40 * i, 100, 200))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    paths = [str(folder / n) for n in names]
    probs = np.array([[0.9, 0.8, 0.95, 0.7], [0.1, 0.2, 0.3, 0.4], [0.99, 0.6, 0.2, 0.9]],
                     np.float32)
    snap = Snapshot(model_id=1, stamp=1, attributes=["Eyeglasses", "Male", "Smiling"],
                    thresholds=np.full(3, 0.5, np.float32), ids=np.arange(1, 5),
                    probs=probs, emb=np.eye(4, 8, dtype=np.float16), paths=paths)
    return Engine(snap).query("Eyeglasses and not Male", limit=10)


def test_gallery_is_well_formed_and_self_contained(tmp_path: Path, result) -> None:
    out = write_gallery(tmp_path / "out" / "g.html", result, thumbnail_size=64)
    page = out.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert len(parser.cards) == result.total == 4
    assert [c["data-id"] for c in parser.cards] == [str(h.id) for h in result.hits]
    assert len(parser.images) == 2 and parser.missing == 2
    for img in parser.images:  # embedded, decodable, shrunk to the requested size
        assert img["src"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert max(thumb.size) == 64
    assert "http://" not in page and "https://" not in page and "<link" not in page
    text = " ".join(parser.text)
    assert "Eyeglasses and not Male" in text
    assert "4 of 4 images match" in text
    assert "#1" in text and "#4" in text
    assert any(c.startswith("Eyeglasses") for c in parser.chips_on)
    assert any(c.startswith("not Male") for c in parser.chips_on)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_paths_and_queries_are_escaped(tmp_path: Path, result) -> None:
    hostile = type(result)(total=result.total, n_indexed=result.n_indexed, hits=result.hits,
                           expression="Male<script>alert(1)</script>", ranking="confidence")
    page = write_gallery(tmp_path / "g.html", hostile, title='a "title" & <b>').read_text("utf-8")
    assert "<script>" not in page and "<b>" not in page
    parser = PageParser()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags
    text = "".join(parser.text)
    assert "Male<script>alert(1)</script>" in text  # shown literally, not interpreted
    assert 'we<ird> & "odd" é.jpg' in text
    assert 'a "title" & <b>' in text


def test_empty_result_and_overwrite(tmp_path: Path, result) -> None:
    target = tmp_path / "g.html"
    target.write_text("old")
    empty = type(result)(total=0, n_indexed=4, hits=[], expression="Bald", ranking="confidence")
    page = write_gallery(target, empty).read_text("utf-8")
    assert "0 of 4 images match" in page and "old" not in page
    parser = PageParser()
    parser.feed(page)
    assert parser.cards == []


def test_page_offsets_number_the_ranks(tmp_path: Path, result) -> None:
    page2 = type(result)(total=result.total, n_indexed=4, hits=result.hits[:1],
                         expression=result.expression, ranking="confidence", offset=20)
    text = write_gallery(tmp_path / "g.html", page2).read_text("utf-8")
    assert "#21" in text and "showing ranks 21-21" in text


def test_chips_say_what_their_number_is_the_probability_of(tmp_path: Path, result) -> None:
    parser = PageParser()
    parser.feed(write_gallery(tmp_path / "g.html", result).read_text("utf-8"))
    first = result.hits[0]  # a.jpg: Eyeglasses 0.90, Male 0.10, Smiling 0.99 (the fixture's probabilities)
    assert Path(first.path).name == "a.jpg"
    assert parser.chips_on[:2] == ["Eyeglasses 0.90", "not Male (Male 0.10)"]
    assert not any("·" in chip for chip in parser.chips_on)
    assert "Smiling 0.99" in parser.text  # an unmatched confident attribute: name and its probability
    engine_result = type(result)(total=1, n_indexed=4, hits=[replace(first, matched=["Smiling > 0.5"])],
                                 expression="Smiling > 0.5", ranking="confidence")
    parser = PageParser()
    parser.feed(write_gallery(tmp_path / "h.html", engine_result).read_text("utf-8"))
    assert parser.chips_on == ["Smiling > 0.5 (Smiling 0.99)"]


def test_tiny_thumbnails_are_refused(tmp_path: Path, result) -> None:
    with pytest.raises(FacefindError, match="too small"):
        write_gallery(tmp_path / "g.html", result, thumbnail_size=2)
