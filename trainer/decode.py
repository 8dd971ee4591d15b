"""The one image decoder: file -> RGB uint8 pixels at the model's size, the same for every caller.

The training cache (``facefind.trainer.data``), the indexer's workers (``facefind.indexer.routing``), ``predict`` and
``similar`` all decode through this module, so a model is trained on exactly the pixels it is later
indexed and queried with. The contract:

- ``decode_rgb(path or bytes)`` -> RGB uint8 (H, W, 3): EXIF orientation applied; CMYK, greyscale,
  palette and 16-bit converted; alpha composited on neutral grey (``BACKGROUND``); animated files
  read at their first frame; files over ``MAX_FILE_BYTES`` or ``max_pixels`` refused unread.
  A file that cannot be an image raises ``Unreadable`` whose text is a one-line reason
  ('empty file', 'truncated JPEG', 'not an image (text file)', 'decompression bomb (N pixels)', ...).
- ``resize_chw(rgb, size)`` -> uint8 (3, h, w) with ``facefind.trainer.model.resize_images``.
- ``decode_file(path, size)`` is the two together.

Pillow is the reference decoder. Plain JPEGs (``plain_jpeg``: complete, RGB or greyscale, no EXIF
rotation, within the pixel cap) take torchvision's libjpeg-turbo instead, which gives the very same
pixels (tests/test_reader.py checks it) at about twice the speed; the training cache decodes whole
datasets, so that matters. The CUDA variant, ``decode_jpegs_on_device``, decodes plain JPEGs with
nvJPEG in one batched call; it promises the CPU pixels within ``DEVICE_TOLERANCE`` (mean absolute
difference per image, in 0..255 levels, at the model's size: a different IDCT and chroma upsampling).

numpy and Pillow load with this module; torch and torchvision only when pixels are resized or a JPEG
takes the fast path, so importing it costs a query nothing.
"""

from __future__ import annotations

import errno
import io
import os
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facefind.db.errors import ImageError

if TYPE_CHECKING:
    import torch


BACKGROUND = (128, 128, 128)  # what transparent pixels become: neutral grey, no colour cast
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# Larger files are refused unread: even an uncompressed 32-bit BMP at DEFAULT_MAX_PIXELS is ~360 MB,
# and reading a renamed video or disk image whole would exhaust memory.
MAX_FILE_BYTES = 512 << 20
# nvJPEG against the CPU decoder: the largest mean absolute difference per image (0..255 levels)
# that ``decode_jpegs_on_device`` allows itself, at the model's size (tests/test_reader.py, cuda).
DEVICE_TOLERANCE = 3.0

# Leading bytes of the formats we accept, to name the format of a file that fails to decode.
_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "WebP": (b"RIFF",),
}
_BOMB = re.compile(r"\((\d+) pixels\)")
_ORIENTATION = 0x0112
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


# torchvision 0.29 deprecates its decoders in favour of torchcodec; they remain the fastest offline
# choice here, and the warning would repeat for every image. (A filter set once: a catch_warnings
# block per image cost more than the decode's resize.)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class Unreadable(Exception):
    """A file cannot become an image; ``str(err)`` is the one-line reason recorded for it."""


# --------------------------------------------------------------------------------------------
# the contract


