"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import html.parser
import http.client
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlencode

import numpy as np
from PIL import Image


def tiny_checkpoint(path: Path, attributes: Sequence[str], *, calibrate: Sequence[Path] | None = None,
                    size: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """Save a freshly initialised mobilenet_v3_small checkpoint (``size`` px, ``dim``-d embedding).

    Indexing does not care what a model learned, but similarity and attribute tests do: with
    ``calibrate``, BatchNorm statistics and median thresholds come from those images, so that
    embeddings differ between faces and each attribute splits them.
    """
    import torch
    from torch import nn

    from facefind.trainer.checkpoint import CheckpointMeta, save_checkpoint
    from facefind.trainer.decode import decode_paths
    from facefind.trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model, preprocess

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(attributes), embedding_dim=dim)
    meta = CheckpointMeta(arch="mobilenet_v3_small", attributes=list(attributes), img_size=(size, size),
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding_dim=dim, dropout=0.3,
                          thresholds=[0.5] * len(attributes))
    if calibrate:
        x = preprocess(torch.from_numpy(decode_paths(list(calibrate), (size, size))), meta)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # running stats = this batch's
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            probs = torch.sigmoid(model(x)[0]).numpy()
        meta.thresholds = [float(t) for t in np.median(probs, axis=0)]
    return save_checkpoint(path, model, meta)


@dataclass(frozen=True)
class Built:
    """A small synthetic index built by ``facefind index``, and what it stored, read back."""

    root: Path
    images: list[Path]
    model: Path
    index: Path
    attributes: list[str]
    thresholds: dict[str, float]
    ids: dict[str, int]                 # path -> catalog id
    probs: dict[str, dict[str, float]]  # path -> attribute -> stored probability
    labels: dict[str, dict[str, bool]]  # path -> attribute -> ground truth


def build_synthetic_index(base: Path, n: int, seed: int = 5,
                          adjust: Callable[[Path, Sequence[str]], None] | None = None) -> Built:
    """``n`` synthetic faces -> a calibrated tiny checkpoint (``adjust(path, attributes)`` may rewrite
    it) -> ``index_folder`` into ``base/index``, with every stored probability and label read back."""
    from facefind.db.catalog import Catalog
    from facefind.indexer.pipeline import index_folder
    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.synth import synthesize

    root = base / "celeba"
    synthesize(root, n=n, seed=seed)
    ann = read_attributes(root / "list_attr_celeba.txt")
    images = sorted((root / "img_align_celeba").glob("*.jpg"))
    model = tiny_checkpoint(base / "model.pt", ann.attributes, calibrate=images)
    if adjust is not None:
        adjust(model, ann.attributes)
    report = index_folder(root / "img_align_celeba", model, base / "index", device="cpu", workers=0)
    assert report.indexed == n and report.labelled == n
    with Catalog.open(base / "index", create=False) as catalog:
        record = catalog.latest_model()
        preds = catalog.export(record.id)[1]
    probs = {p: dict(zip(record.attributes, row.tolist())) for p, row in zip(preds.paths, preds.probs)}
    labels = {str(root / "img_align_celeba" / name): dict(zip(ann.attributes, (row > 0).tolist()))
              for name, row in zip(ann.names, ann.labels)}
    return Built(root, images, model, base / "index", list(ann.attributes),
                 dict(zip(record.attributes, record.thresholds)),
                 dict(zip(preds.paths, preds.ids.tolist())), probs, labels)


# -- the small indexes the web tests share (built once per run: tests/conftest.py) ---------------

HISTORY = [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "val_loss": 0.72 - 0.08 * e,
            "val": {"mean_accuracy": 0.6 + 0.05 * e, "macro_f1": 0.2 + 0.04 * e}} for e in (1, 2, 3)]


def build_index(base: Path, n: int = 40, seed: int = 5) -> Built:
    """Synthetic faces -> a calibrated tiny checkpoint (with history and metrics) -> `facefind index`."""
    return build_synthetic_index(base, n, seed, adjust=_with_history)


