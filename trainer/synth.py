"""Synthetic CelebA: CelebA-format folders of drawn 178x218 faces whose labels match the drawing.

The tests and the offline demo need a dataset that is small, free, reproducible, and learnable by
a small CNN on a CPU, yet read by exactly the same loader as real CelebA. ``synthesize`` writes one:

    original layout   OUT/img_align_celeba/000001.jpg ...
                      OUT/list_attr_celeba.txt      count, names, "000001.jpg -1  1 ..." (CRLF)
                      OUT/list_eval_partition.txt   "000001.jpg 0" (CRLF)
                      OUT/identity_CelebA.txt       "000001.jpg 17" (CRLF)
    kaggle layout     OUT/img_align_celeba/img_align_celeba/000001.jpg ...
                      OUT/list_attr_celeba.csv      "image_id,5_o_Clock_Shadow,...", values -1/1
                      OUT/list_eval_partition.csv   "image_id,partition"
                      OUT/identity_CelebA.txt

The text files copy the published ones byte for byte in format (CRLF, the trailing space after the
names line, values right-aligned in 2-character columns), so the loader's parser is exercised.

Attribute vectors come from a small Bayesian network whose conditional rates were measured on the
real ``list_attr_celeba.txt`` (202,599 rows) and are baked in below: prevalences and the main
dependencies (beard, moustache, goatee, necktie, make-up and lipstick on Male; Gray_Hair, Bald,
Receding_Hairline and Chubby on Young; Mouth_Slightly_Open and High_Cheekbones on Smiling;
Lipstick and Rosy_Cheeks on Heavy_Makeup; ...) resemble CelebA's. A few rules are enforced so the
labels stay true to the drawing, where CelebA's annotators were noisier: baldness excludes hair
colour and texture; a hat hides baldness, bangs and a receding hairline (but the hair at the sides
shows, so its colour stays labelled, where CelebA mostly leaves it out); at most one hair colour;
No_Beard = no full beard, goatee or moustache; no beard on women.

Rendered (a visible cue is drawn for each; 39 attributes):
    5_o_Clock_Shadow (grey stubble tint on the jaw), Arched_Eyebrows, Bags_Under_Eyes, Bald (no
    hair, shiny scalp), Bangs (fringe down to the brows), Big_Lips, Big_Nose, Black_Hair,
    Blond_Hair, Brown_Hair, Gray_Hair (hair colour; unlabelled hair is auburn/red), Blurry
    (Gaussian blur), Bushy_Eyebrows, Chubby (wide round face), Double_Chin, Eyeglasses (frames,
    sometimes dark lenses), Goatee, Heavy_Makeup (eye shadow and liner), High_Cheekbones (cheek
    highlight and shadow), Male (square jaw, short hair, broad shoulders, thick brows),
    Mouth_Slightly_Open, Mustache, Narrow_Eyes, No_Beard (full beard when false), Oval_Face
    (long narrow face), Pale_Skin, Pointy_Nose, Receding_Hairline, Rosy_Cheeks, Sideburns,
    Smiling, Straight_Hair (straight strands), Wavy_Hair (wavy outline and strands),
    Wearing_Earrings, Wearing_Hat, Wearing_Lipstick, Wearing_Necklace, Wearing_Necktie (collar
    and tie), Young (no wrinkles; old faces get forehead and smile lines).
Label-only (sampled with CelebA's correlations, nothing drawn): Attractive.

Nuisance: background colour and clutter, pose (roll, yaw, scale, shift), skin tone, hair shade,
clothes, lighting gain/bias per channel, JPEG quality 60-95. Identities: consecutive runs of 1-8
images (within one split, like CelebA's identity-disjoint partitions) share face geometry, skin,
hair and eye colours and the identity-level attributes; pose, expression, accessories and make-up
vary per image.

Every image is drawn from its own generator seeded by (seed, image id) and every identity from
(seed, identity), so the same seed gives byte-identical files whatever the order of work.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facefind.db.errors import DatasetError

log = logging.getLogger(__name__)

ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
LABEL_ONLY: frozenset[str] = frozenset({"Attractive"})
RENDERED: frozenset[str] = frozenset(ATTRIBUTES) - LABEL_ONLY
LAYOUTS: tuple[str, ...] = ("original", "kaggle")

WIDTH, HEIGHT = 178, 218
_ATTR_FILE = {"original": "list_attr_celeba.txt", "kaggle": "list_attr_celeba.csv"}
_PARTITION_FILE = {"original": "list_eval_partition.txt", "kaggle": "list_eval_partition.csv"}
_IMAGE_DIR = {"original": Path("img_align_celeba"), "kaggle": Path("img_align_celeba/img_align_celeba")}
_IDENTITY_FILE = "identity_CelebA.txt"
_MAX_RUN = 8  # images per identity: 1.._MAX_RUN
_PROGRESS_EVERY = 32

# --- attribute model: P(attr = 1 | parents), measured on the real list_attr_celeba.txt ----------
# Each entry: (name, parents, probabilities indexed by the parents' bits, first parent most
# significant). Rows are in sampling order: parents come first.
_CPT: tuple[tuple[str, tuple[str, ...], tuple[float, ...]], ...] = (
    ("Male", (), (0.4168,)),
    ("Young", ("Male",), (0.8741, 0.633)),
    ("Wearing_Hat", ("Male",), (0.0249, 0.0814)),
    ("Bald", ("Male", "Young"), (0.0003, 0.0001, 0.1223, 0.021)),  # measured without a hat
    ("Bangs", ("Male",), (0.2051, 0.0937)),  # without hat or baldness
    ("Receding_Hairline", ("Male", "Young"), (0.0834, 0.0664, 0.2476, 0.0584)),  # ... or bangs
    ("Straight_Hair", ("Male",), (0.1841, 0.2553)),  # not bald
    ("Wavy_Hair", ("Male",), (0.5391, 0.1952)),  # not bald, not straight
    ("Smiling", ("Male",), (0.5405, 0.4003)),
    ("Mouth_Slightly_Open", ("Smiling",), (0.2248, 0.7613)),
    ("High_Cheekbones", ("Male", "Smiling"), (0.1629, 0.8982, 0.0878, 0.637)),
    ("5_o_Clock_Shadow", ("Male", "No_Beard"), (0.0719, 0.0001, 0.4853, 0.1239)),
    ("Sideburns", ("Male", "No_Beard"), (0.0432, 0.0, 0.3398, 0.0024)),
    ("Heavy_Makeup", ("Male", "Young"), (0.5157, 0.6824, 0.0006, 0.004)),
    ("Wearing_Lipstick", ("Male", "Heavy_Makeup"), (0.4702, 0.9773, 0.0046, 0.594)),
    ("Rosy_Cheeks", ("Male", "Heavy_Makeup"), (0.0127, 0.1606, 0.003, 0.0214)),
    ("Arched_Eyebrows", ("Male", "Heavy_Makeup"), (0.2375, 0.5127, 0.0531, 0.1966)),
    ("Attractive", ("Male", "Young"), (0.3271, 0.7299, 0.0713, 0.3999)),
    ("Chubby", ("Male", "Young"), (0.046, 0.0073, 0.251, 0.0458)),
    ("Double_Chin", ("Male", "Chubby"), (0.0053, 0.3625, 0.0401, 0.522)),
    ("Eyeglasses", ("Male", "Young"), (0.0667, 0.0167, 0.2161, 0.0708)),
    ("Bags_Under_Eyes", ("Male", "Young"), (0.1887, 0.0894, 0.4669, 0.2795)),
    ("Big_Nose", ("Male",), (0.1023, 0.4196)),
    ("Pointy_Nose", ("Male", "Big_Nose"), (0.3755, 0.2207, 0.1896, 0.1247)),
    ("Wearing_Earrings", ("Male",), (0.3125, 0.016)),
    ("Wearing_Necklace", ("Male", "Wearing_Earrings"), (0.1704, 0.259, 0.0161, 0.1253)),
    ("Big_Lips", ("Male",), (0.3013, 0.1561)),
    ("Blurry", ("Male",), (0.0464, 0.0572)),
    ("Bushy_Eyebrows", ("Male",), (0.0692, 0.2442)),
    ("Narrow_Eyes", ("Male",), (0.1114, 0.1204)),
    ("Oval_Face", ("Male",), (0.33, 0.2199)),
    ("Pale_Skin", ("Male",), (0.0562, 0.0244)),
    ("Wearing_Necktie", ("Male",), (0.0003, 0.1741)),
)
# An attribute is forced to 0 when any attribute listed for it is 1 (what it names cannot be seen).
_EXCLUDED_BY: dict[str, tuple[str, ...]] = {
    "Bald": ("Wearing_Hat",),
    "Bangs": ("Wearing_Hat", "Bald"),
    "Receding_Hairline": ("Wearing_Hat", "Bald", "Bangs"),
    "Straight_Hair": ("_hairless",),
    "Wavy_Hair": ("_hairless", "Straight_Hair"),
}
# Hair colour given (Male, Young), not bald, one colour at most: none, black, blond, brown, gray.
_HAIR_COLOURS = (None, "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
_HAIR_P: dict[tuple[int, int], tuple[float, ...]] = {
    (0, 0): (0.3258, 0.1108, 0.2957, 0.2109, 0.0569),
    (0, 1): (0.3199, 0.2111, 0.2271, 0.2412, 0.0008),
    (1, 0): (0.45, 0.1964, 0.0182, 0.1055, 0.2298),
    (1, 1): (0.3665, 0.4109, 0.0207, 0.1983, 0.0037),
}
# Men only: P(some beard | Young) and, given a beard, its style: full, goatee, moustache, both.
_BEARD_P = (0.3634, 0.4124)
_BEARD_STYLE_P = (0.5275, 0.2268, 0.0976, 0.1481)
# What changes from one photo of a person to the next; everything else belongs to the identity.
_PER_IMAGE = frozenset({
    "Wearing_Hat", "Smiling", "Mouth_Slightly_Open", "High_Cheekbones", "5_o_Clock_Shadow",
    "Heavy_Makeup", "Wearing_Lipstick", "Rosy_Cheeks", "Eyeglasses", "Wearing_Earrings",
    "Wearing_Necklace", "Wearing_Necktie", "Blurry",
})  # fmt: skip
_HAIR_SLOT = len(_CPT)  # uniform-draw slots after the CPT rows
_BEARD_SLOT, _STYLE_SLOT = _HAIR_SLOT + 1, _HAIR_SLOT + 2
_N_SLOTS = _HAIR_SLOT + 3


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote: where, in which layout, how many images, and how long it took."""

    out: Path
    layout: str
    n: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def _sample_attributes(u_identity: np.ndarray, u_image: np.ndarray) -> dict[str, bool]:
    """Draw one attribute vector from the CelebA-like model, from two vectors of uniform draws.

    Identity-level attributes read ``u_identity`` and per-image ones (``_PER_IMAGE``) read
    ``u_image``, so the photos of one identity share its face while expression and accessories
    vary. Both arrays need ``_N_SLOTS`` values in [0, 1). Besides the 40 attributes the result
    holds ``_hairless`` (a bald identity, also under a hat, where Bald itself cannot be seen).
    """
    a: dict[str, bool] = {}
    for slot, (name, parents, probs) in enumerate(_CPT):
        if name == "5_o_Clock_Shadow":  # the first row that depends on hair and beard
            _sample_hair_and_beard(a, u_identity)
        index = 0
        for parent in parents:
            index = 2 * index + a[parent]
        draw = float(u_image[slot] if name in _PER_IMAGE else u_identity[slot]) < probs[index]
        if name == "Bald":
            a["_hairless"] = draw
        a[name] = draw and not any(a[other] for other in _EXCLUDED_BY.get(name, ()))
    return a


