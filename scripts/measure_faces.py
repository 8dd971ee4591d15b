"""Measure face alignment, identity and speed on the real CelebA sample (numbers for issue 15).

    python scripts/measure_faces.py align    SAMPLE MODEL [--n 200] [--haar OLD_FACES_PY]
    python scripts/measure_faces.py identity SAMPLE MODEL [--people 40]
    python scripts/measure_faces.py speed    SAMPLE [--n 60] [--haar OLD_FACES_PY]

``align``: each aligned val-split crop is turned into an unaligned photo (pasted in a 480x480 grey
canvas, rotated by up to +-25 degrees, scaled 0.5-2x, shifted), then found and re-aligned. Reports
the landmark error in the re-aligned crop (178x218 pixels) against the original crop, the mean
absolute difference of MODEL's probabilities against those on the original crop, and the mean
accuracy against the labels, for the new alignment and, with ``--haar``, for the old Haar crop
(``git show 2a01d9c:trainer/faces.py > old_faces.py``; needs opencv-python-headless<5), same model.
``identity``: precision@1 and @10 of person retrieval among the PEOPLE identities with the most
images, by dlib's descriptor ("person") and by MODEL's embedding ("look").
``speed``: detection + alignment and the descriptor, images/s in this process, against Haar.
Nothing here is a test: it needs the sample, and its numbers are timings and accuracies.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facefind.indexer.faces.align import apply_transform, find_faces, warp  # noqa: E402
from facefind.trainer.celeba import load_celeba  # noqa: E402

CANVAS = (480, 480)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.array(shift, float)[:, None]])


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def unaligned(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(a 480x480 photo holding ``face`` rotated +-25 deg, scaled 0.5-2x, shifted; 2x3 crop->photo)."""
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    to_photo = _similarity(rng.uniform(-25, 25), scale, (0.0, 0.0))
    margin = 0.3 * scale * 178
    centre = rng.uniform([margin, margin], [CANVAS[1] - margin, CANVAS[0] - margin])
    to_photo[:, 2] = centre - to_photo[:, :2] @ np.array([89.0, 109.0])
    base = np.full((3 * 218, 3 * 178, 3), 0, np.uint8)
    base[:, :, 0] = np.linspace(70, 200, 3 * 178, dtype=np.uint8)[None, :]  # a background with some structure
    base[:, :, 1] = 140
    base[:, :, 2] = np.linspace(200, 90, 3 * 218, dtype=np.uint8)[:, None]
    base[218:436, 178:356] = face
    return warp(base, _compose(to_photo, _similarity(0.0, 1.0, (-178.0, -218.0))), CANVAS, reflect=False), to_photo


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_haar_faces", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (dataclasses look their module up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def measure_align(sample: Path, model: Path, n: int, haar: Path | None) -> dict:
    from facefind.indexer.predict import Predictor

    data = load_celeba(sample)
    val = data.indices("val")[:n]
    predictor = Predictor(model, "cpu")
    old = _load_module(haar) if haar else None
    rng = np.random.default_rng(0)
    rows = {"original": [], "realigned": [], "haar": [], "pass": []}
    err_orig, err_self, err_pass, pass_mad = [], [], [], []
    found_new = found_old = 0
    for i in val:
        face = _rgb(data.paths[i])
        labels = data.labels[i].astype(bool)
        photo, to_photo = unaligned(face, rng)
        p_orig = predictor.predict_images([face], ["o"], detect_face=False)[0]
        mine = find_faces(face, min_size=0)
        hits = find_faces(photo)
        if mine:
            moved = apply_transform(mine[0].transform, mine[0].landmarks)  # aligning the aligned crop
            err_pass.append(np.linalg.norm(moved - mine[0].landmarks, axis=1).mean())
            pass_mad.append(np.abs(mine[0].crop.astype(float) - face).mean())
            p_pass = predictor.predict_images([mine[0].crop], ["p"], detect_face=False)[0]
            rows["pass"].append((p_orig, p_pass, labels))
        if hits:
            found_new += 1
            p_new = predictor.predict_images([hits[0].crop], ["n"], detect_face=False)[0]
            rows["realigned"].append((p_orig, p_new, labels))
            back = _compose(hits[0].transform, to_photo)  # original crop -> re-aligned crop
            if mine:
                p0 = mine[0].landmarks
                err_orig.append(np.linalg.norm(apply_transform(back, p0) - p0, axis=1).mean())
                err_self.append(np.linalg.norm(apply_transform(back, p0)
                                               - apply_transform(mine[0].transform, p0), axis=1).mean())
        rows["original"].append((p_orig, p_orig, labels))
        if old is not None:
            hit = old.find_face(photo)
            if hit is not None:
                found_old += 1
                p_old = predictor.predict_images([hit.crop], ["h"], detect_face=False)[0]
                rows["haar"].append((p_orig, p_old, labels))
    thresholds = predictor.thresholds

    def summary(items: list) -> dict:
        if not items:
            return {"n": 0}
        mad = np.mean([np.abs(np.array(list(a.probabilities.values())) - np.array(list(b.probabilities.values()))).mean()
                       for a, b, _ in items])
        acc = np.mean([((np.array(list(b.probabilities.values())) >= thresholds) == y).mean() for _, b, y in items])
        ref = np.mean([((np.array(list(a.probabilities.values())) >= thresholds) == y).mean() for a, _, y in items])
        return {"n": len(items), "prob_mad_vs_original": round(float(mad), 4), "accuracy": round(float(acc), 4),
                "accuracy_of_originals_same_images": round(float(ref), 4)}

    return {
        "images": len(val),
        "faces_found": {"new": found_new, "haar": found_old if old else None},
        "landmark_error_px": {
            "vs_original_crop_mean": round(float(np.mean(err_orig)), 2),
            "vs_original_crop_median": round(float(np.median(err_orig)), 2),
            "vs_original_crop_p90": round(float(np.percentile(err_orig, 90)), 2),
            "vs_realigning_the_original_mean": round(float(np.mean(err_self)), 2),
            "n": len(err_orig)},
        "aligned_crop_realigned": {"landmark_shift_px_mean": round(float(np.mean(err_pass)), 2),
                                   "landmark_shift_px_median": round(float(np.median(err_pass)), 2),
                                   "pixel_mad_0_255": round(float(np.mean(pass_mad)), 2), "n": len(err_pass),
                                   **summary(rows["pass"])},
        "new_alignment": summary(rows["realigned"]),
        "haar_crop": summary(rows["haar"]) if old else None,
        "original_crops": summary(rows["original"]),
    }


