"""`facefind predict`: the attributes of one-off images (the study's ``predict()``), as a table,
JSON or a gallery page showing each image with its face box beside its attributes.

The model comes from ``--model``, else the index, else the models folder
(``facefind.indexer.pipeline.choose_model``). torch and dlib are imported only inside the command.
A file that cannot be predicted (unreadable, no face found) is reported as a failure of that file
and the others go on; the exit code is then 1.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Sequence

import typer
from rich.console import Console
from rich.table import Table

from facefind.db.files import atomic_write_text
from facefind.db.paths import default_models_dir
from facefind.retrieval.cli.common import DeviceOpt, IndexOpt, JsonOpt, guard, image_problem, print_json
from facefind.retrieval.index import open_predictor

if TYPE_CHECKING:
    from facefind.indexer.predict import FailedPrediction, Prediction


THUMBNAIL = 220  # gallery thumbnail size, pixels


# ------------------------------------------------------------------------------------- rendering


def _print_table(preds: Sequence[Prediction], thresholds: dict[str, float]) -> None:
    console = Console()
    for p in preds:
        where = (f"face at x={p.face_box[0]} y={p.face_box[1]} {p.face_box[2]}x{p.face_box[3]}"
                 if p.face_box is not None else "whole image")
        # The heading is a line of its own, never wrapped: a table title would split the file name.
        console.print(f"{p.path} ({where}): {len(p.present)} present", soft_wrap=True, markup=False, highlight=False)
        table = Table("attribute", "probability", "threshold", "present")
        present = set(p.present)
        for name, prob in sorted(p.probabilities.items(), key=lambda kv: (-kv[1], kv[0])):
            on = name in present
            style = "bold green" if on else "dim"
            table.add_row(name, f"{prob:.3f}", f"{thresholds[name]:.2f}", "yes" if on else "",
                          style=style)
        console.print(table)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:0 0 1rem}
.row{display:flex;gap:16px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px;
margin-bottom:12px;align-items:flex-start}
.pic{position:relative;width:var(--t);flex:none}
.pic img{width:100%;display:block;border-radius:4px}
.box{position:absolute;border:2px solid #e8590c;box-sizing:border-box}
.missing{height:var(--t);display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.path{font-weight:600;word-break:break-all;margin-bottom:.4rem}
.chip{display:inline-block;margin:1px;padding:1px 6px;border-radius:10px;background:#eee;color:#666;
font-size:12px}
.chip.on{background:#1f6feb;color:#fff}
"""


def render_predictions(preds: Sequence[Prediction], *, title: str = "facefind predict") -> str:
    """One self-contained HTML page: each image (face box drawn over it) beside its attributes,
    present ones highlighted, all sorted by probability."""
    from facefind.retrieval.gallery import thumbnail_data_uri  # PIL: query loads this module

    rows = []
    for p in preds:
        uri = thumbnail_data_uri(p.path, THUMBNAIL)
        if uri is None:
            picture = f'<div class="missing">cannot show {html.escape(Path(p.path).name)}</div>'
        else:
            picture = f'<img src="{uri}" alt="{html.escape(Path(p.path).name)}">'
            if p.face_box is not None:
                (x, y, w, h), (iw, ih) = p.face_box, p.image_size
                picture += (f'<div class="box" style="left:{100 * x / iw:.2f}%;top:{100 * y / ih:.2f}%;'
                            f'width:{100 * w / iw:.2f}%;height:{100 * h / ih:.2f}%"></div>')
        present = set(p.present)
        chips = "".join(
            f'<span class="chip{" on" if name in present else ""}">{html.escape(f"{name} {prob:.2f}")}</span>'
            for name, prob in sorted(p.probabilities.items(), key=lambda kv: _order(kv, present))
        )
        note = "face detected" if p.face_box is not None else "whole image"
        rows.append(f'<div class="row"><div class="pic">{picture}</div><div>'
                    f'<div class="path">{html.escape(p.path)}</div>'
                    f'<p>{len(p.present)} attributes present · {note}</p>{chips}</div></div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body style=\"--t:{THUMBNAIL}px\"><h1>{html.escape(title)}</h1>\n"
            + "\n".join(rows) + "\n</body></html>\n")


def _order(item: tuple[str, float], present: set[str]) -> tuple[bool, float, str]:
    """Sort key: present attributes first, then by probability descending, then by name."""
    return (item[0] not in present, -item[1], item[0])


# ---------------------------------------------------------------------------------------- command

DetectFaceOpt = Annotated[
    bool | None,
    typer.Option("--detect-face/--no-detect-face",
                 help="Align the largest face onto CelebA's template (dlib, 5 landmarks) before predicting. "
                      "Default: only for images that do not look like aligned 178x218 crops.",
                 show_default=False),
]


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False)],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint from `facefind train`. Default: the index's model, "
                     "else the newest in ~/.facefind/models.", show_default=False),
    ] = None,
    as_json: JsonOpt = False,
    detect_face: DetectFaceOpt = None,
    gallery: Annotated[
        Path | None,
        typer.Option("--gallery", help="Also write an HTML page of the images (face box drawn) and their attributes.",
                     show_default=False),
    ] = None,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Predict the 40 attributes of each IMAGE; present ones (at the model's thresholds) are highlighted."""
    from facefind.indexer.predict import FailedPrediction, Prediction  # torch-free until a model runs

    unreadable = [FailedPrediction(str(p), problem) for p in images if (problem := image_problem(p))]
    if len(unreadable) == len(images):  # nothing to predict: say so before torch and the model load
        _report_failures(unreadable, len(images))

    from facefind.indexer.pipeline import choose_model  # imports torch: query loads this module

    model_path = choose_model(index_dir, model, models_dir=default_models_dir())
    predictor = open_predictor(model_path, device)
    results = predictor.predict([str(p) for p in images], detect_face, keep_going=True)
    preds = [r for r in results if isinstance(r, Prediction)]
    failed = [r for r in results if not isinstance(r, Prediction)]
    if gallery is not None and preds:
        atomic_write_text(gallery, render_predictions(preds, title=f"facefind predict · {model_path.name}"))
        typer.echo(f"gallery: {gallery}", err=True)
    if as_json:
        print_json([r.to_dict() for r in results])
    else:
        _print_table(preds, dict(zip(predictor.attributes, predictor.thresholds.tolist())))
    _report_failures(failed, len(results))


def _report_failures(failed: Sequence[FailedPrediction], total: int) -> None:
    """One ``error:`` line per failed file on stderr, and exit code 1 when any failed."""
    for f in failed:
        typer.echo(f"error: {f.error}", err=True)
    if failed:
        if total > 1:
            typer.echo(f"{len(failed):,} of {total:,} images failed", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("predict", help="Predict the attributes of face images (aligned crops or photos).")(guard(predict))