def _sample_hair_and_beard(a: dict[str, bool], u_identity: np.ndarray) -> None:
    """Hair colour (one at most, none when hairless) and beard style, both per identity."""
    colour = None
    if not a["_hairless"]:
        probs = _HAIR_P[(int(a["Male"]), int(a["Young"]))]
        colour = _HAIR_COLOURS[_pick(probs, float(u_identity[_HAIR_SLOT]))]
    for name in _HAIR_COLOURS[1:]:
        a[name] = name == colour
    style = -1  # -1 none, 0 full beard, 1 goatee, 2 moustache, 3 goatee and moustache
    if a["Male"] and u_identity[_BEARD_SLOT] < _BEARD_P[int(a["Young"])]:
        style = _pick(_BEARD_STYLE_P, float(u_identity[_STYLE_SLOT]))
    a["Goatee"] = style in (1, 3)
    a["Mustache"] = style in (2, 3)
    a["No_Beard"] = style < 0


def _pick(probs: tuple[float, ...], u: float) -> int:
    """Index of the category that the uniform draw ``u`` falls in."""
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total:
            return i
    return len(probs) - 1


# --- drawing ----------------------------------------------------------------------------------
Colour = tuple[int, int, int]
_T = np.linspace(0.0, 2.0 * math.pi, 32, endpoint=False)
_COS, _SIN = np.cos(_T), np.sin(_T)
_HAIR_BASE: dict[str | None, tuple[Colour, int]] = {  # base colour and jitter per hair label
    None: ((150, 62, 34), 22),  # auburn/red: hair that carries none of the four colour labels
    "Black_Hair": ((28, 24, 24), 8),
    "Blond_Hair": ((226, 196, 122), 18),
    "Brown_Hair": ((104, 64, 36), 14),
    "Gray_Hair": ((182, 182, 186), 22),
}


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _shade(c: Colour, f: float) -> Colour:
    return (min(255, round(c[0] * f)), min(255, round(c[1] * f)), min(255, round(c[2] * f)))


