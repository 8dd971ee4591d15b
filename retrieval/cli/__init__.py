"""The ``facefind`` command: the root typer app.

Each group of commands lives in its own module and registers itself here; this file only wires
them together and configures logging. Nothing imported here may import torch (see common.py).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from facefind.retrieval.cli import bench, check, data, demo, index, people, predict, query, serve, train

app = typer.Typer(
    name="facefind",
    help="Search face images by what they look like: 40 learned CelebA attributes + embeddings, "
    "an SQLite + FAISS index, boolean attribute queries ranked by similarity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details to stderr.")] = False,
) -> None:
    # Our packages log at INFO (DEBUG with -v); third-party chatter (e.g. faiss's loader) stays quiet.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s" if not verbose else "%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("facefind").setLevel(logging.DEBUG if verbose else logging.INFO)

for _module in (demo, data, train, index, people, check, predict, query, bench, serve):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
