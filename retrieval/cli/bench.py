"""`facefind bench ...`: speed benchmarks, each run beside a naive baseline in the same process.

These machines are noisy, so every figure is reported next to a baseline measured in the same run;
compare the ratio, not the absolute numbers, across machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from facefind.retrieval.cli.common import DeviceOpt, JsonOpt, ThreadsOpt, guard, print_json, use_threads

bench_app = typer.Typer(
    help="Speed benchmarks (query, index, train, catalog, people), each beside a baseline in the same run.",
    no_args_is_help=True,
)


def _show(title: str, rows: list[tuple[str, Any, Any]], headers: tuple[str, str, str]) -> None:
    table = Table(*headers, title=title)
    for name, ours, baseline in rows:
        table.add_row(name, _fmt(ours), _fmt(baseline))
    Console().print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


@bench_app.command("query")
@guard
def bench_query(
    n: Annotated[int, typer.Option("--n", min=1, help="Images in the synthetic index (CelebA: 202,599).")] = 202_599,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per expression.")] = 50,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    approx_min: Annotated[int | None, typer.Option(
        "--approx-min", min=0, show_default=False,
        help="Build the approximate index from this many images on (default: the indexer's cut-over, 1,000,000).")] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", min=1, show_default=False,
                                               help="IVF lists visited by approximate queries (default 128).")] = None,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Reference faces for the vector-search figures.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Filter+rank latency of the engine vs. SQL and numpy baselines, then vector search (exact vs
    approximate, recall@10, filters of 50/5/0.1%), on a synthetic index of N items."""
    from facefind.retrieval.bench.query import run_query_bench  # benches import torch/SQLAlchemy: query loads this module

    result = run_query_bench(n=n, seed=seed, repeats=repeats, approx_min=approx_min, nprobe=nprobe,
                             vector_queries=queries)
    if as_json:
        print_json(result)
        return
    base = result["baselines"]
    _show(
        f"query latency, {result['n']:,} images (ms)",
        [("filter + rank p50", result["engine_p50_ms"], f"{base['study_style']['p50_ms']:,.3f} study-style / "
          f"{base['same_settings']['p50_ms']:,.3f} SQL ORDER BY / {base['numpy_brute_force']['p50_ms']:,.3f} numpy"),
         ("filter + rank p99", result["engine_p99_ms"], None),
         ("filter + similarity p50", result["like_p50_ms"], None)],
        ("", "facefind", "baselines"),
    )
    typer.echo("speed-up: " + ", ".join(f"{v['speedup']:.1f}x over {k}" for k, v in base.items()))
    table = Table("search", "matches", "path", "recall@10", "p50", "p99", "exact p50", "exact p99",
                  title=f"vector search, {result['n']:,} x {result['d']} ({result['approximate'] or 'exact only'}; ms)")
    for label, row in result["vector_search"].items():
        table.add_row(label, f"{row['matches']:,}", row["search"], f"{row['recall_at_10']:.3f}", _fmt(row["p50_ms"]),
                      _fmt(row["p99_ms"]), _fmt(row["exact_p50_ms"]), _fmt(row["exact_p99_ms"]))
    Console().print(table)
    typer.echo(f"first similarity query of a freshly opened snapshot: {result['first_like_ms']:.1f} ms; "
               f"{result['bytes_per_vector']:.0f} bytes/vector; approximate index built in {result['build_s']:.1f} s")


RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, help="Rounds in which the pipelines take turns; "
                                                              "each row reports its median (steadier on a busy machine).")]


