"""Measure "every face in a photo" on real CelebA faces, through the project's own commands.

    python scripts/measure_group_photos.py SAMPLE [--model CKPT] [--photos 60] [--seed 0]
        [--canvas 1024x768] [--workers 2] [--threads 1] [--repeat 2] [--work DIR]

1. Compose group photos in a temporary folder (``--work``, never inside the repository): each holds
   2-5 sample crops of DIFFERENT people (every person is pasted at most once over all photos),
   each scaled 0.5-2x (log-uniform), rotated by up to +-25 degrees and pasted, without overlap, on
   a plain or noisy canvas. The ground truth of each face is its person and its box: the box dlib's
   HOG detector gives on the original aligned crop (the sample's mean box where it finds none),
   its centre carried by the paste transform and its sides scaled, upright (HOG boxes are upright).
2. Index that folder into fresh indexes, same ``--workers``/``--threads``, in the same session:
   plain ``facefind index``, ``--detect-faces`` and ``--detect-faces --identity`` (the index that
   is searched), ``--repeat`` rounds in alternation (a shared machine drifts), then the three once
   more with ``--workers 0``. Each runs as a subprocess; with ``--workers 0`` all the work is in
   that process, so its CPU time separates detection+alignment from the descriptor.
3. Search: for every pasted person, one OTHER crop of that person (in no group photo, and not
   indexed) is the query of ``facefind similar QUERY --by person`` and ``--by look`` over every
   entry of the index; is that person's group-photo face first (P@1) / in the top 10?
4. Detection: detected boxes (the entries' ``box``) are matched one-to-one to pasted faces by IoU
   (greedy, IoU >= MATCH_IOU); unmatched detections are false positives.

Without ``--model`` a small checkpoint is trained first with ``facefind train`` (small_cnn, 64 px,
2 epochs on the sample): attributes are not what is measured here; the look embedding is.
Prints a markdown report (tables, then every command run) and writes ``results.json`` in the work
folder. Nothing here is a test: it needs the sample, and its numbers are timings and accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facefind.indexer.faces.align import find_faces  # noqa: E402
from facefind.trainer.celeba import load_celeba  # noqa: E402

CROP = (178, 218)            # (width, height) of CelebA's aligned crops
MEAN_CROP_BOX = (43, 84, 93, 94)  # HOG's box on an aligned crop, mean over the sample (fallback)
SCALES = (0.5, 2.0)
MAX_ANGLE = 25.0
FACES_PER_PHOTO = (2, 5)
MATCH_IOU = 0.3              # a detection is a pasted face when their boxes overlap this much
TOP = 10
SAME_PERSON = 0.6
SCALE_BUCKETS = (("small 0.5-0.8x", 0.5, 0.8), ("medium 0.8-1.25x", 0.8, 1.25), ("large 1.25-2x", 1.25, 2.01))
ANGLE_BUCKETS = (("|angle| < 10", 0.0, 10.0), ("|angle| 10-18", 10.0, 18.0), ("|angle| 18-25", 18.0, 25.01))


@dataclass
class Pasted:
    """One face pasted into a group photo: whose, from which crop, how, and where it ended up."""

    photo: str
    person: int
    source: str
    query: str               # another crop of the same person, in no photo
    scale: float
    angle: float
    box: tuple[float, float, float, float]  # ground-truth face box x, y, w, h in the photo
    region: tuple[float, float, float, float]  # bounding box of the whole pasted crop
    background: str
    detected: list[int] = field(default_factory=list)  # index entry ids matched to it
    iou: float | None = None


# ------------------------------------------------------------------------------- composition


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _background(size: tuple[int, int], kind: str, rng: np.random.Generator) -> Image.Image:
    """A (width, height) canvas: 'plain' (one colour and a gentle gradient) or 'noisy' (blurred
    colour noise plus fine grain, which gives HOG edges to trip on)."""
    w, h = size
    if kind == "plain":
        base = rng.uniform(60, 220, 3)
        ramp = np.linspace(-25, 25, w)[None, :, None] * rng.uniform(-1, 1, 3)
        arr = np.broadcast_to(base + ramp, (h, w, 3))
    else:
        coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))
        arr = np.asarray(img, float) + rng.normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _placement(face_size: tuple[int, int], angle: float, canvas: tuple[int, int], taken: list[tuple],
               rng: np.random.Generator, tries: int = 200) -> tuple[np.ndarray, tuple] | None:
    """(2x3 matrix resized-crop -> photo, bounding box) for a crop of ``face_size`` turned by
    ``angle`` degrees (counter-clockwise as seen) at a random spot inside ``canvas`` that overlaps no
    box in ``taken``; None when no spot is found."""
    w, h = face_size
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # y points down
    corners = (np.array([[0, 0], [w, 0], [0, h], [w, h]], float) - (w / 2, h / 2)) @ rot.T
    half = corners.max(0)
    if np.any(2 * half + 4 > canvas):
        return None
    for _ in range(tries):
        centre = rng.uniform(half + 2, np.array(canvas) - half - 2)
        box = (*(centre - half), *(2 * half))
        if all(box[0] + box[2] + 4 < b[0] or b[0] + b[2] + 4 < box[0]
               or box[1] + box[3] + 4 < b[1] or b[1] + b[3] + 4 < box[1] for b in taken):
            shift = centre - rot @ np.array([w / 2, h / 2])
            return np.hstack([rot, shift[:, None]]), box
    return None


def _paste(photo: Image.Image, face: Image.Image, matrix: np.ndarray) -> None:
    """Paste ``face`` into ``photo`` by the 2x3 face -> photo ``matrix`` (bicubic, hard edge)."""
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    coeffs = tuple(float(v) for v in inv.reshape(-1))
    moved = face.transform(photo.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
    mask = Image.new("L", face.size, 255).transform(photo.size, Image.Transform.AFFINE, coeffs,
                                                    resample=Image.Resampling.BILINEAR, fillcolor=0)
    photo.paste(moved, (0, 0), mask)


def compose(sample: Path, folder: Path, n_photos: int, canvas: tuple[int, int], seed: int) -> list[Pasted]:
    """Write ``n_photos`` group photos into ``folder`` (fewer when people run out) and return every
    pasted face. Each person is pasted once; their query is another of their crops."""
    data = load_celeba(sample)
    if data.identities is None:
        raise SystemExit(f"{sample} has no identity_CelebA.txt: person search needs identities")
    rng = np.random.default_rng(seed)
    by_person: dict[int, list[int]] = {}
    for i, person in enumerate(data.identities.tolist()):
        by_person.setdefault(person, []).append(i)
    people = [p for p in sorted(by_person) if len(by_person[p]) >= 2]
    rng.shuffle(people)
    folder.mkdir(parents=True, exist_ok=True)
    pasted: list[Pasted] = []
    box_cache: dict[int, tuple] = {}
    next_person = 0
    for k in range(n_photos):
        want = int(rng.integers(FACES_PER_PHOTO[0], FACES_PER_PHOTO[1] + 1))
        if next_person + want > len(people):
            break
        kind = "plain" if k % 2 == 0 else "noisy"
        photo = _background(canvas, kind, rng)
        name = f"group_{k:03d}.jpg"
        taken: list[tuple] = []
        for person in people[next_person:next_person + want]:
            source, query = (int(j) for j in rng.choice(by_person[person], size=2, replace=False))
            scale = float(np.exp(rng.uniform(*np.log(SCALES))))
            angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
            spot = None
            while spot is None and scale >= SCALES[0]:  # a crowded canvas: shrink until it fits
                size = (round(CROP[0] * scale), round(CROP[1] * scale))
                spot = _placement(size, angle, canvas, taken, rng)
                if spot is None:
                    scale *= 0.8
            if spot is None:
                continue  # no room even at the smallest scale: this person is left out
            matrix, region = spot
            taken.append(region)
            crop = Image.open(data.paths[source]).convert("RGB")
            face = crop.resize(size, Image.Resampling.LANCZOS)
            _paste(photo, face, matrix)
            if source not in box_cache:
                found = find_faces(np.asarray(crop), min_size=0, limit=1)
                box_cache[source] = found[0].box if found else MEAN_CROP_BOX
            bx, by, bw, bh = box_cache[source]
            sx, sy = size[0] / CROP[0], size[1] / CROP[1]
            centre = matrix[:, :2] @ np.array([(bx + bw / 2) * sx, (by + bh / 2) * sy]) + matrix[:, 2]
            gt = (centre[0] - bw * sx / 2, centre[1] - bh * sy / 2, bw * sx, bh * sy)
            pasted.append(Pasted(name, person, str(data.paths[source]), str(data.paths[query]), scale, angle,
                                 tuple(round(float(v), 1) for v in gt), tuple(round(float(v), 1) for v in region),
                                 kind))
        next_person += want
        photo.save(folder / name, quality=92)
    return pasted


# ------------------------------------------------------------------------------- commands


def facefind_argv() -> list[str]:
    """How to run the CLI here: the venv's ``facefind`` script, else ``python -m facefind.retrieval.cli``."""
    script = Path(sys.executable).with_name("facefind")
    return [str(script)] if script.exists() else [sys.executable, "-m", "facefind.retrieval.cli"]