@dataclass(frozen=True)
class People:
    """A small index built with identity descriptors (``index --identity``)."""

    index: Path
    ids: dict[str, int]  # path -> catalog id
    original: Path       # a synthetic face (an aligned crop) ...
    other: Path          # ... and the same face in another photo
    faceless: Path       # an aligned-size image with no face: indexed, without a descriptor


def another_photo(face: Path) -> bytes:
    """``face`` in another photo: pasted onto a larger canvas of another colour (a PNG), so that it
    is found by face detection, as in any photo, instead of being read as an aligned crop."""
    from PIL import Image

    canvas = Image.new("RGB", (420, 320), (40, 90, 160))
    with Image.open(face) as img:
        canvas.paste(img.convert("RGB"), (96, 40))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def build_people_index(base: Path, b: Built, same: int, n: int = 12) -> People:
    """``n`` of ``b``'s faces, another photo of face ``same`` and a faceless image, indexed with
    ``b``'s model and identity descriptors (the hook `facefind index --identity` uses)."""
    from PIL import Image

    from facefind.db.catalog import Catalog
    from facefind.indexer.pipeline import index_folder
    from facefind.indexer.routing import FaceFinder

    folder = base / "photos"
    folder.mkdir()
    for path in b.images[:n]:
        shutil.copy(path, folder / path.name)
    original, other, faceless = folder / b.images[same].name, folder / "another-photo.png", folder / "faceless.jpg"
    other.write_bytes(another_photo(original))
    Image.new("RGB", (178, 218), (128, 128, 128)).save(faceless)
    report = index_folder(folder, b.model, base / "index", device="cpu", workers=0, faces=FaceFinder(identity=True))
    assert report.indexed == n + 2 and report.identity["no_face"] >= 1
    with Catalog.open(base / "index", create=False) as catalog:
        preds = catalog.export(catalog.latest_model().id)[1]
    ids = dict(zip(preds.paths, preds.ids.tolist()))
    described = dict(zip(preds.paths, preds.has_identity.tolist()))
    assert described[str(original)] and described[str(other)] and not described[str(faceless)]
    return People(base / "index", ids, original, other, faceless)


@dataclass(frozen=True)
class PhotoIndex:
    """Composed group photos (helpers.compose_photos) indexed by `index --detect-faces --identity`."""

    photos: Photos
    index: Path
    hits: list[dict]  # every entry, as `query --json` lists them
    report: dict      # what `index --json` said

    def of(self, name: str) -> list[dict]:
        """The entries of the file ``name``, by face number."""
        return sorted((h for h in self.hits if Path(h["path"]).name == name), key=lambda h: h["face"])


def build_photo_index(base: Path) -> PhotoIndex:
    """A group photo of three faces, a pair, a faceless photo and an aligned crop, indexed one entry
    per face (6 entries) through the CLI."""
    photos = compose_photos(base)
    report = _cli_json("index", photos.folder, "--model", photos.model, "--index", base / "index",
                      "--workers", "0", "--detect-faces", "--identity")
    assert (report["indexed"], report["faces"]) == (3, 6), report
    hits = _cli_json("query", "--index", base / "index", "--limit", "100")["hits"]
    return PhotoIndex(photos, base / "index", hits, report)


def _with_history(path: Path, attributes: Sequence[str]) -> None:
    """Give the checkpoint what training records: two threshold sets, their stats, history, metrics."""
    from facefind.trainer.checkpoint import load_model, save_checkpoint

    model, meta = load_model(path)
    meta.threshold_sets = {"accuracy": list(meta.thresholds),  # two sets that differ, as training keeps
                           "f1": [max(0.0, t - 0.05) for t in meta.thresholds]}
    meta.threshold_stats = {name: {m: [0.5] * len(attributes) for m in ("precision", "recall", "f1")}
                            for name in meta.threshold_sets}
    meta.history = HISTORY
    meta.epoch, meta.best_epoch = 3, 3
    meta.val_metrics = {"mean_accuracy": 0.75, "macro_f1": 0.32, "per_attribute": {
        a: {"accuracy": 0.5 + i / 100, "f1": 0.3, "average_precision": 0.4, "support": 5, "threshold": 0.5}
        for i, a in enumerate(attributes)}}
    save_checkpoint(path, model, meta)