def _offset(c: Colour, d: np.ndarray) -> Colour:
    r, g, b = np.clip(np.asarray(c) + d, 0, 255).astype(int).tolist()
    return r, g, b


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> Colour:
    r, g, b = rng.integers(low, high, 3).tolist()
    return r, g, b


@dataclass(frozen=True)
class _Identity:
    """Face geometry and colours shared by all the photos of one synthetic person."""

    u: np.ndarray  # identity-level uniform draws for the attribute model
    skin: Colour
    hair: Colour
    iris: Colour
    rx: float  # face half-width
    ry: float  # face half-height
    jaw: float  # superellipse exponent of the lower face: 2 round, 3 square
    eye_dx: float
    eye_rx: float
    mouth_w: float
    hair_len: float  # how far long hair falls below the face centre
    wave_phase: float


def _identity(seed: int, label: int) -> _Identity:
    """The person behind identity ``label``, from a generator seeded by (seed, label)."""
    rng = np.random.default_rng([seed, 1, label])
    u = rng.random(_N_SLOTS)
    # Per-image draws of 1.0 switch every per-image attribute off; only the identity's are read.
    return _make_identity(u, _sample_attributes(u, np.ones(_N_SLOTS)), rng)


def _make_identity(u: np.ndarray, a: dict[str, bool], rng: np.random.Generator) -> _Identity:
    """Geometry and colours showing the identity-level attributes in ``a``.

    All draws happen up front and in a fixed number, so two identities built from equal
    generators differ only in the cues of the attributes that differ.
    """
    r = rng.random(18)
    male = a["Male"]
    if a["Pale_Skin"]:
        skin = _offset((246, 228, 220), np.round(6 * (2 * r[1:4] - 1)))
    else:
        tone = _mix((222, 180, 152), (102, 68, 48), float(r[0] ** 2.5))  # mostly light, as in CelebA
        skin = _offset(tone, np.round(8 * (2 * r[1:4] - 1)))
    base, spread = _HAIR_BASE[next((name for name in _HAIR_COLOURS[1:] if a[name]), None)]
    rx = float(41 + 5 * r[10] if male else 37 + 4 * r[10])
    ry = float(50 + 5 * r[11])
    jaw = float(2.7 + 0.6 * r[12] if male else 2.0 + 0.3 * r[12])
    if a["Chubby"]:
        rx, jaw = rx + 7, max(2.0, jaw - 0.4)
    if a["Oval_Face"]:
        rx, ry, jaw = rx * 0.9, ry * 1.07, 2.0
    return _Identity(
        u=u,
        skin=skin,
        hair=_offset(base, np.round(spread * (2 * r[4:7] - 1))),
        iris=_offset((20, 20, 20), np.floor(120 * r[7:10])),
        rx=rx,
        ry=ry,
        jaw=jaw,
        eye_dx=float(16 + 3 * r[13]),
        eye_rx=float(6.5 + r[14]),
        mouth_w=float(12 + 2 * r[15]),
        hair_len=float(60 + 35 * r[16]),
        wave_phase=float(2 * math.pi * r[17]),
    )


