"""`facefind people`: the index's faces grouped into persons; name, merge and split them.

The work is facefind.indexer.people (grouping, kept in step with the catalog) and
facefind.db.people (the corrections, one transaction each); this module parses and prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from facefind.db.paths import default_index_dir
from facefind.retrieval.cli.common import IndexOpt, JsonOpt, guard, print_json

people_app = typer.Typer(
    help="Who is in the index: faces grouped into persons (needs `index --identity`); "
         "name, merge and split them. Corrections are kept by every regroup.",
    invoke_without_command=True,
)


@contextlib.contextmanager
def _open(index_dir: Path | None) -> Iterator[tuple[Any, Path]]:
    """The index's catalog (closed afterwards) and its folder."""
    # SQLAlchemy and FAISS: imported here, not at the top, as `facefind query` loads this module
    from facefind.db.catalog import Catalog

    folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    with Catalog.open(folder, create=False) as catalog:
        yield catalog, folder


@people_app.callback()
@guard
def people(
    ctx: typer.Context,
    index_dir: IndexOpt = None,
    min_faces: Annotated[int, typer.Option("--min-faces", min=1, help="List only persons with at least N faces.")] = 1,
    regroup: Annotated[bool, typer.Option("--regroup", help="Group every face again from scratch (corrections "
                                          "and the names of persons that stay mostly together are kept).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the persons (grouping new faces first): id, name, face count, a representative face."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = index_dir
        return
    from facefind.indexer import people as logic  # FAISS and SQLAlchemy: query loads this module

    with _open(index_dir) as (catalog, folder):
        done = logic.ensure_grouped(catalog, folder, fresh=regroup)
        found = logic.list_people(catalog, min_faces=min_faces)
    if as_json:
        print_json({"persons": [p.to_dict() for p in found], "faces": done.faces, "placed": done.placed,
                    "regrouped": done.regrouped, "seconds": round(done.seconds, 3)})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "name", "faces", "representative", title=f"{len(found)} persons, {done.faces} faces"
                  + (f" ({done.placed} placed now)" if done.placed else ""))
    for p in found:
        table.add_row(str(p.id), p.name or "-", str(p.count), str(p.representative))
    Console().print(table)


@people_app.command("name")
@guard
def name_person(
    ctx: typer.Context,
    person_id: Annotated[int, typer.Argument(help="The person's id (`facefind people` lists them).")],
    name: Annotated[str, typer.Argument(help='The name, e.g. "Ada Lovelace" ("" removes it).')],
    index_dir: IndexOpt = None,
) -> None:
    """Name a person; `person:NAME` then finds its faces."""
    from facefind.indexer import people as logic  # SQLAlchemy: query loads this module

    with _open(index_dir or ctx.obj) as (catalog, folder):
        logic.name(catalog, folder, person_id, name)
    typer.echo(f"person {person_id} is {name!r}" if name.strip() else f"person {person_id} has no name")


@people_app.command("merge")
@guard
def merge_people(
    ctx: typer.Context,
    keep: Annotated[int, typer.Argument(help="The person that stays.")],
    other: Annotated[int, typer.Argument(help="The person merged into it.")],
    index_dir: IndexOpt = None,
) -> None:
    """Merge two persons into one (kept through every regroup)."""
    from facefind.indexer import people as logic  # SQLAlchemy: query loads this module

    with _open(index_dir or ctx.obj) as (catalog, folder):
        kept = logic.merge(catalog, folder, keep, other)
    typer.echo(f"person {other} merged into person {kept}")


@people_app.command("split")
@guard
def split_person(
    ctx: typer.Context,
    person_id: Annotated[int, typer.Argument(help="The person to split.")],
    faces: Annotated[list[int], typer.Option("--face", help="An entry id that leaves the person (repeat for several).")],
    index_dir: IndexOpt = None,
) -> None:
    """Move faces out of a person into a new one; they never join it again."""
    from facefind.indexer import people as logic  # SQLAlchemy: query loads this module

    with _open(index_dir or ctx.obj) as (catalog, folder):
        new = logic.split(catalog, folder, person_id, faces)
    typer.echo(f"{len(set(faces))} faces left person {person_id} for the new person {new}")


def register(app: typer.Typer) -> None:
    app.add_typer(people_app, name="people")
