"""`facefind query` and `facefind similar`: filter the index by an attribute expression, rank by
confidence or by similarity to an image, print a table, JSON, paths or an HTML gallery.

The work is ``facefind.retrieval.engine.Engine.query`` over the index's memory-mapped snapshot. ``query``
without ``--like`` never imports torch or cv2 (a test checks ``sys.modules``): the model is loaded
only to embed a reference image, and then it is the index's own checkpoint. ``--by person`` ranks
by dlib identity descriptors (``index --identity``) instead of the model's embedding of look.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from facefind.db.errors import FacefindError
from facefind.retrieval.cli.common import (
    DeviceOpt, IndexOpt, JsonOpt, guard, index_or_demo_hint, print_json, require_image,
)
from facefind.retrieval.cli.predict import DetectFaceOpt
from facefind.retrieval.index import open_index

if TYPE_CHECKING:
    from facefind.retrieval.engine import Quality, Result


# ------------------------------------------------------------------------------------- rendering


def _check_output(as_json: bool, paths: bool, csv: bool = False) -> None:
    if as_json + paths + csv > 1:
        raise FacefindError("give one of --json or --paths or --csv, not several")


def _render(result: Result, *, as_json: bool, paths: bool, gallery: Path | None, title: str | None,
            quality: Quality | None, limit: int, csv: bool = False) -> None:
    """Print ``result`` as JSON, paths, CSV or a table (plus quality), and write the gallery if asked."""
    page = page_note(result, limit)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if gallery is not None:
        from facefind.retrieval.gallery import write_gallery  # PIL: only for --gallery

        write_gallery(gallery, result, title=title)
        typer.echo(f"gallery: {gallery}", err=True)
    if as_json:
        out: dict[str, Any] = result.to_dict()
        if quality is not None:
            out["quality"] = quality.to_dict()
        print_json(out)
        return
    if csv:
        typer.echo(result.to_frame().to_csv(index=False), nl=False)
        if page is not None:
            typer.echo(page, err=True)
        if quality is not None:
            typer.echo(_quality_line(quality), err=True)
        return
    if paths:  # files, each once, in the rank of their best face (for piping into other tools)
        for path in dict.fromkeys(h.path for h in result.hits):
            typer.echo(path)
        if page is not None:
            typer.echo(page, err=True)
        if quality is not None:
            typer.echo(_quality_line(quality), err=True)
        return
    console = Console()
    folder = _common_folder([h.path for h in result.hits])
    where = f" (paths relative to {folder}{os.sep})" if folder else ""
    console.print(f"{result.total:,} of {result.n_indexed:,} images match{where}", highlight=False)
    if result.labelled is not None:  # label: literals look only at the entries that carry labels
        console.print(f"label: literals read the {result.labelled:,} images that carry those labels",
                      highlight=False)
    if result.hits:
        digits = {"similarity": 4, "person": 3}.get(result.ranking, 2)
        header = {"id": "score", "person": "distance"}.get(result.ranking, result.ranking)
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column(header, justify="right")
        table.add_column("path", overflow="fold")  # wrap long paths: never cut off the file name
        table.add_column("matched", overflow="fold")
        for i, h in enumerate(result.hits):
            shown = os.path.relpath(h.path, folder) if folder else h.path
            if h.box is not None:
                shown += f"  [face {h.face}]"
            same = ["same person"] if h.distance is not None and h.to_dict()["same_person"] else []
            table.add_row(str(result.offset + i + 1), f"{h.score:.{digits}f}", shown, ", ".join(same + h.matched))
        console.print(table)
    if page is not None:
        console.print(page, highlight=False, soft_wrap=True)
    if quality is not None:
        console.print(_quality_line(quality), highlight=False)


def page_note(result: Result, limit: int) -> str | None:
    """Which of the matches this page shows and the flags that show the others; None when it shows
    them all (or none match)."""
    shown, last = len(result.hits), result.offset + len(result.hits)
    rest = result.total - last
    if result.offset == 0 and rest <= 0:
        return None
    if limit == 0:  # asked for the count only
        return None
    if shown == 0:
        return f"showing none: --offset {result.offset} is past the last of the {result.total:,} matches"
    note = f"showing {result.offset + 1:,}-{last:,} of {result.total:,}"
    if rest > 0:
        note += f"; --offset {last} shows the next {min(rest, limit):,}"
        if result.offset == 0:
            note += f", --limit {result.total} all of them"
    return note


def _common_folder(paths: list[str]) -> str | None:
    """The folder all ``paths`` share (so the table can show short names), or None."""
    if not paths:
        return None
    try:
        folder = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # mixed absolute/relative or drives
        return None
    return folder if folder not in ("", os.sep) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _quality_line(q: Quality) -> str:
    return (f"against ground-truth labels: precision@{q.k} {_fmt(q.precision_at_k)} "
            f"({q.relevant} of {q.k} hits truly match); all matches: precision {_fmt(q.precision_all)}, "
            f"recall {_fmt(q.recall)}; base rate {_fmt(q.base_rate)} (of {q.n_labelled:,} labelled images)")


# --------------------------------------------------------------------------------------- commands

LimitOpt = Annotated[int, typer.Option("--limit", min=0, help="Hits to show (0: only count).")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="Skip this many hits (paging).")]
PathsOpt = Annotated[bool, typer.Option("--paths", help="Print only the hits' file paths, one per line, each file "
                                                         "once (for piping).")]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print the hits as CSV: rank, id, path, face, box, score, matched, "
                                                     "then every attribute's probability.")]
GalleryOpt = Annotated[
    Path | None,
    typer.Option("--gallery", help="Also write a self-contained HTML page of the hits.", show_default=False),
]
ThresholdsOpt = Annotated[
    str | None,
    typer.Option("--thresholds", help="Threshold set for bare attribute names: f1 (finds most faces that have "
                 "an attribute, the default) or accuracy (the CelebA metric's; rare attributes rarely pass).",
                 show_default=False),
]
ExactOpt = Annotated[
    bool,
    typer.Option("--exact", help="Rank by an exact scan even where the index has an approximate one (large indexes)."),
]
NprobeOpt = Annotated[
    int | None,
    typer.Option("--nprobe", min=1, show_default=False,
                 help="Approximate search only: IVF lists to visit (default 128; more is slower and closer to exact)."),
]
ByOpt = Annotated[
    str,
    typer.Option("--by", help="look: rank by the attribute model's embedding (hair, make-up, expression); person: "
                 "by identity (dlib face descriptors; needs `facefind index --identity`).",
                 case_sensitive=False),
]
EvalOpt = Annotated[
    bool,
    typer.Option("--eval", help="Report precision@k and the base rate against the index's ground-truth labels."),
]


def query(
    expr: Annotated[
        str | None,
        typer.Argument(help='Attribute expression, e.g. "Big_Nose and Eyeglasses and not Male", '
                            '"Smiling > 0.9". Omit to rank everything.', show_default=False),
    ] = None,
    like: Annotated[
        Path | None,
        typer.Option("--like", help="Rank the matches by similarity to this image (loads the index's model).",
                     show_default=False),
    ] = None,
    like_id: Annotated[
        int | None,
        typer.Option("--like-id", help="Rank the matches by similarity to this indexed image id.", show_default=False),
    ] = None,
    by: ByOpt = "look",
    limit: LimitOpt = 20,
    offset: OffsetOpt = 0,
    as_json: JsonOpt = False,
    paths: PathsOpt = False,
    csv: CsvOpt = False,
    gallery: GalleryOpt = None,
    evaluate: EvalOpt = False,
    thresholds: ThresholdsOpt = None,
    detect_face: DetectFaceOpt = None,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
) -> None:
    """Find indexed faces whose attributes satisfy EXPR, ranked by confidence or by similarity."""
    _check_output(as_json, paths, csv)
    if like is not None and like_id is not None:
        raise FacefindError("give --like IMAGE or --like-id ID, not both")
    if like is not None:
        require_image(like)  # before the index and the model load
    person = _by_person(by)
    if person and like is None and like_id is None:
        raise FacefindError("--by person ranks by likeness to a face: give --like IMAGE or --like-id ID")
    result, quality = _search(index_dir, expr, like=like, like_id=like_id, person=person, limit=limit,
                              offset=offset, thresholds=thresholds, detect_face=detect_face, device=device,
                              exact=exact, nprobe=nprobe, evaluate=evaluate)
    title = f"similar to {like.name}" if like is not None else (
        f"similar to image {like_id}" if like_id is not None else None)
    _render(result, as_json=as_json, paths=paths, gallery=gallery, title=title, quality=quality, limit=limit,
            csv=csv)


def similar(
    image: Annotated[Path, typer.Argument(help="A face image (an aligned crop or a photo).", show_default=False)],
    where: Annotated[
        str | None,
        typer.Option("--where", help='Only images matching this expression, e.g. "Smiling and not Male".',
                     show_default=False),
    ] = None,
    by: ByOpt = "look",
    limit: LimitOpt = 20,
    offset: OffsetOpt = 0,
    as_json: JsonOpt = False,
    paths: PathsOpt = False,
    csv: CsvOpt = False,
    gallery: GalleryOpt = None,
    thresholds: ThresholdsOpt = None,
    detect_face: DetectFaceOpt = None,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
) -> None:
    """Find the indexed faces most similar to IMAGE (cosine of look, exact unless the index is large
    enough to carry an approximate index; or identity distance with --by person), optionally only
    those matching --where."""
    _check_output(as_json, paths, csv)
    require_image(image)  # milliseconds; loading torch and the model to find it missing took seconds
    result, _ = _search(index_dir, where, like=image, like_id=None, person=_by_person(by), limit=limit,
                        offset=offset, thresholds=thresholds, detect_face=detect_face, device=device,
                        exact=exact, nprobe=nprobe)
    _render(result, as_json=as_json, paths=paths, gallery=gallery, title=f"similar to {image.name}",
            quality=None, limit=limit, csv=csv)


def _search(index_dir: Path | None, expr: str | None, *, like: Path | None, like_id: int | None, person: bool,
            limit: int, offset: int, thresholds: str | None, detect_face: bool | None, device: str,
            exact: bool, nprobe: int | None, evaluate: bool = False) -> tuple[Result, Quality | None]:
    """One page of ``expr``'s matches, ranked by likeness to the image ``like`` or the indexed
    ``like_id`` (by identity when ``person``, else by look) or else by confidence; with
    ``evaluate``, its quality against the index's labels."""
    with open_index(index_or_demo_hint(index_dir)) as idx:
        # A typo (or an unknown --thresholds) fails before any model is loaded; the engine keeps
        # the parsed tree, so the query below and --eval (result.node) do not parse it again.
        if expr is not None:
            idx.engine.parse(expr)
        idx.engine.threshold_set(thresholds)
        if person:
            idx.require_identity()  # before any model loads
            face = idx.describe(like) if like is not None else None
            result = idx.engine.query(expr, limit=limit, offset=offset, person=face, person_id=like_id,
                                      thresholds=thresholds)
        else:
            reference = idx.embed(like, detect_face, device) if like is not None else None
            result = idx.engine.query(expr, limit=limit, offset=offset, like=reference, like_id=like_id,
                                      thresholds=thresholds, exact=exact, nprobe=nprobe)
        return result, idx.quality(result) if evaluate else None


def _by_person(by: str) -> bool:
    """``--by``: True for person, False for look; a one-line error for anything else."""
    choice = by.strip().lower()
    if choice not in ("look", "person"):
        raise FacefindError(f"--by must be look or person, not {by!r}")
    return choice == "person"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("query", help="Find faces by attributes: boolean expressions ranked by confidence or similarity.")(
        guard(query))
    app.command("similar", help="Find the indexed faces most similar to an image.")(guard(similar))