def decode_file(path: str | os.PathLike[str], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image file -> uint8 (3, h, w) at ``size`` = (h, w); raises Unreadable(reason)."""
    return resize_chw(decode_rgb(os.fspath(path), max_pixels), size)


def decode_paths(paths: Sequence[Path], size: Sequence[int]) -> np.ndarray:
    """``decode_file`` over ``paths`` into one uint8 (N, 3, h, w) array; an unreadable file is an ImageError.

    This is what the training cache stores, chunk by chunk.
    """
    out = np.empty((len(paths), 3, int(size[0]), int(size[1])), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_file(path, size)
        except Unreadable as err:
            raise ImageError(f"cannot decode image {path}: {err}") from None
    return out


def decode_rgb(source: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, libjpeg: bool = True) -> np.ndarray:
    """One image file (a path, or its bytes) -> RGB uint8 (H, W, 3); raises Unreadable(reason).

    ``libjpeg=False`` decodes plain JPEGs with Pillow too (the same pixels, ~2x slower), for
    callers that must not import torch (``facefind query --gallery``).
    """
    data = read_bytes(source) if isinstance(source, str) else source
    if libjpeg and plain_jpeg(data, max_pixels) is not None:
        chw = _libjpeg(data)
        if chw is not None:
            return chw.permute(1, 2, 0).numpy()
    return _pillow(data, max_pixels)


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """``decode_rgb`` for one-off images (``predict``, ``similar``): an unreadable file is an ImageError."""
    try:
        return decode_rgb(os.fspath(path))
    except Unreadable as err:
        raise ImageError(f"cannot read image {path}: {err}") from None


def resize_chw(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (3, h, w) with the trainer's resize (antialiased bilinear)."""
    chw = rgb.transpose(2, 0, 1)
    if not chw.flags.writeable:
        chw = chw.copy()  # Pillow's arrays are read-only
    if chw.shape[1:] == (int(size[0]), int(size[1])):
        return np.ascontiguousarray(chw)
    import torch  # torch-free module (query's gallery): see the module docstring

    from facefind.trainer.model import resize_images

    # Any memory layout: torch's uint8 resize gives the same pixels for a strided view as for a copy.
    return resize_images(torch.from_numpy(chw)[None], size)[0].numpy()


def plain_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG that libjpeg alone decodes exactly as Pillow would, else None.

    Only complete 8-bit baseline/progressive JPEGs in YCbCr/RGB or greyscale with no EXIF rotation
    qualify; the rest (CMYK, rotated, truncated, garbage after the end marker, other formats) go
    through Pillow. This is also what may go to nvJPEG on a GPU. It reads the markers up to the
    first scan only (a tenth of what Pillow's header parse costs).
    """
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    dims: tuple[int, int] | None = None
    seen_exif = False
    pos, end = 2, len(data)
    try:
        while pos + 4 <= end:
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            length = struct.unpack_from(">H", data, pos + 2)[0]
            body = data[pos + 4:pos + 2 + length]
            if marker == 0xDA:  # start of scan: the header is over
                break
            if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman
                precision, height, width, components = struct.unpack_from(">BHHB", body)
                if precision != 8 or components not in (1, 3) or width * height == 0:
                    return None
                dims = (width, height)
            elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return None  # lossless, hierarchical or arithmetic-coded: Pillow decides
            elif marker == 0xE1 and body.startswith(b"Exif\0\0") and not seen_exif:
                seen_exif = True  # Pillow reads the first EXIF block only
                if _exif_orientation(body[6:]) not in (None, 1):
                    return None
            elif marker == 0xE1 and body.startswith(b"http://ns.adobe.com/xap/1.0/"):
                found = _XMP_ORIENTATION.search(body)  # Pillow honours an XMP orientation too
                if found is not None and found.group(2) != b"1":
                    return None
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if dims is None or dims[0] * dims[1] > max_pixels:
        return None
    return dims


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of an EXIF block's first IFD (None when absent); struct.error when malformed."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        raise struct.error("not a TIFF header")
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    count = struct.unpack_from(order + "H", tiff, ifd)[0]
    for i in range(count):
        tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * i)
        if tag == _ORIENTATION:
            if kind != 3:  # SHORT
                raise struct.error("orientation is not a SHORT")
            return int(struct.unpack_from(order + "H", value)[0])
    return None


# --------------------------------------------------------------------------------------------
# the decoders behind it


def _libjpeg(data: bytes) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode of a ``plain_jpeg``: uint8 (3, H, W), or None when it refuses."""
    import torch  # torch-free module: see the module docstring
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None  # Pillow decides, and names the reason


def _pillow(data: bytes, max_pixels: int) -> np.ndarray:
    """The reference decoder: Pillow, EXIF applied, any mode converted by ``to_rgb``."""
    if not data:
        raise Unreadable("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF, palette transparency, big images
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise Unreadable(_bomb_reason(str(err))) from None
        except UnidentifiedImageError:
            raise Unreadable(unidentified_reason(data)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:  # a broken header
            raise Unreadable(_decode_reason(_sniff(data) or "image", err)) from None
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise Unreadable(f"decompression bomb ({pixels} pixels)")
        if pixels == 0:
            raise Unreadable("image has no pixels (0 width or height)")
        fmt = img.format or _sniff(data) or "image"
        try:
            img.seek(0)  # animated GIF/WebP/PNG: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return np.asarray(to_rgb(img), dtype=np.uint8)
        except Image.DecompressionBombError as err:
            raise Unreadable(_bomb_reason(str(err))) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
            raise Unreadable(_decode_reason(fmt, err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled to 8, alpha composited on ``BACKGROUND``."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError:
        raise Unreadable(f"unsupported colour mode {img.mode}") from None


def read_bytes(path: str) -> bytes:
    """A file's bytes, refused unread beyond ``MAX_FILE_BYTES``; OS errors become Unreadable(reason)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            # read(n) allocates n bytes up front: ask for the file's size, +1 to see one that grew.
            data = fh.read(size + 1) if size <= MAX_FILE_BYTES else b""
            if len(data) > size:  # growing (or a special file): read on, up to the cap
                data += fh.read(MAX_FILE_BYTES + 1 - len(data))
    except OSError as err:
        is_link = os.path.islink(path)
        if err.errno == errno.ENOENT and not is_link:
            raise Unreadable("file vanished") from None
        if err.errno == errno.EISDIR:
            raise Unreadable("is a folder") from None
        raise Unreadable(os_error_reason(err, is_link)) from None
    if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
        raise Unreadable(f"file too large for an image ({max(size, len(data)) / 2**20:,.0f} MiB, "
                         f"limit {MAX_FILE_BYTES >> 20} MiB)")
    return data


def os_error_reason(err: OSError, is_link: bool) -> str:
    """The one-line reason for an OS error met while finding or opening an image file."""
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno == errno.ENOENT:
        return "dangling symlink" if is_link else "file vanished"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot stat ({err.strerror})"


def _sniff(data: bytes) -> str | None:
    """The format named by the file's first bytes; a file shorter than a signature matches its prefix."""
    for name, signatures in _MAGIC.items():
        for sig in signatures:
            if data.startswith(sig) or (len(data) < len(sig) and sig.startswith(data)):
                if name == "WebP" and len(data) >= 12 and data[8:12] != b"WEBP":
                    continue
                return name
    return None


def unidentified_reason(data: bytes) -> str:
    """Why bytes that Pillow cannot identify are no image: truncated or corrupt (a known signature),
    a text file, or not an image."""
    fmt = _sniff(data)
    if fmt is not None:
        return f"truncated {fmt}" if len(data) < 1024 else f"corrupt {fmt} header"
    head = data[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "not an image (text file)"
    return "not an image"


def _decode_reason(fmt: str, err: Exception) -> str:
    msg = str(err)
    if "truncated" in msg.lower() or isinstance(err, EOFError):
        return f"truncated {fmt}"
    if isinstance(err, Unreadable):
        return msg
    return f"corrupt {fmt} ({msg[:80]})" if msg else f"corrupt {fmt}"


def _bomb_reason(msg: str) -> str:
    found = _BOMB.search(msg)
    return f"decompression bomb ({found.group(1)} pixels)" if found else "decompression bomb"


# --------------------------------------------------------------------------------------------
# the CUDA variant (nvJPEG)


def decode_jpegs_on_device(
    jpegs: Sequence[bytes], size: Sequence[int], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """``plain_jpeg`` files decoded on ``device`` and resized: the CPU contract within ``DEVICE_TOLERANCE``.

    The bytes go to nvJPEG in one batched call; when it refuses the batch, each file is tried alone,
    and the ones it still refuses are decoded here by ``decode_rgb``. Returns (indices of the decoded
    files, uint8 (n, 3, h, w) on ``device`` in that order, (index, reason) of the unreadable ones).
    On a CPU ``device`` this runs the same code with torchvision's CPU decoder (exact pixels).
    """
    import torch  # torch-free module: see the module docstring
    from torchvision.io import ImageReadMode, decode_jpeg

    from facefind.trainer.model import resize_images

    h, w = int(size[0]), int(size[1])
    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    decoded: list[torch.Tensor | None] = []
    if raw:
        try:
            decoded = list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            for one in raw:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
    ok: list[int] = []
    images: list[torch.Tensor] = []
    failures: list[tuple[int, str]] = []
    for i, img in enumerate(decoded):
        if img is None:  # nvJPEG refused it: the CPU decoder decides
            try:
                img = torch.from_numpy(resize_chw(decode_rgb(jpegs[i], max_pixels), (h, w))).to(device)
            except Unreadable as err:
                failures.append((i, str(err)))
                continue
        ok.append(i)
        images.append(img)
    if not images:
        return ok, torch.zeros((0, 3, h, w), dtype=torch.uint8, device=device), failures
    if all(im.shape == images[0].shape for im in images):
        return ok, resize_images(torch.stack(images), (h, w)), failures  # CelebA: one shape, one call
    return ok, torch.cat([resize_images(im[None], (h, w)) for im in images]), failures