@bench_app.command("index")
@guard
def bench_index(
    n: Annotated[int, typer.Option("--n", min=1, help="CelebA-size JPEGs to generate and index.")] = 2000,
    out: Annotated[Path | None, typer.Option("--out", help="Work folder (default: a temporary one).")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    arch: Annotated[str, typer.Option("--arch", help="Backbone to time (freshly initialised).")] = "resnet50",
    img_size: Annotated[int | None, typer.Option("--img-size", help="Square model input side (default: native 218x178).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Decoder processes (default: the CPUs available).")] = None,
    threads: ThreadsOpt = None,
    repeats: RepeatsOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """End-to-end `facefind index` images/s vs. the study's pipeline (PIL DataLoader, one INSERT per image).

    Two baselines: at facefind's batch, precision and memory layout (the headline speed-up, where
    only the pipeline differs), and as the study ran it (fp32, batch 64). On a CPU, time a small
    model (e.g. --arch resnet18 --img-size 64): resnet50 at 218x178 runs at about 15 images/s on 2 cores.
    """
    from facefind.retrieval.bench.index import run_index_bench  # torch: see bench_query

    use_threads(threads)
    result = run_index_bench(n=n, out=out, device=device, batch_size=batch_size, arch=arch, img_size=img_size,
                             workers=workers, repeats=repeats)
    if as_json:
        print_json(result)
        return
    settings = ("batch_size", "precision", "memory_format", "workers")
    rows = [dict(result, name="facefind")] + [dict(row, name=name) for name, row in result["baselines"].items()]
    _show_rows(f"index throughput, {n:,} images, {arch} on {result['device']}", rows, result["baselines"],
               "images_per_second", settings)
    _show("facefind's stages alone (images/s)",
          [(k, v, None) for k, v in result.get("stage_images_per_second", {}).items()], ("stage", "images/s", ""))
    typer.echo(f"speed-up over the same-settings baseline: {result['speedup']:.2f}x")


@bench_app.command("train")
@guard
def bench_train(
    data: Annotated[Path | None, typer.Argument(help="CelebA-format folder to train on (default: N synthetic faces).")] = None,
    arch: Annotated[str, typer.Option("--arch")] = "resnet50",
    n: Annotated[int, typer.Option("--n", min=1, help="Synthetic faces to train on when DATA is not given.")] = 512,
    img_size: Annotated[str, typer.Option("--img-size", help="N, HxW or native.")] = "224",
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Decoders: cache threads, baselines' DataLoader workers (default: the CPUs available).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps per pipeline.")] = 20,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    repeats: RepeatsOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Training images/s of facefind's pipeline vs. the same step fed by a decoding DataLoader, and vs. the study's loop.

    The headline speed-up is over the same-settings row, where only the input pipeline differs.
    """
    from facefind.retrieval.bench.train import run_train_bench  # torch: see bench_query

    use_threads(threads)
    result = run_train_bench(data=data, arch=arch, n=n, img_size=img_size, batch_size=batch_size, steps=steps,
                             device=device, workers=workers, repeats=repeats)
    if as_json:
        print_json(result)
        return
    _show_rows(f"training throughput, {arch} at {img_size}px on {result['device']}", result["rows"],
               result["baselines"], "images_per_s",
               ("batch_size", "precision", "memory_format", "optimizer", "workers", "sync"))
    typer.echo(f"speed-up over the same-settings baseline: {result['speedup']:.2f}x")


def _show_rows(title: str, rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], rate: str,
               settings: tuple[str, ...]) -> None:
    """One line per pipeline: its settings, images/s, and facefind's speed-up over it."""
    headers = {"batch_size": "batch", "memory_format": "layout"}
    table = Table("pipeline", *(headers.get(s, s) for s in settings), "images/s", "facefind is", title=title)
    for row in rows:
        ratio = baselines.get(row["name"], {}).get("speedup")
        table.add_row(row["name"], *(str(row[s]) for s in settings), f"{row[rate]:,.1f}",
                      "-" if ratio is None else f"{ratio:.2f}x")
    console = Console()
    Console(width=max(console.width, 130)).print(table)  # a pipe gets every column whole


@bench_app.command("people")
@guard
def bench_people(
    n: Annotated[int, typer.Option("--n", min=1, help="Synthetic identity descriptors (CelebA: 202,599).")] = 202_599,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sample: Annotated[Path | None, typer.Option(
        "--sample", help="Instead: a real CelebA-format folder with identity_CelebA.txt (e.g. the shared "
                         "sample); BCubed per split beside exact single link at 0.6 and 0.5.")] = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="With --sample: an .npz keeping the dlib descriptors between runs (~0.15 s a face).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grouping N synthetic descriptors (identities of ~20 faces) into persons: time, peak memory,
    BCubed precision/recall, beside single link at 0.6 on the same k-NN graph. With --sample: BCubed
    on real faces."""
    # FAISS and dlib: query loads this module
    from facefind.retrieval.bench.people import run_people_bench, run_people_sample

    if sample is not None:
        _people_sample(run_people_sample(sample, cache), as_json)
        return
    r = run_people_bench(n=n, seed=seed)
    if as_json:
        print_json(r)
        return
    naive = r["single_link_0.6"]
    _show(f"people: {r['n']:,} faces of {r['identities']:,} identities (k-NN: {r['knn_kind']})",
          [("persons", r["persons"], naive["persons"]), ("BCubed precision", r["precision"], naive["precision"]),
           ("BCubed recall", r["recall"], naive["recall"])],
          ("", "facefind", "single link 0.6"))
    typer.echo(f"grouping took {r['group_s']:.1f} s wall (k-NN graph {r['knn_s']:.1f} s), {r['group_cpu_s']:.1f} s CPU "
               f"on all threads; peak RSS {r['peak_rss_mb']:,.0f} MB")


def _people_sample(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(r)
        return
    table = Table("split", "faces", "ids", "method", "persons", "BCubed P", "BCubed R",
                  title=f"people on real faces: {r['folder']}")
    for split, row in r["splits"].items():
        for method in ("facefind", "single_link_0.6", "single_link_0.5"):
            m = row[method]
            table.add_row(split, str(row["faces"]), str(row["identities"]), method.replace("_", " "),
                          str(m["persons"]), f"{m['precision']:.3f}", f"{m['recall']:.3f}")
    Console().print(table)


@bench_app.command("catalog")
@guard
def bench_catalog(
    db: Annotated[list[str] | None, typer.Option("--db", help="Another catalog URL to time beside SQLite, an "
                                                 "empty database (repeatable), e.g. postgresql+psycopg://u@host/db.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Predictions to write (CelebA: 202,599).")] = 202_599,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Embedding size.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per transaction.")] = 256,
    query_runs: Annotated[int, typer.Option("--query-runs", min=1, help="Fresh `facefind query` processes per catalog.")] = 10,
    writers: Annotated[int, typer.Option("--writers", min=1, help="Processes writing at once for the sharded "
                                         "figure, as the shards of a sharded run (1: skip it).")] = 2,
    out: Annotated[Path | None, typer.Option("--out", help="Work folder (default: a temporary one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Catalog write throughput and query cold start: SQLite against each --db, in the same run."""
    from facefind.retrieval.bench.catalog import run_catalog_bench  # SQLAlchemy: see bench_query

    result = run_catalog_bench(db or [], n=n, d=dim, batch_size=batch_size, query_runs=query_runs, out=out,
                               writers=writers)
    if as_json:
        print_json(result)
        return
    table = Table("catalog", "write rows/s", "MB/s", "write s", "writer stage rows/s",
                  f"{writers} writers rows/s (x one)", "export s", "publish s", "query cold p50 s",
                  "engine p50 ms", "no SQLAlchemy", title=f"catalog, {n:,} predictions (40 probs + {dim}-d embedding, "
                  f"{batch_size} per transaction)")
    for r in result["catalogs"]:
        sharded = ("-" if r["sharded_rows_per_second"] is None
                   else f"{r['sharded_rows_per_second']:,} (x{r['sharded_speedup']})")
        table.add_row(r["catalog"], f"{r['rows_per_second']:,}", _fmt(r["mb_per_second"]), _fmt(r["write_s"]),
                      f"{r['writer_stage_rows_per_second']:,}", sharded, _fmt(r["export_s"]), _fmt(r["publish_s"]), _fmt(r["query_cold_p50_s"]), _fmt(r["engine_p50_ms"]),
                      "yes" if r["query_shortcut"] else "no")
    Console().print(table)


@bench_app.command("audit")
@guard
def bench_audit(
    n: Annotated[int, typer.Option("--n", min=1, help="Entries in the synthetic index (CelebA: 202,599).")] = 202_599,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs after the first.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Seconds for the whole `facefind audit` report (40 attributes, by Male and Young), in process."""
    from facefind.retrieval.bench.audit import run_audit_bench  # SQLAlchemy (the query bench's data): see bench_query

    result = run_audit_bench(n=n, repeats=repeats)
    if as_json:
        print_json(result)
        return
    typer.echo(f"audit of {result['n']:,} entries x {result['attributes']} attributes by {', '.join(result['by'])}: "
               f"first {result['first_s']:.3f} s, then median {result['median_s']:.3f} s of {result['repeats']} "
               f"({result['median_cpu_s']:.3f} s of CPU)")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
