"""The facefind exception family.

Every error a user can cause (a missing folder, a bad checkpoint, a malformed query) raises a
``FacefindError`` whose message says what went wrong *and what to do about it*. The CLI turns these
into a one-line message and exit code 1; anything else is a bug and keeps its traceback.

This module lives in ``db`` because ``db`` is the one package every other package may import
(``db`` itself imports nothing of ours).
"""

from __future__ import annotations


class FacefindError(Exception):
    """A problem the user can fix. ``str(err)`` is a complete, one-line instruction."""


class DatasetError(FacefindError):
    """A dataset folder or annotation file is missing, malformed or inconsistent."""


class ModelError(FacefindError):
    """A checkpoint is missing, truncated, foreign, or does not fit the index."""


class ImageError(FacefindError):
    """A single image given on the command line cannot be read or holds no face."""


class CatalogError(FacefindError):
    """The index (catalog, vectors, sidecar files) is missing, empty, or inconsistent."""


class QuerySyntaxError(FacefindError):
    """A query expression cannot be parsed or names an unknown attribute.

    ``position`` is the 0-based character offset of the problem in ``expression``; ``render()``
    shows the expression with a caret under that position.
    """

    def __init__(self, message: str, expression: str = "", position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression
        self.position = position

    def render(self) -> str:
        if self.position is None or not self.expression or "\n" in self.expression:
            return self.message
        return f"{self.message}\n  {self.expression}\n  {' ' * self.position}^"
