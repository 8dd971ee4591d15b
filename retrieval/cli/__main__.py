"""``python -m facefind.retrieval.cli``: the same as the ``facefind`` command."""

from facefind.retrieval.cli import main

main()