def _cli_json(*args: str | Path) -> dict:
    """``facefind ARGS --json``, which must succeed; its output parsed."""
    from typer.testing import CliRunner

    from facefind.retrieval.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- the corrupt-input corpus of issue 7 (test_reader, test_indexer, test_predict) -------------

def jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    """``img`` as JPEG bytes (quality 90; ``kw`` as for Pillow's save: exif, progressive, ...)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def blob_face(seed: int = 0, size: tuple[int, int] = (60, 72)) -> Image.Image:
    """A (width, height) ``size`` picture: a block of colour on a background, distinct per seed."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = rng.integers(40, 220, 3, dtype=np.uint8)
    arr[size[1] // 4: size[1] // 2, size[0] // 4: 3 * size[0] // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(arr)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny IDAT: a bomb-sized header, cheaply."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build_corpus(folder: Path) -> dict[str, str | None]:
    """Write one file per bad-input kind; map file name -> expected failure reason, None = indexable."""
    folder.mkdir(parents=True, exist_ok=True)
    face = blob_face(1)
    good = jpeg_bytes(face)
    expect: dict[str, str | None] = {}

    def put(name: str, data: bytes, reason: str | None) -> None:
        (folder / name).write_bytes(data)
        expect[name] = reason

    put("empty.jpg", b"", "empty file")
    for cut in (1, 20, 300, len(good) // 2, len(good) - 2):
        put(f"truncated_{cut}.jpg", good[:cut], "truncated JPEG")
    put("garbage_appended.jpg", good + os.urandom(0) + bytes(range(256)) * 8, None)
    put("random_bytes.jpg", np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "not an image")
    put("text.jpg", b"this is not a picture\nat all\n" * 20, "not an image (text file)")

    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (20, 0, 40, 30))  # right half fully transparent
    buf = io.BytesIO(); rgba.save(buf, "PNG"); put("alpha.png", buf.getvalue(), None)
    la = Image.new("LA", (20, 20), (200, 0))
    buf = io.BytesIO(); la.save(buf, "PNG"); put("grey_alpha.png", buf.getvalue(), None)
    sixteen = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    buf = io.BytesIO(); sixteen.save(buf, "PNG"); put("sixteen_bit.png", buf.getvalue(), None)
    pal = face.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO(); pal.save(buf, "GIF"); put("palette.gif.png", buf.getvalue(), None)  # a GIF named .png
    buf = io.BytesIO(); pal.save(buf, "PNG", transparency=0); put("palette_transparent.png", buf.getvalue(), None)
    frames = [Image.new("RGB", (30, 30), c) for c in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    buf = io.BytesIO(); frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    put("animated.gif.jpg", buf.getvalue(), None)
    buf = io.BytesIO(); frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    put("animated.webp", buf.getvalue(), None)
    put("cmyk.jpg", jpeg_bytes(face.convert("CMYK")), None)
    put("grey.JPG", jpeg_bytes(face.convert("L")), None)
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif(); exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    put("exif_rotated.jpeg", jpeg_bytes(rotated, exif=exif.tobytes()), None)
    put("bomb.png", png_header_only(20_000, 20_000), "decompression bomb (400000000 pixels)")
    put("one_pixel.bmp", bmp_bytes(Image.new("RGB", (1, 1), (10, 20, 30))), None)
    put("png_named.jpg", png_bytes(face), None)
    put("with space.jpg", good, None)
    put("ünïcødé 顔.jpg", good, None)
    put("new\nline.jpg", good, None)
    (folder / "notes.txt").write_text("not an image extension: ignored")
    (folder / "folder.jpg").mkdir()  # a folder named like an image: ignored
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling.jpg")
    expect["dangling.jpg"] = "dangling symlink"
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    expect["loop_a.jpg"] = expect["loop_b.jpg"] = "symlink loop"
    os.symlink(folder / "with space.jpg", folder / "good_link.jpg")
    expect["good_link.jpg"] = None
    return expect


def png_bytes(img: Image.Image) -> bytes:
    """``img`` as PNG bytes."""
    buf = io.BytesIO(); img.save(buf, "PNG"); return buf.getvalue()


def bmp_bytes(img: Image.Image) -> bytes:
    """``img`` as BMP bytes."""
    buf = io.BytesIO(); img.save(buf, "BMP"); return buf.getvalue()


# The files the three old decoders disagreed on, and a plain JPEG.
ODD = ("exif_rotated.jpeg", "alpha.png", "cmyk.jpg", "sixteen_bit.png", "grey.JPG", "palette.gif.png",
       "palette_transparent.png", "grey_alpha.png", "with space.jpg")


# -- HTML pages (galleries) -------------------------------------------------------------------

class PageChecker(html.parser.HTMLParser):
    """Fails on unbalanced tags; collects the text and the style of positioned boxes."""

    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.boxes: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images += 1
            assert (a.get("src") or "").startswith("data:image/jpeg;base64,")
        if a.get("class") == "box":
            self.boxes.append(a.get("style") or "")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_page(path: Path) -> PageChecker:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], f"unclosed tags {checker.stack}"
    return checker


# -- crashes: indexing processes killed and resumed (test_faults, test_photo_faces, ...) ---------

def tiny_faces(folder: Path, n: int, seed: int, prefix: str = "") -> list[Path]:
    """``n`` small JPEGs (24x20, a block of colour on a background), distinct per seed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.empty((24, 20, 3), np.uint8)
        a[...] = rng.integers(0, 256, 3, dtype=np.uint8)
        a[6:12, 4:16] = rng.integers(0, 256, 3, dtype=np.uint8)
        path = folder / f"{prefix}{i:04d}.jpg"
        Image.fromarray(a).save(path, quality=85)
        out.append(path)
    return out


# A clean run and a resumed one put each file in batches of different neighbours: on the CPU a
# forward pass then differs in the last bits only (runner test: 1e-5). A row stored against the
# wrong image differs by far more (these models' outputs differ between images by >1e-3).
CLEAN_ATOL = 1e-5


def clean_predictions(folder: Path, model: Path, index_dir: Path, batch_size: int = 16):
    """The predictions of one uninterrupted in-process run of ``model`` over ``folder``, into a
    SQLite catalog of its own (whatever FACEFIND_DB says), by path."""
    from facefind.db.catalog import Catalog
    from facefind.indexer.pipeline import index_folder

    saved = os.environ.pop("FACEFIND_DB", None)
    try:
        index_folder(folder, model, index_dir, batch_size=batch_size, device="cpu", workers=0)
        with Catalog.open(index_dir, create=False) as catalog:
            return catalog.export(catalog.latest_model().id)[1]
    finally:
        if saved is not None:
            os.environ["FACEFIND_DB"] = saved


def assert_rows_match_clean_run(got, clean, atol: float = CLEAN_ATOL) -> None:
    """Every stored row (path -> probabilities and embedding) equals the clean run's to ``atol``:
    the same paths, and no row shifted against another."""
    assert sorted(got.paths) == sorted(clean.paths), "other images than the clean run"
    assert len(set(got.paths)) == len(got.paths)
    at = {p: i for i, p in enumerate(clean.paths)}
    order = np.array([at[p] for p in got.paths])
    probs_err = np.abs(got.probs - clean.probs[order]).max(axis=1)
    emb_err = np.abs(got.emb - clean.emb[order]).max(axis=1)
    bad = [got.paths[i] for i in np.flatnonzero((probs_err > atol) | (emb_err > atol))]
    assert not bad, (f"{len(bad)} rows differ from the clean run by more than {atol} "
                     f"(max {probs_err.max():.2e} / {emb_err.max():.2e}), e.g. {bad[:3]}")
    # The check can fail: the images' predictions differ from each other by far more than atol.
    spread = np.abs(clean.probs - clean.probs[np.roll(np.arange(len(order)), 1)]).max(axis=1)
    assert np.min(spread) > 100 * atol, "the model does not tell these images apart"


def live_group_members(pgid: int) -> list[int]:
    """Processes (not zombies) still in process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


def reap(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait for ``proc``; its decoder processes must exit on their own; return its exit code."""
    try:
        proc.wait(timeout=timeout)
        deadline = time.monotonic() + 15
        while live_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_group_members(proc.pid), "decoder processes outlived the indexer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def stop_when(proc: subprocess.Popen, count: Callable[[], int], at_least: int, sig: int, log: Path) -> tuple[int, str]:
    """Send ``sig`` to ``proc`` once ``count()`` (e.g. committed predictions) reaches ``at_least``,
    then ``reap`` it; return (exit code, what it wrote to ``log``)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if count() >= at_least:
            os.kill(proc.pid, sig)
            break
        time.sleep(0.01)
    return reap(proc), log.read_text()


# -- group photos composed from synthetic faces (every face of a photo is its own entry) ---------

# Where each synthetic face is pasted: (face, left, top, scale) on a light canvas.
GROUP = [(0, 20, 40, 1.0), (1, 300, 60, 1.0), (2, 560, 30, 1.25)]
PAIR = [(5, 30, 30, 1.0), (6, 260, 40, 1.0)]
Layout = Sequence[tuple[int, int, int, float]]


def compose(faces: Sequence[np.ndarray], layout: Layout, size: tuple[int, int], background: int = 235) -> np.ndarray:
    """A (height, width) photo with ``faces[i]`` (178x218 crops) pasted at each layout position."""
    from PIL import Image

    photo = np.full((*size, 3), background, np.uint8)
    for i, left, top, scale in layout:
        face = Image.fromarray(faces[i])
        if scale != 1.0:
            face = face.resize((round(178 * scale), round(218 * scale)), Image.Resampling.LANCZOS)
        arr = np.asarray(face)
        photo[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    return photo


def regions(layout: Layout) -> list[tuple[int, int, int, int]]:
    """The pasted regions (x, y, w, h) of ``layout``."""
    return [(left, top, round(178 * scale), round(218 * scale)) for _, left, top, scale in layout]


def inside(box: Sequence[int], region: tuple[int, int, int, int]) -> bool:
    """Whether a detected box's centre lies in a pasted region."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    x, y, w, h = region
    return x <= cx <= x + w and y <= cy <= y + h


@dataclass(frozen=True)
class Photos:
    """A folder of composed photos and a calibrated tiny model to index it with."""

    base: Path
    folder: Path
    faces: list[np.ndarray]  # synthetic faces HOG finds, each alone
    model: Path


def detectable_faces(base: Path, n: int = 14, seed: int = 5) -> tuple[list[np.ndarray], Path]:
    """Synthetic faces that dlib's HOG detector finds (each alone), and a tiny model calibrated on all."""
    from PIL import Image

    from facefind.indexer.faces.align import find_faces
    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.synth import synthesize

    synthesize(base / "synth", n=n, seed=seed)
    images = sorted((base / "synth" / "img_align_celeba").glob("*.jpg"))
    drawn = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    faces = [f for f in drawn if len(find_faces(f, min_size=0)) == 1]
    assert len(faces) >= 7, "HOG should detect most synthetic faces"
    ann = read_attributes(base / "synth" / "list_attr_celeba.txt")
    return faces, tiny_checkpoint(base / "model.pt", ann.attributes, calibrate=images)


def compose_photos(base: Path) -> Photos:
    """``base/photos``: a group photo of three faces (GROUP, 800x340 JPEG), a pair (PAIR, 520x300
    PNG), a photo with no face, and an aligned 178x218 crop that is also the group's first face."""
    from PIL import Image

    faces, model = detectable_faces(base)
    folder = base / "photos"
    folder.mkdir()
    Image.fromarray(compose(faces, GROUP, (340, 800))).save(folder / "group.jpg", quality=95)
    Image.fromarray(compose(faces, PAIR, (300, 520))).save(folder / "pair.png")
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(folder / "empty.jpg")
    Image.fromarray(faces[0]).save(folder / "crop.jpg", quality=95)
    return Photos(base, folder, faces, model)


# -- catalog reads and writes that only tests need -----------------------------------------------

import sqlalchemy as sa  # noqa: E402

from facefind.db.paths import normalize_path  # noqa: E402
from facefind.db.schema import identities, images  # noqa: E402


def add_labels(catalog, attribute_names: Sequence[str], by_path: dict[str, np.ndarray]) -> int:
    """Store ground-truth labels for catalogued files (``index`` stores them with each batch);
    return how many were stored. Paths not in the catalog are ignored; ``> 0`` means present."""
    wanted = {normalize_path(p): v for p, v in by_path.items()}
    with catalog._write() as conn:
        ids = dict(conn.execute(sa.select(images.c.path, images.c.id).where(images.c.path.in_(list(wanted)))).all())
        if ids:
            catalog._store_labels(conn, attribute_names, {ids[p]: (wanted[p], None) for p in ids})
    return len(ids)


def identity_count(catalog) -> tuple[int, int]:
    """``(described, with_face)``: entries ``index --identity`` looked at, and those with a face."""
    with catalog._read() as conn:
        looked = conn.execute(sa.select(sa.func.count()).select_from(identities)).scalar()
        found = conn.execute(sa.select(sa.func.count()).select_from(identities)
                             .where(identities.c.descriptor.is_not(None))).scalar()
    return int(looked or 0), int(found or 0)


# -- the API's contract: every answer a test gets is checked against /openapi.json -----------------

import httpx  # noqa: E402
import schemathesis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from schemathesis.core.transport import Response  # noqa: E402
from schemathesis.specs.openapi import checks  # noqa: E402


def serving(index: Path, thumbs: Path):
    """A TestClient of the app over ``index`` (thumbnails cached in ``thumbs``), for a fixture to yield.

    Every API answer any test gets is checked against the app's own /openapi.json (``Contract``).
    """
    from facefind.retrieval.web.app import create_app

    app = create_app(index, device="cpu", thumbs_dir=thumbs)
    with Contract(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c


class Contract(TestClient):
    """A TestClient that checks each /api/ answer against the OpenAPI document with schemathesis's
    own response checks: a documented status code, a documented content type, declared headers, a
    body of the documented schema. A test that gets an answer the document does not promise fails."""

    CHECKS = (checks.status_code_conformance, checks.content_type_conformance,
              checks.response_headers_conformance, checks.response_schema_conformance)

    def __init__(self, app, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.schema = schemathesis.openapi.from_dict(app.openapi())
        self.checked = 0

    def request(self, method, url, **kwargs):
        response = super().request(method, url, **kwargs)
        path = response.request.url.path
        operation = self.schema.find_operation_by_path(method.upper(), path) if path.startswith("/api/") else None
        if operation is not None:
            template = operation.path.strip("/").split("/")
            given = {t[1:-1]: v for t, v in zip(template, path.strip("/").split("/")) if t.startswith("{")}
            sent = response.request  # an upload's body was streamed: the checks see the request without it
            answer = httpx.Response(response.status_code, headers=response.headers, content=response.content,
                                    request=httpx.Request(sent.method, sent.url, headers=sent.headers))
            answer.elapsed = response.elapsed
            operation.Case(path_parameters=given).validate_response(Response.from_any(answer),
                                                                    checks=list(self.CHECKS))
            self.checked += 1
        return response


def serve_index(index: Path):
    """A real ``facefind serve`` over ``index`` on a free loopback port, for a fixture to yield."""
    from facefind.retrieval.bench.serve import Served

    args = [sys.executable, "-c", "from facefind.retrieval.cli import main; main()", "serve", "--index", str(index),
            "--port", "0", "--device", "cpu"]
    with Served(args, timeout=180, env={"OMP_NUM_THREADS": "1"}) as served:
        yield served


def api(server, path: str, **params) -> dict:
    """GET ``path`` from a served page's API (``serve_index``); its JSON, asserting a 200."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", path + ("?" + urlencode(params) if params else ""))
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, body
    return body
