"""A self-contained HTML page of query hits: thumbnails, rank, score and attribute chips.

One file, no external assets: thumbnails are small JPEGs embedded as base64 data URIs, so the page
can be mailed, archived or opened from any folder. Every piece of text (the query, paths,
attribute names) is HTML-escaped. An image that cannot be read gets a placeholder, never an error.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from pathlib import Path

from facefind.db.errors import FacefindError
from facefind.db.files import atomic_write_text
from facefind.retrieval.engine import Hit, Result
from facefind.retrieval.thumbnail import thumbnail_jpeg
from facefind.trainer.decode import Unreadable, decode_rgb

log = logging.getLogger(__name__)

MAX_OTHER_CHIPS = 8       # confident attributes shown besides the matched ones
PRESENT = 0.5             # probability above which an unmatched attribute gets a plain chip

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
header h1{font-size:1.3rem;margin:0 0 .3rem}
header code{background:#eee;padding:.15rem .4rem;border-radius:4px;font-size:1.05rem}
header p{margin:.2rem 0;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px;margin-top:1rem}
.card{width:max(var(--w),160px);background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px;
font-size:12px}
.card img,.missing{width:100%;height:var(--h);object-fit:contain;border-radius:4px;
background:#eee;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#888;text-align:center}
.meta{display:flex;justify-content:space-between;margin:.3rem 0;font-weight:600}
.path{color:#666;word-break:break-all;margin-bottom:.3rem}
.chip{display:inline-block;margin:1px;padding:1px 6px;border-radius:10px;background:#eee;
color:#333}
.chip.on{background:#1f6feb;color:#fff}
"""

_NAME_RE = re.compile(r"^(?:not\s+)?([A-Za-z0-9_]+)")


def thumbnail_data_uri(path: str | os.PathLike[str], size: int,
                       box: tuple[int, int, int, int] | None = None) -> str | None:
    """A base64 JPEG data URI of the image (its face at ``box``, when given) shrunk to fit ``size``
    pixels (``facefind.retrieval.thumbnail``, as the web page makes them), or None if unreadable."""
    try:
        data = thumbnail_jpeg(decode_rgb(os.fspath(path), libjpeg=False), size, box)  # no torch on the query path
    except Unreadable as err:
        log.debug("gallery: cannot read %s (%s); showing a placeholder", path, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def chip_label(literal: str, attributes: dict[str, float]) -> str:
    """A matched literal as a chip reads: "Name 0.93" always means P(Name) = 0.93, so a literal
    that is more than a bare name keeps its own words and gives the probability in parentheses:
    "not Male (Male 0.14)", "Young > 0.2 (Young 0.35)" (the engine words literals; see Hit.matched)."""
    m = _NAME_RE.match(literal)
    name = m.group(1) if m else literal
    prob = attributes.get(name)
    if prob is None:
        return literal
    return f"{name} {prob:.2f}" if literal == name else f"{literal} ({name} {prob:.2f})"


def _chips(hit: Hit) -> str:
    parts, shown = [], set()
    for text in hit.matched:
        m = _NAME_RE.match(text)
        shown.add(m.group(1) if m else text)
        parts.append(f'<span class="chip on" title="matched">{html.escape(chip_label(text, hit.attributes))}</span>')
    others = sorted(((p, a) for a, p in hit.attributes.items() if a not in shown and p >= PRESENT),
                    reverse=True)[:MAX_OTHER_CHIPS]
    parts += [f'<span class="chip">{html.escape(f"{a} {p:.2f}")}</span>' for p, a in others]
    return "".join(parts)


def _file_uri(path: str) -> str | None:
    try:
        return Path(path).resolve().as_uri()
    except (ValueError, OSError):
        return None


def _card(rank: int, hit: Hit, size: int) -> str:
    uri = thumbnail_data_uri(hit.path, size, hit.box)
    face = f" [face {hit.face}]" if hit.box is not None else ""
    alt = html.escape(f"#{rank} {Path(hit.path).name}{face}")
    picture = (f'<img src="{uri}" alt="{alt}">' if uri is not None
               else f'<div class="missing">image not found<br>{html.escape(Path(hit.path).name)}</div>')
    link = _file_uri(hit.path)
    if link is not None:
        picture = f'<a href="{html.escape(link)}">{picture}</a>'
    return (f'<div class="card" data-id="{hit.id}">{picture}'
            f'<div class="meta"><span>#{rank}</span><span>{hit.score:.4f}</span></div>'
            f'<div class="path">{html.escape(hit.path + face)}</div>{_chips(hit)}</div>')


def render_gallery(result: Result, *, title: str | None = None, thumbnail_size: int = 128) -> str:
    """The gallery page of ``result`` as an HTML string (see ``write_gallery``)."""
    query = result.expression if result.expression else "(all images)"
    heading = title or "facefind"
    summary = [f"{result.total:,} of {result.n_indexed:,} images match"]
    if result.hits:
        summary.append(f"showing ranks {result.offset + 1}-{result.offset + len(result.hits)}")
    summary.append(f"ranked by {result.ranking}")
    cards = [_card(result.offset + i + 1, h, thumbnail_size) for i, h in enumerate(result.hits)]
    missing = sum('class="missing"' in c for c in cards)
    if missing:
        log.warning("gallery: %d of %d images could not be read; they show a placeholder",
                    missing, len(cards))
    size = f"--w:{thumbnail_size + 40}px;--h:{thumbnail_size}px"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(f'{heading}: {query}')}</title><style>{_CSS}</style></head>\n"
        f"<body style=\"{size}\"><header><h1>{html.escape(heading)}</h1>"
        f"<p>query <code>{html.escape(query)}</code></p>"
        f"<p>{html.escape(' · '.join(summary))}</p></header>\n"
        f"<main class=\"grid\">\n{chr(10).join(cards)}\n</main></body></html>\n"
    )


def write_gallery(path: str | os.PathLike[str], result: Result, *, title: str | None = None,
                  thumbnail_size: int = 128) -> Path:
    """Write the gallery of ``result`` to ``path`` atomically (temp file, fsync, rename).

    The query heads the page with "N of M images match"; ``title`` replaces the heading (e.g.
    "similar to face.jpg"). Missing or unreadable images get a placeholder.
    """
    if thumbnail_size < 16:
        raise FacefindError(f"thumbnail size {thumbnail_size} is too small: use 16 pixels or more")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_gallery(result, title=title, thumbnail_size=thumbnail_size)
    atomic_write_text(out, page)
    return out