@dataclass(frozen=True)
class _Scene:
    """One photo's nuisance and accessory choices (pose, background, colours, camera).

    Drawn up front, in a fixed number, whatever the attributes: switching one attribute on or
    off then changes only its own cue, never the rest of the picture.
    """

    background: Colour
    clutter: tuple[tuple[bool, tuple[int, int, int, int], Colour], ...]  # (ellipse?, box, colour)
    cx: float
    cy: float
    scale: float
    roll: float  # radians
    yaw: float  # horizontal shift per unit of feature depth
    cloth: Colour
    jacket: Colour
    tie: Colour
    gold_necklace: bool
    eye_shadow: Colour
    gaze: float
    lipstick: Colour
    hat: Colour
    hat_style: int  # 0 wide brim, 1 cap visor, 2 beanie band
    earring: Colour
    hoops: bool
    frame: Colour
    sunglasses: bool
    square_lenses: bool
    gain: tuple[float, float, float]
    bias: tuple[float, float, float]
    blur: float  # Gaussian radius used when the face is Blurry
    soft_blur: float  # box-blur radius of a slightly soft photo (0: sharp)
    quality: int  # JPEG quality


def _scene(rng: np.random.Generator) -> _Scene:
    background = _colour(rng)
    clutter = []
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(-40, WIDTH, 2).tolist()
        w, h = rng.integers(20, 120, 2).tolist()
        shape = (bool(rng.random() < 0.5), (x0, y0, x0 + w, y0 + h), _mix(background, _colour(rng), 0.5))
        clutter.append(shape)
    pose = rng.uniform(-1, 1, 5)
    metals = ((238, 198, 64), (224, 224, 236), _colour(rng, 100, 256))
    r = rng.random(8)
    gain = float(0.82 + 0.3 * r[0]) * (1 + 0.05 * rng.standard_normal(3))
    return _Scene(
        background=background,
        clutter=tuple(clutter),
        cx=89 + 6 * float(pose[0]),
        cy=118 + 6 * float(pose[1]),
        scale=1.065 + 0.115 * float(pose[2]),
        roll=math.radians(9 * float(pose[3])),
        yaw=4 * float(pose[4]),
        cloth=_colour(rng, 10, 246),
        jacket=_colour(rng, 10, 90),
        tie=_colour(rng, 60, 230),
        gold_necklace=bool(r[1] < 0.6),
        eye_shadow=_colour(rng, 60, 200),
        gaze=float(rng.uniform(-1.5, 1.5)),
        lipstick=_offset((196, 26, 48), rng.integers(-18, 19, 3)),
        hat=_colour(rng),
        hat_style=int(rng.integers(0, 3)),
        earring=metals[int(rng.integers(0, 3))],
        hoops=bool(r[2] < 0.5),
        frame=_colour(rng, 0, 90) if r[3] < 0.7 else _colour(rng),
        sunglasses=bool(r[4] < 0.3),
        square_lenses=bool(r[5] < 0.5),
        gain=tuple(gain.tolist()),
        bias=tuple(rng.uniform(-14, 14, 3).tolist()),
        blur=float(2.8 + 1.2 * r[6]),
        soft_blur=float(rng.uniform(0.4, 0.9)) if r[7] < 0.3 else 0.0,
        quality=int(rng.integers(60, 96)),
    )


