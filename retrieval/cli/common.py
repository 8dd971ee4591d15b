"""Shared pieces of the command-line layer: error guard, JSON output, common options.

The command modules of ``facefind.retrieval.cli`` keep only option parsing and rendering; the work happens in the
library packages. They must not import torch at module level: ``facefind query`` loads every
command module and must stay torch-free (checked by a test).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

import typer

from facefind.db.errors import CatalogError, FacefindError, ImageError, QuerySyntaxError
from facefind.db.files import json_default
from facefind.db.paths import default_index_dir

F = TypeVar("F", bound=Callable[..., Any])


def guard(func: F) -> F:
    """Turn a ``FacefindError`` into ``error: <message>`` on stderr and exit code 1.

    Ctrl-C becomes exit code 130 with a short note instead of a traceback. Any other exception
    is a bug and propagates with its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QuerySyntaxError as err:
            typer.echo(f"error: {err.render()}", err=True)
            raise typer.Exit(1) from None
        except FacefindError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (the only thing on stdout when ``--json`` is given)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")


# Options shared by several commands.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of a table.")]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto | cpu | cuda | cuda:N. auto picks CUDA when present; train, tune and "
                 "index say which, the other commands with -v."),
]
IndexOpt = Annotated[
    Path | None,
    typer.Option(
        "--index",
        help="Index folder (catalog + vectors). Default: $FACEFIND_INDEX, else ~/.facefind/index.",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch. Default: $OMP_NUM_THREADS when set, else one per CPU that other "
             "processes leave idle (busy cores make extra threads 10-100x slower).",
        show_default=False,
    ),
]


# Where `facefind demo` leaves its index when run with its default --dir.
DEMO_INDEX = Path("facefind-demo") / "index"


def index_or_demo_hint(index_dir: Path | None) -> Path | None:
    """``--index`` as given; but when it was left out (no $FACEFIND_INDEX or $FACEFIND_DB either), the
    default index is missing and the demo's sits in the current folder, a CatalogError that names it
    with the command to paste.

    It does not quietly use the demo's index instead: what a query answers from would then depend on
    the current folder, and a script's JSON would not say which index it came from.
    """
    if index_dir is not None or os.environ.get("FACEFIND_INDEX") or os.environ.get("FACEFIND_DB"):
        return index_dir
    if default_index_dir().exists() or not (DEMO_INDEX / "catalog.db").is_file():
        return None
    command = shlex.join(["facefind", *sys.argv[1:], "--index", str(DEMO_INDEX)])
    raise CatalogError(f"no index at {default_index_dir()}, but `facefind demo` made one here: {command}")


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an input image (missing, a folder, not an image), or None.

    Only the header is read, so a command can check its inputs in milliseconds before it loads
    torch and a model (seconds); the messages are the ones ``facefind.indexer.predict`` gives.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow: only commands given an image load it (not query)

    if not path.exists():
        return f"no such image: {path}"
    if path.is_dir():
        return f"{path} is a folder: give image files (use `facefind index` for folders)"
    try:
        with warnings.catch_warnings():  # a large image is the decoder's to judge (it has its own limit)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return None
    except Image.DecompressionBombError as err:
        return f"cannot read image {path}: {err}"
    except OSError as err:  # the decoder's words, so the CLI and the page give the same reason
        if err.errno is not None and not isinstance(err, UnidentifiedImageError):
            return f"cannot read image {path}: {err.strerror or err}"
        from facefind.trainer.decode import unidentified_reason  # numpy + Pillow only, no torch

        with open(path, "rb") as fh:
            head = fh.read(4096)
        return f"cannot read image {path}: {unidentified_reason(head) if head else 'empty file'}"


def require_image(path: Path) -> None:
    """ImageError unless ``path`` is a readable image file (see ``image_problem``)."""
    problem = image_problem(path)
    if problem is not None:
        raise ImageError(problem)


DEVICE_LOGGER = "facefind.trainer.device"  # its one INFO line: the device, and on the CPU the threads


def show_device_line() -> None:
    """Let the device line through for this command (train, tune, index: a person waits on them and
    may want to know what runs them); the root callback keeps it for ``-v`` elsewhere."""
    logger = logging.getLogger(DEVICE_LOGGER)
    if logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def use_threads(threads: int | None) -> None:
    """Apply ``--threads`` before any device is resolved, so the automatic choice never overrides it."""
    if threads is not None:
        from facefind.trainer.device import set_threads  # torch: every command, query too, loads this module

        set_threads(threads)
