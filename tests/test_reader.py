"""The reader stage alone: discovery, skipping unchanged files, every kind of bad input, and the
one pixel contract (``facefind.trainer.decode``) that the training cache, the indexer and ``predict`` share.

``build_corpus`` writes the corrupt-input corpus of issue 7 (item 1); ``test_indexer.py`` runs the
whole indexer over it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefind.db.errors import DatasetError
from facefind.indexer.discovery import FileEntry, discover, split_unchanged
from facefind.indexer.reader import ImageReader
from facefind.indexer.routing import Jpegs, Pixels, decode_files
from facefind.trainer.decode import BACKGROUND
from helpers import ODD, blob_face, build_corpus, jpeg_bytes  # tests/ is on sys.path (pytest's prepend import mode)

SIZE = (32, 24)  # (h, w): small, not square, so transposed dimensions would show


def _decode_all(folder: Path, workers: int = 0) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, tuple[int, int]]]:
    found = discover(folder)
    with ImageReader(SIZE, batch_size=7, workers=workers) as reader:
        batches = list(reader.batches(found.files))
    assert all(isinstance(b.payload, Pixels) for b in batches)  # no GPU: every batch decoded on the CPU
    pixels = {Path(e.path).name: p for b in batches for e, p in zip(b.entries, b.payload.array)}
    sizes = {Path(e.path).name: s for b in batches for e, s in zip(b.entries, b.sizes)}
    reasons = {Path(f.path).name: f.reason for b in batches for f in b.failures}
    reasons.update({Path(f.path).name: f.reason for f in found.failures})
    return pixels, reasons, sizes


def test_corpus_every_kind_is_decoded_or_named(tmp_path: Path) -> None:
    expect = build_corpus(tmp_path / "corpus")
    pixels, reasons, sizes = _decode_all(tmp_path / "corpus")
    assert set(pixels) | set(reasons) == set(expect), "every file is accounted for, nothing else"
    assert not set(pixels) & set(reasons)
    for name, reason in expect.items():
        if reason is None:
            assert name in pixels, f"{name!r} failed: {reasons.get(name)}"
            assert pixels[name].shape == (3, *SIZE) and pixels[name].dtype == np.uint8
        else:
            assert reasons.get(name) == reason, name

    # The conversions are right, not merely non-crashing.
    alpha = pixels["alpha.png"]
    assert tuple(alpha[:, 16, 2]) == (255, 0, 0)  # opaque red on the left
    assert tuple(alpha[:, 16, -2]) == BACKGROUND  # transparent -> neutral grey
    assert pixels["sixteen_bit.png"].min() == 255  # 65535 scaled to 255, not clipped from 65535 % 256
    assert tuple(pixels["animated.gif.jpg"][:, 16, 12]) == (0, 200, 0)  # the first frame
    assert tuple(pixels["animated.webp"][:, 16, 12]) == (0, 200, 0)
    grey = pixels["grey.JPG"].astype(int)
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    assert sizes["exif_rotated.jpeg"] == (20, 40)  # (width, height) after rotation
    rot = pixels["exif_rotated.jpeg"].astype(int)
    assert rot[0, 4, 12] > 200 and rot[2, 4, 12] < 60  # red on top after the 90-degree turn
    assert rot[2, -4, 12] > 200 and rot[0, -4, 12] < 60  # blue below
    cmyk = pixels["cmyk.jpg"].astype(int)
    ref = pixels["with space.jpg"].astype(int)
    assert np.abs(cmyk - ref).mean() < 12  # CMYK converted back to the same colours
    assert sizes["one_pixel.bmp"] == (1, 1)


def test_file_vanishing_between_discovery_and_reading(tmp_path: Path) -> None:
    for i in range(3):
        blob_face(i).save(tmp_path / f"{i}.jpg")
    found = discover(tmp_path)
    os.remove(tmp_path / "1.jpg")
    [batch] = decode_files(found.files, SIZE)
    assert [Path(e.path).name for e in batch.entries] == ["0.jpg", "2.jpg"]
    assert [(Path(f.path).name, f.reason) for f in batch.failures] == [("1.jpg", "file vanished")]


def test_discover_extensions_recursion_and_paths(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "e.BMP", "sub/f.jpg", "sub/deeper/g.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "h.gif").write_bytes(b"x")  # not an extension we index
    os.symlink(tmp_path, tmp_path / "sub" / "back")  # a folder symlink loop must not be followed
    flat = discover(tmp_path)
    assert [Path(f.path).name for f in flat.files] == ["a.JPG", "b.jpeg", "c.Png", "d.webp", "e.BMP"]
    deep = discover(tmp_path / "sub" / ".." , recursive=True)
    assert len(deep.files) == 7
    assert all(os.path.isabs(f.path) and ".." not in f.path for f in deep.files)
    assert all(f.size == 1 for f in deep.files)


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        discover(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        discover(tmp_path / "file.jpg")


def test_split_unchanged() -> None:
    files = [FileEntry("/a.jpg", 10, 1.5), FileEntry("/b.jpg", 10, 1.5), FileEntry("/c.jpg", 10, 1.5)]
    known = {"/a.jpg": (10, 1.5), "/b.jpg": (11, 1.5), "/c.jpg": (10, 2.5), "/gone.jpg": (1, 1.0)}
    todo, unchanged = split_unchanged(files, known)
    assert unchanged == 1
    assert [f.path for f in todo] == ["/b.jpg", "/c.jpg"]


def test_worker_processes_match_in_process(tmp_path: Path) -> None:
    for i in range(20):
        blob_face(i).save(tmp_path / f"{i:02d}.jpg")
    (tmp_path / "05.jpg").write_bytes(b"")
    single, single_fail, _ = _decode_all(tmp_path, workers=0)
    multi, multi_fail, _ = _decode_all(tmp_path, workers=2)
    assert single_fail == multi_fail == {"05.jpg": "empty file"}
    assert list(single) == list(multi)  # same order
    for name in single:
        np.testing.assert_array_equal(single[name], multi[name])


# -- one pixel contract (facefind.trainer.decode) ------------------------------------------------------

PLAIN = {"with space.jpg", "grey.JPG", "ünïcødé 顔.jpg", "good_link.jpg", "new\nline.jpg"}


def test_training_cache_indexer_and_predict_see_the_same_pixels(tmp_path: Path) -> None:
    """EXIF-rotated, RGBA, CMYK, 16-bit, greyscale and palette files: the training cache, the
    indexer's reader and ``predict`` get identical pixels, and the right ones."""
    from helpers import tiny_checkpoint
    from facefind.trainer.data import build_cache
    from facefind.indexer.predict import Predictor

    folder = tmp_path / "corpus"
    build_corpus(folder)
    paths = [folder / name for name in ODD]
    size = (32, 32)
    cache = build_cache(paths, size, root=folder, cache_dir=tmp_path / "cache", workers=2)
    with ImageReader(size, batch_size=4, workers=2) as reader:
        batches = list(reader.batches(discover(folder).files))
    indexed = {Path(e.path).name: p for b in batches for e, p in zip(b.entries, b.payload.array)}
    predictor = Predictor(tiny_checkpoint(tmp_path / "m.pt", ["A", "B"], size=32), "cpu")
    for i, name in enumerate(ODD):
        predicted, box = predictor.prepare(predictor.decode(str(paths[i])), name, detect_face=False)
        assert box is None
        np.testing.assert_array_equal(cache.images[i], indexed[name], err_msg=f"cache vs index: {name}")
        np.testing.assert_array_equal(predicted, indexed[name], err_msg=f"predict vs index: {name}")

    # The right pixels, not merely the same ones: the old training decoder ignored EXIF and alpha.
    rot = cache.images[ODD.index("exif_rotated.jpeg")].astype(int)
    assert rot[0, 3, 16] > 200 and rot[2, 3, 16] < 60  # red on top after the 90-degree turn
    assert rot[2, -3, 16] > 200 and rot[0, -3, 16] < 60  # blue below
    alpha = cache.images[ODD.index("alpha.png")]
    assert tuple(alpha[:, 16, 2]) == (255, 0, 0) and tuple(alpha[:, 16, -2]) == BACKGROUND
    assert cache.images[ODD.index("sixteen_bit.png")].min() == 255