class _Pen:
    """Draws in face coordinates (origin at the face centre, y down, ~1 unit = 1 px at scale 1).

    Every point goes through the image's pose: roll, scale and shift, plus a horizontal yaw
    offset proportional to a feature's ``depth`` (the nose moves more than the eyes). Every
    colour goes through the scene's lighting (gain and bias per channel): the picture holds only
    drawn colours, so lighting them is the same as lighting its pixels, at no per-pixel cost.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, scene: _Scene) -> None:
        c, s = math.cos(scene.roll) * scene.scale, math.sin(scene.roll) * scene.scale
        self._m = np.array([[c, s], [-s, c]])  # row-vector form of [[c, -s], [s, c]]
        self._t = np.array([scene.cx, scene.cy])
        self._draw = draw
        self._gain, self._bias = scene.gain, scene.bias
        self.scale = scene.scale
        self.yaw = scene.yaw

    def ink(self, c: Colour | None) -> Colour | None:
        if c is None:
            return None
        g, b = self._gain, self._bias
        return (
            int(min(255.0, max(0.0, c[0] * g[0] + b[0]))),
            int(min(255.0, max(0.0, c[1] * g[1] + b[1]))),
            int(min(255.0, max(0.0, c[2] * g[2] + b[2]))),
        )

    def points(self, xy: np.ndarray, depth: float = 0.0) -> list[float]:
        if depth:
            xy = xy + np.array([self.yaw * depth, 0.0])
        return (xy @ self._m + self._t).ravel().tolist()

    def width(self, w: float) -> int:
        return max(1, round(w * self.scale))

    def polygon(
        self,
        xy: np.ndarray,
        fill: Colour | None,
        depth: float = 0.0,
        outline: Colour | None = None,
        width: float = 1.0,
    ) -> None:
        points = self.points(xy, depth)
        self._draw.polygon(points, fill=self.ink(fill), outline=self.ink(outline), width=self.width(width))

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        fill: Colour | None,
        depth: float = 0.0,
        outline: Colour | None = None,
        width: float = 1.0,
    ) -> None:
        self.polygon(np.column_stack((cx + rx * _COS, cy + ry * _SIN)), fill, depth, outline, width)

    def line(self, xy: np.ndarray, fill: Colour, width: float, depth: float = 0.0) -> None:
        self._draw.line(self.points(xy, depth), fill=self.ink(fill), width=self.width(width), joint="curve")


def _superellipse(rx: float, ry: float, lower: float, upper: float = 2.0) -> np.ndarray:
    """Closed outline with exponent ``upper`` above the centre and ``lower`` below (y down)."""
    p = np.where(_SIN > 0, lower, upper)
    e = 2.0 / p
    return np.column_stack((rx * np.sign(_COS) * np.abs(_COS) ** e, ry * np.sign(_SIN) * np.abs(_SIN) ** e))


def _xy(*coords: float) -> np.ndarray:
    """Points from a flat list of coordinates: ``_xy(x0, y0, x1, y1, ...)``."""
    return np.array(coords, dtype=float).reshape(-1, 2)


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return _xy(x0, y0, x1, y0, x1, y1, x0, y1)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int = 12) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.column_stack((cx + rx * np.cos(t), cy + ry * np.sin(t)))


def _render(a: dict[str, bool], face: _Identity, scene: _Scene) -> Image.Image:
    """Draw one face showing the attributes in ``a`` (see the module docstring for the cues)."""
    img = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(img)
    pen = _Pen(draw, scene)
    draw.rectangle((0, 0, WIDTH, HEIGHT), fill=pen.ink(scene.background))
    for is_ellipse, box, colour in scene.clutter:
        (draw.ellipse if is_ellipse else draw.rectangle)(box, fill=pen.ink(colour))
    skin, hair = face.skin, face.hair
    rx, ry = face.rx, face.ry
    hairless = a["_hairless"]
    beard = _shade(hair, 0.62)
    eye_y, brow_y, nose_y, mouth_y = -8.0, -19.0, 12.0, 28.0

    # Hair behind the head: short for men, down to the shoulders for women.
    if not hairless:
        _draw_back_hair(pen, a, face, hair)
    _draw_body(pen, a, face, scene)
    for side in (-1, 1):  # ears
        pen.ellipse(side * (rx - 1), 1, 6, 11, _shade(skin, 0.9))

    outline = _superellipse(rx, ry, face.jaw)
    pen.polygon(outline, skin)
    lower = outline[outline[:, 1] > 14]
    if hairless:
        pen.ellipse(-rx * 0.3, -ry * 0.72, 9, 5, _mix(skin, (255, 255, 255), 0.45))
    if a["Double_Chin"]:
        pen.ellipse(0, ry + 1, 16, 7, _shade(skin, 0.86))
        pen.line(_arc(0, ry - 1, 16, 7, 0.1 * math.pi, 0.9 * math.pi), _shade(skin, 0.62), 2.6)
    if a["5_o_Clock_Shadow"]:
        pen.polygon(lower, _mix(skin, (70, 72, 84), 0.5))
    if not a["No_Beard"] and not a["Goatee"] and not a["Mustache"]:  # full beard
        pen.polygon(outline[outline[:, 1] > 6] * np.array([1.03, 1.04]), beard)
    if a["Goatee"]:
        pen.ellipse(0, ry - 11, 12, 13, beard, depth=0.8)
    if a["Sideburns"]:
        for side in (-1, 1):
            x = side * (rx - 4.5)
            pen.polygon(_box(x - 4, -24, x + 4, 12), _shade(hair, 0.9))

    if not a["Young"]:  # wrinkles
        wrinkle = _shade(skin, 0.7)
        for y in (-29.0, -34.0):
            pen.line(_arc(0, y + 14, 15, 14, 1.25 * math.pi, 1.75 * math.pi, 6), wrinkle, 1.3, depth=0.3)
        for side in (-1, 1):
            fold = _xy(side * 8, nose_y - 2, side * 13, nose_y + 8, side * 15, mouth_y + 4)
            pen.line(fold, wrinkle, 1.6, depth=0.9)
    if a["Rosy_Cheeks"]:
        for side in (-1, 1):
            blush = _mix(skin, (236, 70, 100), 0.7)
            pen.ellipse(side * (face.eye_dx + 4), nose_y + 2, 11, 7, blush, depth=0.8)
    if a["High_Cheekbones"]:
        for side in (-1, 1):
            highlight = _mix(skin, (255, 255, 255), 0.4)
            pen.ellipse(side * (face.eye_dx + 5), eye_y + 11, 9, 3.5, highlight, depth=0.8)
            pen.ellipse(side * (face.eye_dx + 3), eye_y + 20, 8, 3, _shade(skin, 0.8), depth=0.7)

    _draw_eyes(pen, a, face, scene, eye_y)
    _draw_brows(pen, a, face, brow_y)
    _draw_nose(pen, a, skin, eye_y, nose_y)
    _draw_mouth(pen, a, face, scene, mouth_y)
    if a["Mustache"]:
        y = mouth_y
        moustache = _xy(-17, y - 1, -12, y - 10, 0, y - 12, 12, y - 10, 17, y - 1, 0, y - 5)
        pen.polygon(moustache, beard, depth=1.1)
    if not hairless:
        _draw_front_hair(pen, a, face, hair)
    if a["Wearing_Hat"]:
        _draw_hat(pen, face, scene)
    if a["Wearing_Earrings"]:
        _draw_earrings(pen, rx, scene)
    if a["Eyeglasses"]:
        _draw_glasses(pen, face, scene, eye_y)
    return img


def _draw_back_hair(pen: _Pen, a: dict[str, bool], face: _Identity, hair: Colour) -> None:
    rx, ry = face.rx + 6, face.ry + 8
    top = _arc(0, 0, rx, ry, math.pi, 2 * math.pi, 24)  # left ear level, over the top, to the right
    if a["Wavy_Hair"]:
        t = np.linspace(0, 1, len(top))
        top = top * (1 + 0.06 * np.sin(18 * math.pi * t + face.wave_phase))[:, None]
    if a["Male"]:
        bottom = np.array([[rx - 1, 4.0], [-(rx - 1), 4.0]])
    else:
        width, low = rx + 8, face.hair_len
        bottom = np.array([[width, low * 0.5], [width + 2, low], [-(width + 2), low], [-width, low * 0.5]])
    pen.polygon(np.vstack((top, bottom)), hair)
    if not a["Male"] and (a["Straight_Hair"] or a["Wavy_Hair"]):
        strand = _shade(hair, 0.55)
        ys = np.linspace(5.0, face.hair_len, 8)
        for side in (-1, 1):
            for x in (rx + 1, rx + 6):
                xs = side * x + (3 * np.sin(ys / 5 + face.wave_phase) if a["Wavy_Hair"] else 0 * ys)
                pen.line(np.column_stack((xs, ys)), strand, 2.2)


def _draw_front_hair(pen: _Pen, a: dict[str, bool], face: _Identity, hair: Colour) -> None:
    """Hair over the forehead: normal hairline, receding (M-shaped, high) or bangs to the brows."""
    rx, ry = face.rx, face.ry
    cap = _arc(0, 0, rx + 6, ry + 8, math.pi, 2 * math.pi, 20)
    if a["Bangs"]:
        xs = np.linspace(rx - 1, -(rx - 1), 13)
        ys = -22.0 + 2.5 * (np.arange(13) % 2)
        edge = np.vstack(([[rx + 1, -4.0]], np.column_stack((xs, ys)), [[-(rx + 1), -4.0]]))
    elif a["Receding_Hairline"]:
        edge = _xy(rx + 1, -0.45, rx * 0.55, -0.92, 0, -0.74, -rx * 0.55, -0.92, -rx - 1, -0.45) * (1, ry)
    else:
        edge = _xy(rx + 1, -0.3, rx * 0.6, -0.55, 0, -0.62, -rx * 0.6, -0.55, -rx - 1, -0.3) * (1, ry)
    pen.polygon(np.vstack((cap, edge)), hair)
    if a["Straight_Hair"] or a["Wavy_Hair"]:  # strands over the crown
        strand = _shade(hair, 0.55)
        for x in (-0.6 * rx, -0.3 * rx, 0.0, 0.3 * rx, 0.6 * rx):
            ys = np.linspace(-ry - 4, -0.65 * ry, 6)
            xs = x + (2.5 * np.sin(ys / 2.5 + face.wave_phase) if a["Wavy_Hair"] else 0.25 * (ys + ry))
            pen.line(np.column_stack((xs, ys)), strand, 2.2)


def _draw_body(pen: _Pen, a: dict[str, bool], face: _Identity, scene: _Scene) -> None:
    """Shoulders, neck, collar and tie, necklace."""
    ry, skin = face.ry, face.skin
    cloth = scene.jacket if a["Wearing_Necktie"] else scene.cloth
    y = ry + 18  # where the neck meets the shoulders
    if a["Male"]:
        body = _xy(-110, 140, -100, y + 30, -70, y + 10, 70, y + 10, 100, y + 30, 110, 140)
        neck = 19.0
    else:
        body = _xy(-90, 140, -82, y + 36, -55, y + 18, 55, y + 18, 82, y + 36, 90, 140)
        neck = 14.0
    pen.polygon(body, cloth)
    pen.polygon(_box(-neck, ry - 18, neck, y + 12), _shade(skin, 0.88))
    if a["Wearing_Necktie"]:
        pen.polygon(_xy(-neck - 6, y + 2, neck + 6, y + 2, 0, y + 50), (236, 236, 232))  # collar
        tie = scene.tie
        pen.polygon(_xy(-5, y + 4, 5, y + 4, 3, y + 11, -3, y + 11), _shade(tie, 0.8))  # knot
        pen.polygon(_xy(-3, y + 11, 3, y + 11, 8, y + 52, 0, y + 60, -8, y + 52), tie)
    if a["Wearing_Necklace"]:
        metal = (236, 196, 70) if scene.gold_necklace else (222, 222, 232)
        pen.line(_arc(0, y - 6, neck + 3, 18, 0.05 * math.pi, 0.95 * math.pi), metal, 4.0)
        pen.ellipse(0, y + 13, 5, 5, metal)


def _draw_eyes(pen: _Pen, a: dict[str, bool], face: _Identity, scene: _Scene, eye_y: float) -> None:
    erx = face.eye_rx
    ery = 1.4 if a["Narrow_Eyes"] else 4.6
    shadow = scene.eye_shadow if a["Heavy_Makeup"] else None
    gaze = scene.gaze
    for side in (-1, 1):
        cx = side * face.eye_dx
        if shadow is not None:
            pen.ellipse(cx, eye_y - 4, erx + 2.5, 6, shadow, depth=1.0)
        if a["Bags_Under_Eyes"]:
            bag = _arc(cx, eye_y + ery, erx, 5.5, 0.1 * math.pi, 0.9 * math.pi, 7)
            pen.line(bag, _mix(face.skin, (70, 40, 70), 0.6), 3.0, depth=1.0)
        liner = (10, 10, 10) if shadow is not None else (60, 40, 40)
        liner_width = 2.2 if shadow is not None else 1.0
        pen.ellipse(cx, eye_y, erx, ery, (242, 242, 240), depth=1.0, outline=liner, width=liner_width)
        pen.ellipse(cx + gaze, eye_y, 3.2, min(3.2, ery), face.iris, depth=1.0)
        pen.ellipse(cx + gaze, eye_y, 1.3, min(1.3, ery), (8, 8, 8), depth=1.0)


def _draw_brows(pen: _Pen, a: dict[str, bool], face: _Identity, brow_y: float) -> None:
    colour = _shade(face.hair, 0.6) if not a["_hairless"] else _shade(face.skin, 0.45)
    width = 5.5 if a["Bushy_Eyebrows"] else (3.0 if a["Male"] else 2.0)
    arch = 4.5 if a["Arched_Eyebrows"] else 0.6
    for side in (-1, 1):
        d = face.eye_dx
        tail = 3.5 if a["Arched_Eyebrows"] else 0.8
        xy = _xy(side * (d - 8), brow_y + 1, side * d, brow_y - arch, side * (d + 9), brow_y + tail)
        pen.line(xy, colour, width, depth=1.0)


def _draw_nose(pen: _Pen, a: dict[str, bool], skin: Colour, eye_y: float, nose_y: float) -> None:
    w = 9.5 if a["Big_Nose"] else 4.5
    tip = nose_y + (6.0 if a["Big_Nose"] else 0.0)
    dark = _shade(skin, 0.74)
    pen.line(np.array([[-2.5, eye_y + 3], [-w * 0.6, tip - 3]]), _shade(skin, 0.86), 1.2, depth=1.3)
    if a["Pointy_Nose"]:
        pen.polygon(np.array([[-w, tip - 2], [0, tip - 18], [w, tip - 2], [0, tip + w + 3]]), dark, depth=1.6)
    else:
        pen.ellipse(0, tip, w, 0.7 * w, dark, depth=1.6)
    for side in (-1, 1):
        pen.ellipse(side * w * 0.5, tip + 0.35 * w, 1.8, 1.2, _shade(skin, 0.45), depth=1.6)


def _draw_mouth(pen: _Pen, a: dict[str, bool], face: _Identity, scene: _Scene, mouth_y: float) -> None:
    """Lips around a seam curve: corners lifted for a smile, a dark gap when open, teeth when both."""
    mw = face.mouth_w + (3.5 if a["Smiling"] else 0.0)
    lift, sag = (5.5, 2.0) if a["Smiling"] else (-0.5, 0.0)
    thick = 4.5 if a["Big_Lips"] else 2.5
    gap = (6.0 if a["Smiling"] else 4.5) if a["Mouth_Slightly_Open"] else 0.0
    x = np.linspace(-mw, mw, 9)
    taper = 1 - (x / mw) ** 2
    seam = mouth_y + sag - (lift + sag) * (x / mw) ** 2
    lip = scene.lipstick if a["Wearing_Lipstick"] else _mix(face.skin, (168, 84, 84), 0.45)
    upper = np.column_stack((x, seam - (thick + 1) * taper))
    lower = np.column_stack((x, seam + (thick * 1.3 + gap) * taper))[::-1]
    pen.polygon(np.vstack((upper, lower)), lip, depth=1.0)
    top = np.column_stack((x, seam))
    if gap:
        pen.polygon(np.vstack((top, np.column_stack((x, seam + gap * taper))[::-1])), (52, 14, 20), depth=1.0)
        if a["Smiling"]:
            teeth = np.column_stack((x, seam + 0.45 * gap * taper))[::-1]
            pen.polygon(np.vstack((top, teeth)), (236, 232, 222), depth=1.0)
    else:
        pen.line(top, (70, 24, 30), 1.5, depth=1.0)


def _draw_hat(pen: _Pen, face: _Identity, scene: _Scene) -> None:
    rx, ry = face.rx, face.ry
    colour = scene.hat
    brim_y = -0.5 * ry
    crown = _arc(0, brim_y, rx + 4, ry * 0.5 + 16, math.pi, 2 * math.pi, 16)
    pen.polygon(crown, colour)
    if scene.hat_style == 0:  # wide brim
        brim = _xy(-rx - 20, brim_y - 3, rx + 20, brim_y - 3, rx + 16, brim_y + 4, -rx - 16, brim_y + 4)
        pen.polygon(brim, _shade(colour, 0.75))
    elif scene.hat_style == 1:  # cap visor
        pen.ellipse(0, brim_y + 3, rx * 0.9, 6, _shade(colour, 0.7))
    else:  # beanie band
        pen.polygon(_box(-rx - 4, brim_y - 7, rx + 4, brim_y + 2), _shade(colour, 0.8))


def _draw_earrings(pen: _Pen, rx: float, scene: _Scene) -> None:
    metal = scene.earring
    for side in (-1, 1):
        x = side * (rx + 0.5)
        if scene.hoops:
            pen.ellipse(x, 18, 6, 7, None, outline=metal, width=2.8)
        else:
            pen.line(np.array([[x, 11.0], [x, 17.0]]), metal, 1.6)
            pen.ellipse(x, 20, 4.5, 4.5, metal)


def _draw_glasses(pen: _Pen, face: _Identity, scene: _Scene, eye_y: float) -> None:
    frame = scene.frame
    lens = (28, 28, 36) if scene.sunglasses else None
    lower = 4.0 if scene.square_lenses else 2.0
    shape = _superellipse(face.eye_rx + 5, 7.5, lower, lower)
    for side in (-1, 1):
        cx = side * face.eye_dx
        pen.polygon(shape + np.array([cx, eye_y + 1]), lens, depth=1.0, outline=frame, width=2.8)
        outer = side * (face.eye_dx + face.eye_rx + 5)
        pen.line(np.array([[outer, eye_y], [side * (face.rx + 1), eye_y - 2]]), frame, 2.0, depth=0.5)
    inner = face.eye_dx - face.eye_rx - 5
    pen.line(np.array([[-inner, eye_y], [inner, eye_y]]), frame, 2.0, depth=1.0)


def _finish(img: Image.Image, blurry: bool, scene: _Scene) -> bytes:
    """Blur and JPEG encoding with fixed encoder settings; returns the file's bytes."""
    if blurry:
        img = img.filter(ImageFilter.GaussianBlur(scene.blur))
    elif scene.soft_blur:  # one box pass: a third of a Gaussian's cost, enough for a slight blur
        img = img.filter(ImageFilter.BoxBlur(scene.soft_blur))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=scene.quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def _plan(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split (0 train, 1 val, 2 test) and identity label per image.

    The first 80% of ids are train, then 10% val and 10% test, as in CelebA's files. Identities
    are runs of 1.._MAX_RUN consecutive images that never cross a split; their labels are a
    seeded permutation of 1..K, so they look as unordered as CelebA's.
    """
    n_val = n_test = n // 10
    n_train = n - n_val - n_test
    splits = np.repeat(np.array([0, 1, 2], np.uint8), [n_train, n_val, n_test])
    rng = np.random.default_rng([seed, 2])
    groups = np.empty(n, np.int64)
    next_group = 0
    for start, size in ((0, n_train), (n_train, n_val), (n_train + n_val, n_test)):
        if size == 0:
            continue
        runs = rng.integers(1, _MAX_RUN + 1, size)
        ends = np.cumsum(runs)
        runs = runs[: int(np.searchsorted(ends, size)) + 1]
        groups[start : start + size] = next_group + np.repeat(np.arange(len(runs)), runs)[:size]
        next_group += len(runs)
    labels = rng.permutation(next_group) + 1
    return splits, labels[groups].astype(np.int64)


def _draws(seed: int, image_id: int, identity: _Identity) -> tuple[dict[str, bool], np.random.Generator]:
    """Attributes of image ``image_id`` (1-based) and its generator, positioned to draw its scene.

    Each image has its own generator, seeded by (seed, id): output never depends on the order
    of work, and labels can be drawn without drawing pictures.
    """
    rng = np.random.default_rng([seed, 0, image_id])
    return _sample_attributes(identity.u, rng.random(_N_SLOTS)), rng


def _annotation_texts(
    layout: str, labels: np.ndarray, splits: np.ndarray, identities: np.ndarray
) -> dict[str, bytes]:
    """The annotation files' exact bytes, in CelebA's published formats."""
    n = len(labels)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    signs = np.where(labels > 0, 1, -1)
    if layout == "original":
        # The real file: "202599", the names with a trailing space, then "000001.jpg -1  1 ...":
        # the first value follows one space, the others are right-aligned in 2 columns.
        rows = [
            f"{name} {row[0]}" + "".join(f" {v:2d}" for v in row[1:])
            for name, row in zip(names, signs.tolist())
        ]
        attr = "\r\n".join([str(n), " ".join(ATTRIBUTES) + " ", *rows]) + "\r\n"
        parts = "".join(f"{name} {s}\r\n" for name, s in zip(names, splits.tolist()))
    else:
        rows = [name + "," + ",".join(map(str, row)) for name, row in zip(names, signs.tolist())]
        attr = "\n".join(["image_id," + ",".join(ATTRIBUTES), *rows]) + "\n"
        parts = "image_id,partition\n" + "".join(f"{name},{s}\n" for name, s in zip(names, splits.tolist()))
    ident = "".join(f"{name} {k}\r\n" for name, k in zip(names, identities.tolist()))
    return {
        _ATTR_FILE[layout]: attr.encode("ascii"),
        _PARTITION_FILE[layout]: parts.encode("ascii"),
        _IDENTITY_FILE: ident.encode("ascii"),
    }


def _check_out(out: Path, layout: str, attr_bytes: bytes) -> None:
    """Refuse to write into a folder that holds something other than this very dataset."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder: give a new or empty folder for the faces")
    if not out.exists() or not any(out.iterdir()):
        return
    attr_file = out / _ATTR_FILE[layout]
    if attr_file.is_file() and attr_file.read_bytes() == attr_bytes:
        log.info("%s already holds this synthetic dataset (same n, seed, layout): rewriting it", out)
        return
    raise DatasetError(
        f"{out} is not empty and does not hold this synthetic dataset (same --n, --seed and --layout): "
        "give a new or empty folder, or delete it first"
    )