def measure_identity(sample: Path, model: Path, people: int) -> dict:
    from facefind.indexer.faces.identity import describe
    from facefind.indexer.predict import Predictor

    data = load_celeba(sample)
    assert data.identities is not None
    ids, counts = np.unique(data.identities, return_counts=True)
    chosen = set(ids[np.argsort(-counts, kind="stable")[:people]].tolist())
    rows = [i for i in range(len(data)) if int(data.identities[i]) in chosen]
    predictor = Predictor(model, "cpu")
    person, look, who = [], [], []
    start = time.perf_counter()
    described = 0
    for i in rows:
        rgb = _rgb(data.paths[i])
        faces = find_faces(rgb, min_size=0)
        if not faces:
            continue  # same set for both: only crops with a detection
        person.append(describe(rgb, [faces[0].landmarks])[0])
        described += 1
        look.append(predictor.predict_images([rgb], ["x"], detect_face=False)[0].embedding)
        who.append(int(data.identities[i]))
    seconds = time.perf_counter() - start
    who_a = np.array(who)

    def precision(vectors: np.ndarray, metric: str) -> dict:
        if metric == "euclidean":
            sq = (vectors ** 2).sum(1)
            dist = sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T
        else:
            dist = -vectors @ vectors.T
        np.fill_diagonal(dist, np.inf)
        order = np.argsort(dist, axis=1)
        same = who_a[order] == who_a[:, None]
        return {"p@1": round(float(same[:, 0].mean()), 4), "p@10": round(float(same[:, :10].mean()), 4)}

    return {"identities": people, "images": len(rows), "with_a_face": len(who),
            "person_dlib": precision(np.stack(person), "euclidean"),
            "look_model_embedding": precision(np.stack(look), "cosine"),
            "chance_p@1": round(float(np.mean([(who_a == w).sum() - 1 for w in who_a]) / (len(who) - 1)), 4),
            "seconds_detect_describe_embed": round(seconds, 1), "described": described}


def _timed(work) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is
    the honest per-core cost, the wall time what this process happened to get."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure_speed(sample: Path, n: int, haar: Path | None) -> dict:
    from facefind.indexer.faces.identity import check_model, describe
    from facefind.indexer.faces.align import check_models

    data = load_celeba(sample)
    rng = np.random.default_rng(1)
    faces = [_rgb(data.paths[i]) for i in data.indices("val")[:n]]
    photos = [unaligned(f, rng)[0] for f in faces]
    old = _load_module(haar) if haar else None
    check_models()
    check_model()
    if old is not None:
        old.find_face(photos[0])
    out: dict = {"n": n}
    for name, images in (("aligned_178x218", faces), ("photo_480x480", photos)):
        found, wall, cpu = _timed(lambda: [find_faces(im, limit=1) for im in images])
        entry = {"new_detect_align": {"img_s_wall": round(n / wall, 1), "ms_cpu": round(1000 * cpu / n, 1),
                                      "found": sum(bool(f) for f in found)}}
        if old is not None:
            hits, wall, cpu = _timed(lambda: [old.find_face(im) for im in images])
            entry["haar_detect_crop"] = {"img_s_wall": round(n / wall, 1), "ms_cpu": round(1000 * cpu / n, 1),
                                         "found": sum(h is not None for h in hits)}
        with_face = [(im, f[0]) for im, f in zip(images, found) if f]
        _, wall, cpu = _timed(lambda: [describe(im, [f.landmarks]) for im, f in with_face])
        k = max(1, len(with_face))
        entry["descriptor"] = {"faces_s_wall": round(k / wall, 2), "ms_cpu_per_face": round(1000 * cpu / k, 1)}
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["align", "identity", "speed"])
    parser.add_argument("sample", type=Path)
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--people", type=int, default=40)
    parser.add_argument("--haar", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "align":
        result = measure_align(args.sample, args.model, args.n, args.haar)
    elif args.what == "identity":
        result = measure_identity(args.sample, args.model, args.people)
    else:
        result = measure_speed(args.sample, args.n, args.haar)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