def test_exif_rotated_training_images_match_upright_ones(tmp_path: Path) -> None:
    """Faces stored upside down with an EXIF 'rotate 180' tag (as every viewer shows them upright)
    train on the upright pixels: exactly for lossless PNG, to JPEG re-encoding noise for JPEG."""
    from facefind.trainer.data import build_cache

    up, flipped = tmp_path / "upright", tmp_path / "flipped"
    up.mkdir()
    flipped.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees to display
    for i in range(4):
        face = blob_face(i, size=(48, 64))
        face.paste((0, 0, 0), (0, 0, 16, 16))  # a dark top-left corner: upside down shows
        face.save(up / f"{i}.png")
        face.rotate(180).save(flipped / f"{i}.png", exif=exif.tobytes())
        face.save(up / f"{i}.jpg", quality=95)
        face.rotate(180).save(flipped / f"{i}.jpg", quality=95, exif=exif.tobytes())
    names = [f"{i}.{ext}" for i in range(4) for ext in ("png", "jpg")]
    a = build_cache([up / n for n in names], (32, 24), root=up, cache_dir=tmp_path / "cache").images
    b = build_cache([flipped / n for n in names], (32, 24), root=flipped, cache_dir=tmp_path / "cache").images
    for i, name in enumerate(names):
        upright, shown = a[i].astype(int), b[i].astype(int)
        if name.endswith(".png"):
            np.testing.assert_array_equal(shown, upright, err_msg=name)
        else:
            assert np.abs(shown - upright).mean() < 2, name
        assert np.abs(upright[:, ::-1, ::-1] - upright).mean() > 10  # upside down would show


