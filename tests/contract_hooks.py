"""Schemathesis hooks: how to make the two values of facefind's API that a JSON Schema cannot
generate, so that the fuzzer's "schema-valid" requests are valid (its other checks are unchanged).

- ``format: facefind-expression`` (``q``): an expression of the grammar (retrieval/query.py) over
  the index's attribute names: ``NAME``, ``not NAME``, ``NAME > 0.3``, joined by and/or.
- The upload's parts declared ``image/jpeg`` / ``image/png`` (/api/similar's ``encoding``): small
  synthetic faces (facefind.trainer.synth), encoded in that format.

Used by the suite's contract test and by the full fuzzer run (the exact command is in
tests/test_server.py's contract section):
    SCHEMATHESIS_HOOKS=contract_hooks PYTHONPATH=tests schemathesis run URL/openapi.json --checks all
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from facefind.indexer.faces.detect import find_face
from facefind.trainer.decode import decode_rgb
from facefind.trainer.synth import ATTRIBUTES, synthesize


def _literal() -> st.SearchStrategy[str]:
    name = st.sampled_from(ATTRIBUTES)
    cut = st.sampled_from(["0.1", "0.25", "0.5", "0.9"])
    return st.one_of(name, name.map(lambda n: f"not {n}"),
                     st.tuples(name, st.sampled_from([">", "<", ">=", "<="]), cut).map(" ".join))


EXPRESSIONS = st.lists(_literal(), min_size=1, max_size=3).flatmap(
    lambda parts: st.lists(st.sampled_from([" and ", " or "]), min_size=len(parts) - 1,
                           max_size=len(parts) - 1).map(
        lambda ops: parts[0] + "".join(op + p for op, p in zip(ops, parts[1:]))))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _faces() -> list[Image.Image]:
    """Synthetic faces (seed 0) that dlib finds, drawn once: every ``detect_face`` choice is then a
    valid request (a photo without a face is a 400, and the schema cannot say which photos have one)."""
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "faces", n=24, seed=0)
        images = []
        for path in sorted((Path(tmp) / "faces").rglob("*.jpg")):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            if all(find_face(decode_rgb(_encode(rgb, fmt))) is not None for fmt in ("JPEG", "PNG")):
                images.append(rgb)  # found as the server will decode it, in either format
        assert images, "dlib found no synthetic face"
        return images[:8]


FACES = _faces()


def _encoded(fmt: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([_encode(img, fmt) for img in FACES])


schemathesis.openapi.format("facefind-expression", EXPRESSIONS)
schemathesis.openapi.media_type("image/jpeg", _encoded("JPEG"))
schemathesis.openapi.media_type("image/png", _encoded("PNG"))