def synthesize(
    out: Path,
    n: int,
    seed: int = 0,
    layout: str = "original",
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write ``n`` synthetic faces and their annotation files into ``out`` in CelebA's ``layout``.

    The same ``(n, seed, layout)`` always gives byte-identical files. ``out`` must be new, empty,
    or hold the output of that same call (it is then rewritten, which also completes an
    interrupted run); nothing is written outside it. ``progress`` is called with the number of
    images written since its previous call (the calls sum to ``n``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DatasetError(f"the number of images must be a whole number >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DatasetError(f"the seed must be a whole number >= 0, got {seed!r}")
    n, seed = int(n), int(seed)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    out = Path(out)
    start = time.perf_counter()
    splits, identities = _plan(n, seed)
    labels = np.zeros((n, len(ATTRIBUTES)), np.uint8)
    image_dir = out / _IMAGE_DIR[layout]

    # Labels come from the same draws as the pictures, so a first pass over the attribute model
    # alone (cheap: no drawing) gives the annotation text, and ``out`` can be checked against it
    # before anything is written.
    for image_id, face in _faces(seed, identities):
        a, _ = _draws(seed, image_id, face)
        labels[image_id - 1] = [a[name] for name in ATTRIBUTES]
    texts = _annotation_texts(layout, labels, splits, identities)
    _check_out(out, layout, texts[_ATTR_FILE[layout]])
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, data in texts.items():
        (out / name).write_bytes(data)

    pending = 0
    for image_id, face in _faces(seed, identities):
        a, rng = _draws(seed, image_id, face)
        scene = _scene(rng)
        data = _finish(_render(a, face, scene), a["Blurry"], scene)
        (image_dir / f"{image_id:06d}.jpg").write_bytes(data)
        pending += 1
        if progress is not None and (pending == _PROGRESS_EVERY or image_id == n):
            progress(pending)
            pending = 0
    seconds = time.perf_counter() - start
    log.info("wrote %d synthetic faces (%s layout) to %s in %.1f s", n, layout, out, seconds)
    return SynthSummary(out=out, layout=layout, n=n, seconds=seconds)


def _faces(seed: int, identities: np.ndarray) -> Iterator[tuple[int, _Identity]]:
    """(image id, identity) per image; an identity is built once per run of its images."""
    current: tuple[int, _Identity] | None = None
    for i, label in enumerate(identities.tolist(), start=1):
        if current is None or current[0] != label:
            current = (label, _identity(seed, label))
        yield i, current[1]
