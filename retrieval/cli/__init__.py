"""The ``facefind`` command: the root typer app.

Each group of commands lives in its own module and registers itself here; this file only wires
them together and configures logging. Nothing imported here may import torch (see common.py).
"""

from __future__ import annotations

import inspect
import logging
from typing import Annotated

import typer

from facefind.retrieval.cli import audit, bench, check, data, demo, index, people, predict, query, serve, train
from facefind.retrieval.cli.common import DEVICE_LOGGER

app = typer.Typer(
    name="facefind",
    help="Search face images by what they look like: 40 learned CelebA attributes + embeddings, "
    "an SQLite + FAISS index, boolean attribute queries ranked by similarity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: flags show as flags (typer's rich panels label them `<bool>`, as if they took
    # a value) and the option column stays narrow at 80 columns instead of taking half the width.
    rich_markup_mode=None,
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
    # The device line only for -v, and for the commands that call common.show_device_line.
    logging.getLogger(DEVICE_LOGGER).setLevel(logging.DEBUG if verbose else logging.WARNING)


for _module in (demo, data, train, index, people, check, predict, query, audit, bench, serve):
    _module.register(app)


def _whole_summaries(typer_app: typer.Typer) -> None:
    """List each command with its whole first paragraph, wrapped, where click would cut it at "..."."""
    for info in typer_app.registered_commands:
        text = info.help or inspect.getdoc(info.callback) or ""
        info.short_help = info.short_help or text.split("\n\n")[0].replace("\n", " ")
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            group.short_help = group.short_help or group.typer_instance.info.help
            _whole_summaries(group.typer_instance)


_whole_summaries(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