@dataclass
class Run:
    """One ``facefind`` subprocess: its command, wall seconds, CPU seconds (its own and its
    children's, i.e. decoder workers included) and parsed JSON output."""

    argv: list[str]
    wall: float
    cpu: float
    out: dict


def run_cli(args: list[str], commands: list[str]) -> Run:
    """Run ``facefind ARGS --json`` as a subprocess; its CPU time comes from RUSAGE_CHILDREN."""
    argv = facefind_argv() + args + ["--json"]
    commands.append(shlex.join(["facefind", *args, "--json"]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(argv, wall, cpu, json.loads(proc.stdout))


def index_runs(folder: Path, model: Path, work: Path, workers: int, threads: int, repeat: int,
               commands: list[str]) -> dict[str, Run]:
    """The index runs, each into a fresh index: ``repeat`` rounds of plain, --detect-faces and
    --detect-faces --identity at ``workers``/``threads`` (throughput, alternating so that a shared
    machine's drift hits all three; round 1's --identity index is the one searched), then the same
    three once with --workers 0, where decoding, detection and descriptors run in the indexing
    process itself, so that its CPU time is all of their cost (decoder workers are forkserver
    children, whose CPU time no rusage of ours sees)."""
    variants = {"plain": [], "detect": ["--detect-faces"], "detect+identity": ["--detect-faces", "--identity"]}
    rounds = [(f"workers {workers} #{k + 1}", workers) for k in range(repeat)] + [("workers 0", 0)]
    runs: dict[str, Run] = {}
    for label, w in rounds:
        for name, flags in variants.items():
            key = f"{name}, {label}"
            where = work / "idx" if key == f"detect+identity, workers {workers} #1" else \
                work / f"idx-{name.replace('+', '-')}-{label.replace(' ', '').replace('#', '-')}"
            runs[key] = run_cli(["index", str(folder), "--index", str(where), *flags, "--model", str(model),
                                 "--device", "cpu", "--workers", str(w), "--threads", str(threads)], commands)
    return runs


def train_model(sample: Path, out: Path, commands: list[str], threads: int) -> Path:
    """A small checkpoint from ``facefind train`` (its JSON report is not needed: only the file)."""
    args = ["train", str(sample), "--arch", "small_cnn", "--img-size", "64", "--epochs", "2",
            "--embedding-dim", "128", "--device", "cpu", "--threads", str(threads), "--seed", "0",
            "--out", str(out), "--cache-dir", str(out.parent / "cache")]
    commands.append(shlex.join(["facefind", *args]))
    subprocess.run(facefind_argv() + args, check=True, stdout=subprocess.DEVNULL)
    return out


class InProcess:
    """``facefind`` commands in this process (typer's CliRunner): the query side, where starting a
    process per query would measure Python start-up instead of search."""

    def __init__(self, commands: list[str]) -> None:
        from typer.testing import CliRunner

        from facefind.retrieval.cli import app

        self.app, self.runner, self.commands = app, CliRunner(), commands

    def json(self, args: list[str], log: bool = True) -> dict | None:
        """The JSON of ``facefind ARGS --json``; None when the command exits 1 (a domain error,
        e.g. no face in a query image)."""
        if log:
            self.commands.append(shlex.join(["facefind", *args, "--json"]))
        result = self.runner.invoke(self.app, args + ["--json"])
        if result.exit_code == 1:
            return None
        if result.exit_code != 0:
            raise SystemExit(f"facefind {shlex.join(args)} failed: {result.output[-2000:]}")
        return json.loads(result.stdout)


# ------------------------------------------------------------------------------- scoring


def iou(a: tuple, b: tuple) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def match(pasted: list[Pasted], entries: list[dict]) -> list[dict]:
    """Match detected entries to pasted faces photo by photo (greedy by IoU >= MATCH_IOU, one to
    one); sets ``Pasted.detected``/``iou`` and returns the unmatched entries (false positives)."""
    false_pos = []
    by_photo: dict[str, list[dict]] = {}
    for e in entries:
        by_photo.setdefault(Path(e["path"]).name, []).append(e)
    truth: dict[str, list[Pasted]] = {}
    for p in pasted:
        truth.setdefault(p.photo, []).append(p)
    for photo, dets in by_photo.items():
        faces = truth.get(photo, [])
        pairs = sorted(((iou(tuple(d["box"]), f.box), i, j) for i, d in enumerate(dets) for j, f in enumerate(faces)
                        if d["box"] is not None), reverse=True)
        used_d, used_f = set(), set()
        for score, i, j in pairs:
            if score < MATCH_IOU or i in used_d or j in used_f:
                continue
            used_d.add(i)
            used_f.add(j)
            faces[j].detected.append(dets[i]["id"])
            faces[j].iou = score
        false_pos += [d for i, d in enumerate(dets) if i not in used_d]
    return false_pos


def detection_rows(pasted: list[Pasted], false_pos: list[dict]) -> list[dict]:
    """Recall and mean IoU overall and per scale / angle / background bucket."""
    def row(name: str, items: list[Pasted], fp: int | None) -> dict:
        found = [p for p in items if p.detected]
        widths = [p.box[2] for p in items]
        return {"faces": name, "pasted": len(items), "found": len(found),
                "recall": len(found) / len(items) if items else float("nan"),
                "false_pos": fp, "mean_iou": float(np.mean([p.iou for p in found])) if found else float("nan"),
                "face_px": f"{min(widths):.0f}-{max(widths):.0f}" if widths else ""}

    fp_by_bg = {bg: sum(1 for d in false_pos if d["background"] == bg) for bg in ("plain", "noisy")}
    rows = [row("all", pasted, len(false_pos))]
    rows += [row(name, [p for p in pasted if lo <= p.scale < hi], None) for name, lo, hi in SCALE_BUCKETS]
    big = [p for p in pasted if p.scale >= SCALE_BUCKETS[1][1]]  # rotation apart from the small-face misses
    rows += [row(f"{name}, >= 0.8x", [p for p in big if lo <= abs(p.angle) < hi], None)
             for name, lo, hi in ANGLE_BUCKETS]
    rows += [row(f"{bg} background", [p for p in pasted if p.background == bg], fp_by_bg[bg])
             for bg in ("plain", "noisy")]
    return rows


def search(pasted: list[Pasted], cli: InProcess, index: Path, n_entries: int) -> dict:
    """P@1, top-10 and same_person correctness of ``similar QUERY --by person|look`` (full ranking)."""
    out: dict = {}
    for by in ("person", "look"):
        ranks, true_same, impostor_same, no_face = [], [], [], 0
        for p in pasted:
            args = ["similar", p.query, "--by", by, "--index", str(index), "--limit", str(n_entries), "--device", "cpu"]
            result = cli.json(args, log=p is pasted[0])
            if result is None:
                no_face += 1
                ranks.append(None)
                continue
            hits = result["hits"]
            where = [r for r, h in enumerate(hits) if h["id"] in p.detected]
            ranks.append(where[0] if where else np.inf)  # np.inf: the person's face was not detected
            if by == "person":
                if where:
                    true_same.append(hits[where[0]]["same_person"])
                other = next((h for h in hits if h["id"] not in p.detected), None)
                if other is not None:
                    impostor_same.append(other["same_person"])
        asked = [r for r in ranks if r is not None]
        detected = [r for r, p in zip(ranks, pasted) if r is not None and p.detected]
        out[by] = {
            "queries": len(asked), "query_without_face": no_face,
            "p1_all": float(np.mean([r == 0 for r in asked])) if asked else float("nan"),
            "top10_all": float(np.mean([r < TOP for r in asked])) if asked else float("nan"),
            "detected": len(detected),
            "p1_detected": float(np.mean([r == 0 for r in detected])) if detected else float("nan"),
            "top10_detected": float(np.mean([r < TOP for r in detected])) if detected else float("nan"),
            "median_rank_detected": float(np.median(detected)) + 1 if detected else float("nan"),
            "true_match_same_person": float(np.mean(true_same)) if true_same else None,
            "top_impostor_same_person": float(np.mean(impostor_same)) if impostor_same else None,
            "chance_p1": 1.0 / max(1, n_entries),
        }
    return out


def cost_rows(runs: dict[str, Run], photos: int) -> list[dict]:
    rows = []
    for name, r in runs.items():
        rep = r.out
        faces = rep["faces"]
        seconds = rep["seconds"]
        t = rep.get("timings", {})
        rows.append({"run": name, "photos": rep["indexed"], "entries": faces, "failed": rep["failed"],
                     "index_s": seconds, "photos_s": photos / seconds if seconds else float("nan"),
                     "faces_s": faces / seconds if seconds else float("nan"),
                     "read_decode_s": t.get("read_decode"), "infer_s": t.get("infer"),
                     "process_wall_s": r.wall, "process_cpu_s": r.cpu})
    return rows


# ------------------------------------------------------------------------------- report


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if np.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def parse_canvas(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample", type=Path, help="CelebA sample root (img_align_celeba/, identity_CelebA.txt, ...)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: train a small one)")
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canvas", type=parse_canvas, default=(1024, 768), help="WxH of each group photo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the throughput runs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    work = (args.work or Path(tempfile.mkdtemp(prefix="facefind-groups-"))).resolve()
    if work == repo or repo in work.parents:
        raise SystemExit(f"--work {work} is inside the repository: images must never land there")
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    started = time.perf_counter()

    model = args.model or train_model(args.sample, work / "model.pt", commands, args.threads)
    folder = work / "photos"
    t = time.perf_counter()
    pasted = compose(args.sample, folder, args.photos, args.canvas, args.seed)
    n_photos = len({p.photo for p in pasted})
    compose_s = time.perf_counter() - t

    runs = index_runs(folder, model, work, args.workers, args.threads, args.repeat, commands)
    index = work / "idx"
    cli = InProcess(commands)
    listing = cli.json(["query", "--index", str(index), "--limit", "100000"])
    assert listing is not None
    entries = listing["hits"]
    background = {p.photo: p.background for p in pasted}
    for e in entries:
        e["background"] = background.get(Path(e["path"]).name, "?")
    false_pos = match(pasted, entries)
    det = detection_rows(pasted, false_pos)
    t = time.perf_counter()
    found = search(pasted, cli, index, len(entries))
    search_s = time.perf_counter() - t
    cost = cost_rows(runs, n_photos)
    cpu = {r["run"]: r["process_cpu_s"] for r in cost}
    faces = runs[f"detect+identity, workers {args.workers} #1"].out["faces"]
    per_face = {
        "detect_align_ms_cpu_per_photo": 1000 * (cpu["detect, workers 0"] - cpu["plain, workers 0"]) / n_photos,
        "detect_align_ms_cpu_per_face": 1000 * (cpu["detect, workers 0"] - cpu["plain, workers 0"]) / max(1, faces),
        "descriptor_ms_cpu_per_face": 1000 * (cpu["detect+identity, workers 0"] - cpu["detect, workers 0"])
        / max(1, faces),
    }

    print(f"# Every face in a photo, on the real CelebA sample ({args.sample})\n")
    print(f"{n_photos} group photos of {args.canvas[0]}x{args.canvas[1]} px, {len(pasted)} faces of "
          f"{len(pasted)} different people (2-5 a photo, each person once; scale 0.5-2x, rotation +-25 deg, "
          f"half plain / half noisy backgrounds), seed {args.seed}; model {model}"
          f"{' (trained by this run)' if args.model is None else ''}; workers {args.workers}, threads "
          f"{args.threads}, {os.cpu_count()} CPUs (shared). Compose {compose_s:.0f} s, search {search_s:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s.\n")
    print(f"## Detection (`index --detect-faces`; match = IoU >= {MATCH_IOU} with the pasted face's box)\n")
    print(table(det, ["faces", "pasted", "found", "recall", "false_pos", "mean_iou", "face_px"]))
    missed_files = [f["path"] for f in runs[f"detect+identity, workers {args.workers} #1"].out["failures"]]
    print(f"\nphotos with no face found at all (listed as failed): {len(missed_files)}; "
          f"matched IoU >= 0.5: {sum(1 for p in pasted if p.iou and p.iou >= 0.5)} of "
          f"{sum(1 for p in pasted if p.detected)}\n")
    print(f"## Search by person across group photos (`similar QUERY` over all {len(entries)} entries; "
          "queries are other crops of the pasted people, not indexed)\n")
    rows = [{"by": by, **v} for by, v in found.items()]
    print(table(rows, ["by", "queries", "query_without_face", "p1_all", "top10_all", "detected", "p1_detected",
                       "top10_detected", "median_rank_detected", "true_match_same_person",
                       "top_impostor_same_person", "chance_p1"]))
    print("\n_all: over every query (an undetected face counts as a miss); detected: only people whose "
          "face the index holds. true_match_same_person: share of true matches with distance < 0.6; "
          "top_impostor_same_person: share of queries whose best wrong hit is also < 0.6._\n")
    print(f"## Cost (same folder, same settings, one after another; {n_photos} photos; photos = indexed, "
          "plus failed)\n")
    print(table(cost, ["run", "photos", "entries", "failed", "index_s", "photos_s", "faces_s", "read_decode_s",
                       "infer_s", "process_wall_s", "process_cpu_s"]))
    best = []
    for name in ("plain", "detect", "detect+identity"):
        mine = [r for r in cost if r["run"].startswith(f"{name}, workers {args.workers} #")]
        fastest = min(mine, key=lambda r: r["index_s"])
        best.append({"run": f"{name}, workers {args.workers}", "index_s (each round)":
                     ", ".join(f"{r['index_s']:.1f}" for r in mine), "best photos_s": fastest["photos_s"],
                     "best faces_s": fastest["faces_s"],
                     "x plain": fastest["index_s"] / min(r["index_s"] for r in cost
                                                         if r["run"].startswith(f"plain, workers {args.workers} #"))})
    print()
    print(table(best))
    print(f"\nCPU per photo for detection+alignment: {per_face['detect_align_ms_cpu_per_photo']:.0f} ms "
          f"({per_face['detect_align_ms_cpu_per_face']:.0f} ms per face found); descriptor: "
          f"{per_face['descriptor_ms_cpu_per_face']:.0f} ms per face (differences of the whole process's "
          "CPU time between the --workers 0 runs, which do all the work in that process; start-up and "
          "model loading cancel out). photos_s and faces_s divide by the index report's `seconds`, "
          "which includes starting the decoder workers; process_cpu_s is the CPU time of the facefind "
          "process (with --workers N > 0 not its decoder workers'); read_decode_s is the time the loop waited for "
          "decoded (and, with --detect-faces, detected and described) batches.\n")
    print("## Commands run\n")
    print("```")
    print(f"python scripts/measure_group_photos.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}")
    for c in commands:
        print(c)
    print(f"# ... and `similar` as above for each of the {len(pasted)} queries, --by person and --by look")
    print("```")
    (work / "results.json").write_text(json.dumps({
        "pasted": [asdict(p) for p in pasted], "false_positives": false_pos, "detection": det, "search": found,
        "cost": cost, "per_face": per_face, "commands": commands,
        "reports": {k: r.out for k, r in runs.items()}}, indent=1, default=str))
    print(f"\nwork folder (photos, indexes, results.json): {work}")


if __name__ == "__main__":
    main()
