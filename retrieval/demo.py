"""`facefind demo`: the whole system on the embedded default, end to end, with no dataset and no network.

synthetic CelebA-format faces -> a small CNN trained on the CPU (or GPU) -> SQLite + FAISS index ->
example attribute queries, a similarity search, and HTML gallery pages. Each step reuses what an
earlier run left in the demo folder, so a second run takes seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from facefind.db.errors import FacefindError
from facefind.indexer.pipeline import index_folder
from facefind.retrieval.gallery import write_gallery
from facefind.retrieval.index import open_index
from facefind.trainer.celeba import load_celeba
from facefind.trainer.checkpoint import load_checkpoint
from facefind.trainer.fit import FitConfig, fit
from facefind.trainer.synth import synthesize


# Expressions over attributes the synthetic faces render visibly (see trainer/synth.py). The study's
# headline query, "Big_Nose and Eyeglasses and not Male", fits 2 of 2,000 synthetic faces (0.1%),
# too few to show anything; its closest well-populated relative leads instead.
DEMO_QUERIES = (
    "Eyeglasses and not Male",
    "Smiling and Wearing_Hat",
    "Blond_Hair and not Young or Gray_Hair > 0.8",
)
DEMO_ARCH = "small_cnn"
DEMO_IMG_SIZE = 64


@dataclass
class DemoStep:
    name: str
    seconds: float
    detail: str
    reused: bool = False


@dataclass
class DemoReport:
    folder: Path
    steps: list[DemoStep] = field(default_factory=list)
    queries: list[Any] = field(default_factory=list)  # facefind.retrieval.engine.Result, one per DEMO_QUERIES
    quality: list[Any] = field(default_factory=list)  # facefind.retrieval.engine.Quality against the labels, likewise
    similar_to: Path | None = None
    similar: Any = None  # facefind.retrieval.engine.Result
    galleries: list[Path] = field(default_factory=list)
    model: Path | None = None
    index: Path | None = None
    faces: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_split: str = "test"  # where ``metrics`` were measured: test, or val when there is no test split

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)


# callback(step name, event): the CLI turns events into progress bars.
Progress = Callable[[str, Any], None]


def run_demo(
    folder: Path,
    n: int = 2000,
    epochs: int = 20,
    device: str = "auto",
    seed: int = 1,
    progress: Progress | None = None,
) -> DemoReport:
    """Run (or resume) the demo in ``folder`` and return what each step did and found."""
    if n < 200:
        raise FacefindError(f"--n must be at least 200 so that the demo model can learn, got {n}")
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    report = DemoReport(folder=folder, faces=folder / "faces", model=folder / "model.pt", index=folder / "index")
    emit = progress or (lambda step, event: None)

    report.steps.append(_faces(report.faces, n, seed, lambda e: emit("faces", e)))
    report.steps.append(_train(report, epochs, device, seed, lambda e: emit("train", e)))
    report.steps.append(_index(report, device, lambda done, total: emit("index", (done, total))))
    report.steps.append(_search(report, device))
    return report


def _faces(out: Path, n: int, seed: int, emit: Callable[[Any], None]) -> DemoStep:
    start = time.perf_counter()
    if (out / "list_attr_celeba.txt").is_file():
        try:
            existing = len(load_celeba(out))
        except FacefindError:
            existing = -1
        if existing == n:
            return DemoStep("faces", time.perf_counter() - start, f"{n:,} synthetic faces in {out}", reused=True)
        raise FacefindError(
            f"{out} holds a different synthetic set ({existing} faces, asked for {n}): "
            f"pass --dir to use another folder, or delete {out.parent} to start over"
        )
    done = 0

    def advance(k: int) -> None:  # synthesize reports images written since its last call
        nonlocal done
        done += k
        emit(done)

    summary = synthesize(out, n=n, seed=seed, progress=advance)
    return DemoStep("faces", time.perf_counter() - start,
                    f"{n:,} synthetic faces ({summary.images_per_second:,.0f} images/s) in {out}")


def _train(report: DemoReport, epochs: int, device: str, seed: int, emit: Callable[[Any], None]) -> DemoStep:
    start = time.perf_counter()
    assert report.model is not None and report.faces is not None
    if report.model.is_file():
        meta = load_checkpoint(report.model)["meta"]
        split = "test" if meta.get("test_metrics") else "val"
        report.metrics = _headline(meta.get(f"{split}_metrics") or {})
        report.metrics_split = split
        return DemoStep("train", time.perf_counter() - start, _train_detail(report), reused=True)
    config = FitConfig(
        data=report.faces, out=report.model, arch=DEMO_ARCH, img_size=(DEMO_IMG_SIZE, DEMO_IMG_SIZE),
        epochs=epochs, batch_size=64, lr=3e-3, augment=False, device=device, seed=seed,
        cache_dir=report.folder / "cache",
    )
    result = fit(config, progress=emit)
    report.metrics_split, metrics, baseline = result.held_out  # test: val chose the epoch and thresholds
    report.metrics = _headline(metrics.summary())
    report.metrics.update({f"majority_{k}": v for k, v in _headline(baseline.summary()).items()})
    return DemoStep("train", time.perf_counter() - start, _train_detail(report))


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("mean_accuracy", "macro_f1") if metrics.get(k) is not None}


def _train_detail(report: DemoReport) -> str:
    m = report.metrics
    text = f"{DEMO_ARCH} at {DEMO_IMG_SIZE}px -> {report.model}"
    if "mean_accuracy" in m and "macro_f1" in m:
        split = ("held-out test" if report.metrics_split == "test"
                 else "val (optimistic: it chose the epoch and thresholds)")
        text += f"; {split} mean accuracy {m['mean_accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}"
        if "majority_mean_accuracy" in m:
            text += f" (always-majority: {m['majority_mean_accuracy']:.3f} / {m.get('majority_macro_f1', 0):.3f})"
    return text


def _index(report: DemoReport, device: str, emit: Callable[[int, int], None]) -> DemoStep:
    assert report.faces is not None
    start = time.perf_counter()
    result = index_folder(report.faces / "img_align_celeba", model_path=report.model,
                          index_dir=report.index, device=device, progress=emit)
    detail = (f"{result.indexed:,} indexed, {result.unchanged:,} unchanged, {result.failed:,} failed "
              f"-> {report.index}")
    return DemoStep("index", time.perf_counter() - start, detail, reused=result.indexed == 0)


def _search(report: DemoReport, device: str) -> DemoStep:
    start = time.perf_counter()
    assert report.index is not None
    with open_index(report.index) as index:
        report.queries = [index.engine.query(expr, limit=5) for expr in DEMO_QUERIES]
        # The synthetic faces come with labels, so each query is also checked against the truth.
        report.quality = [index.quality(result) for result in report.queries]
        # Similarity: the best hit of the first query (else any face) is the photo to match.
        hits = report.queries[0].hits or index.engine.query(None, limit=1).hits
        report.similar_to = Path(hits[0].path)
        report.similar = index.engine.query(None, limit=5, like=index.embed(report.similar_to, False, device))

    report.galleries = [
        write_gallery(report.folder / "gallery.html", report.queries[0]),
        write_gallery(report.folder / "similar.html", report.similar, title=f"similar to {report.similar_to.name}"),
    ]
    return DemoStep("search", time.perf_counter() - start,
                    f"{len(DEMO_QUERIES)} queries + 1 similarity search; galleries in {report.folder}")