def test_plain_jpegs_skip_pillow_for_the_same_pixels(tmp_path: Path) -> None:
    """Plain JPEGs are decoded by libjpeg directly (twice Pillow's speed): exactly Pillow's pixels.
    Everything Pillow must handle itself (EXIF or XMP rotation, CMYK, damage, other formats) is
    not plain, and is decoded as Pillow shows it."""
    from PIL import ImageOps

    from facefind.trainer.decode import decode_rgb, plain_jpeg

    folder = tmp_path / "corpus"
    expect = build_corpus(folder)
    face = blob_face(7, size=(178, 218))
    extra = {"progressive.jpg": (jpeg_bytes(face, progressive=True), True),
             "exif_upright.jpg": (jpeg_bytes(face, exif=_orientation(1)), True),
             "exif_180.jpg": (jpeg_bytes(face, exif=_orientation(3)), False),
             "xmp_180.jpg": (jpeg_bytes(face, xmp=_XMP % b"3"), False),
             "xmp_upright.jpg": (jpeg_bytes(face, xmp=_XMP % b"1"), True)}
    for name, (data, _) in extra.items():
        (folder / name).write_bytes(data)
    readable = [n for n, reason in expect.items() if reason is None] + list(extra)
    plain = {n for n in readable if plain_jpeg((folder / n).read_bytes()) is not None}
    assert plain == PLAIN | {n for n, (_, p) in extra.items() if p}
    for name in readable:
        with Image.open(folder / name) as img:
            img.seek(0)
            shown = ImageOps.exif_transpose(img)
            if shown.mode in ("RGB", "L"):  # Pillow's own view of the file, no conversion of ours
                np.testing.assert_array_equal(decode_rgb(str(folder / name)), np.asarray(shown.convert("RGB")),
                                              err_msg=name)
    assert plain_jpeg((folder / "progressive.jpg").read_bytes()) == (178, 218)


_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%s"/></rdf:RDF></x:xmpmeta>')


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_device_route_carries_plain_jpegs_as_bytes(tmp_path: Path) -> None:
    """With ``gpu_jpeg`` a chunk splits into a Pixels batch (decoded on the CPU, with every failure)
    and a Jpegs batch of the plain JPEGs; decoding the Jpegs batch (here with torchvision's CPU
    decoder, on a GPU with nvJPEG) gives the CPU route's pixels."""
    import torch

    from facefind.indexer.routing import on_device

    expect = build_corpus(tmp_path / "corpus")
    files = discover(tmp_path / "corpus").files
    [plain] = decode_files(files, SIZE)
    cpu, device = decode_files(files, SIZE, gpu_jpeg=True)
    assert isinstance(cpu.payload, Pixels) and isinstance(device.payload, Jpegs)
    assert {Path(e.path).name for e in device.entries} == PLAIN
    assert cpu.failures == plain.failures and not device.failures
    rows, pixels, failures = on_device(device, SIZE, torch.device("cpu"))
    entries = rows.entries
    assert failures == [] and entries == device.entries and rows.sizes == device.sizes
    assert pixels.shape == (len(entries), 3, *SIZE) and pixels.dtype == torch.uint8
    reference = {e.path: p for e, p in zip(plain.entries, plain.payload.array)}
    for entry, image in zip(entries, pixels.numpy()):
        np.testing.assert_array_equal(image, reference[entry.path])
    assert len(cpu.entries) + len(entries) == sum(1 for r in expect.values() if r is None)


@pytest.mark.cuda
def test_nvjpeg_gives_the_cpu_pixels_within_the_stated_tolerance(tmp_path: Path) -> None:
    """The CUDA variant's promise (``facefind.trainer.decode.DEVICE_TOLERANCE``), on CelebA-like JPEGs at
    the native size (no resize) and at a model size; a damaged file nvJPEG refuses still gets the
    CPU decoder's reason."""
    import torch

    from facefind.trainer.decode import DEVICE_TOLERANCE, decode_file, decode_jpegs_on_device
    from facefind.trainer.synth import synthesize

    synthesize(tmp_path / "s", n=24, seed=3)
    paths = sorted((tmp_path / "s" / "img_align_celeba").glob("*.jpg"))
    data = [p.read_bytes() for p in paths]
    broken = data[0][:600] + b"\xff\xd9"  # ends like a JPEG, but most of the scan is missing
    for size in ((218, 178), (64, 64)):
        ok, pixels, bad = decode_jpegs_on_device(data + [broken], size, torch.device("cuda"))
        assert pixels.is_cuda and pixels.shape == (len(ok), 3, *size)
        assert ok[:len(paths)] == list(range(len(paths)))
        assert len(ok) + len(bad) == len(paths) + 1
        for i, image in zip(ok, pixels.cpu().numpy()):
            if i < len(paths):
                diff = np.abs(image.astype(int) - decode_file(paths[i], size).astype(int)).mean()
                assert diff <= DEVICE_TOLERANCE, (paths[i].name, size, diff)


class CrashOnRed:
    """A 'face finder' that kills its process on pure red images, like a decoder segfault would."""

    identity = False

    def __call__(self, rgb: np.ndarray) -> list:
        from facefind.indexer.faces.detect import FaceEntry

        if (rgb[..., 0] == 255).all() and (rgb[..., 1] == 0).all():
            os._exit(3)
        return [FaceEntry(0, None, rgb)]


def test_a_crashing_decoder_costs_only_its_file(tmp_path: Path) -> None:
    for i in range(8):
        blob_face(i).save(tmp_path / f"{i}.png")
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "3.png")
    with ImageReader(SIZE, batch_size=4, workers=2, faces=CrashOnRed()) as reader:
        batches = list(reader.batches(discover(tmp_path).files))
    done = [Path(e.path).name for b in batches for e in b.entries]
    failed = [(Path(f.path).name, f.reason) for b in batches for f in b.failures]
    assert failed == [("3.png", "decoder crashed on this file")]
    assert done == [f"{i}.png" for i in range(8) if i != 3]  # order kept around the crash


class ThreeFaces:
    """A 'face finder' that sees three faces in every image: crops of its left, middle and right."""

    identity = True

    def __call__(self, rgb: np.ndarray) -> list:
        from facefind.indexer.faces.detect import FaceEntry

        w = rgb.shape[1] // 3
        return [FaceEntry(i, (i * w, 0, w, rgb.shape[0]), rgb[:, i * w:(i + 1) * w], np.full(128, i, np.float32))
                for i in range(3)]


def test_a_files_faces_are_rows_of_one_batch(tmp_path: Path) -> None:
    """Each face becomes a row (the file repeated, its number, box and descriptor beside it), and
    a file's rows are never split between batches, whatever the workers: the writer commits all of
    a file's faces in one transaction."""
    for i in range(7):
        blob_face(i).save(tmp_path / f"{i}.png")
    with ImageReader(SIZE, batch_size=3, workers=2, faces=ThreeFaces()) as reader:
        batches = list(reader.batches(discover(tmp_path).files))
    assert [len(b) for b in batches] == [9, 9, 3]
    for b in batches:
        names = [Path(e.path).name for e in b.entries]
        assert all(names[i:i + 3] == [names[i]] * 3 for i in range(0, len(names), 3))
        assert [f[0] for f in b.rows.faces] == [0, 1, 2] * (len(b) // 3)
        assert [int(v[0]) for v in b.rows.identities] == [0, 1, 2] * (len(b) // 3)
        assert b.payload.array.shape == (len(b), 3, *SIZE)
    assert sorted({Path(e.path).name for b in batches for e in b.entries}) == [f"{i}.png" for i in range(7)]
