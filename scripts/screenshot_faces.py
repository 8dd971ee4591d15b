"""Regenerate docs/faces.png: the search page showing a group photo's faces found and searchable.

    python scripts/screenshot_faces.py [--out docs/faces.png] [--work DIR] [--chromium PATH]

Synthetic faces only (facefind.trainer.synth, the ones dlib's HOG finds, see tests/helpers.py): a group
photo of four, a pair, and aligned crops, one of them the same picture as a group face. They are
indexed one entry per face (`facefind index --detect-faces --identity`, with a freshly calibrated
tiny model: its attributes mean nothing, the faces and boxes are real detections), served by
`facefind serve`, and the system Chromium (never `playwright install`) photographs the page ranked
by person to one group face, with that face's panel open: the whole photo, a box on every face.
The PNG is quantised to 256 colours to stay small. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from PIL import Image
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers that compose photos; facefind itself: `pip install -e .`

from helpers import compose, detectable_faces  # noqa: E402

from facefind.retrieval.bench.serve import CHROMIUM_ARGS, Served, chromium_binary  # noqa: E402
from facefind.retrieval.cli import app  # noqa: E402

# (face, left, top, scale) on a 900x380 canvas; face 1 is also indexed alone, as crop-1.jpg.
GROUP = [(0, 20, 70, 1.0), (1, 230, 40, 1.2), (2, 480, 80, 0.95), (3, 680, 50, 1.05)]
PAIR = [(4, 30, 30, 1.0), (5, 260, 40, 1.0)]
VIEWPORT = {"width": 1280, "height": 760}


def build(work: Path) -> tuple[Path, dict[str, list[dict]]]:
    """The photos and their index under ``work``; the index's entries by file name."""
    faces, model = detectable_faces(work, n=16, seed=5)
    folder = work / "photos"
    folder.mkdir()
    Image.fromarray(compose(faces, GROUP, (380, 900), background=228)).save(folder / "group.jpg", quality=92)
    Image.fromarray(compose(faces, PAIR, (300, 520), background=214)).save(folder / "pair.jpg", quality=92)
    for i in (1, 6, 7):
        Image.fromarray(faces[i]).save(folder / f"crop-{i}.jpg", quality=92)

    def cli(*args: str | Path) -> dict:
        result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
        if result.exit_code != 0:
            raise SystemExit(result.output)
        return json.loads(result.stdout)

    index = work / "index"
    cli("index", folder, "--model", model, "--index", index, "--workers", "0", "--detect-faces", "--identity")
    entries: dict[str, list[dict]] = {}
    for h in cli("query", "--index", index, "--limit", "100")["hits"]:
        entries.setdefault(Path(h["path"]).name, []).append(h)
    found = {name: len(hits) for name, hits in entries.items()}
    if found.get("group.jpg") != len(GROUP) or found.get("pair.jpg") != len(PAIR):
        raise SystemExit(f"the detector did not find every drawn face: {found}")
    return index, entries


def shoot(index: Path, entries: dict[str, list[dict]], out: Path, chromium: str | None) -> None:
    from playwright.sync_api import sync_playwright  # optional: only this step needs it

    binary = chromium or chromium_binary()
    if binary is None:
        raise SystemExit("no Chromium binary: apt-get install -y --no-install-recommends chromium (or --chromium)")
    group = sorted(entries["group.jpg"], key=lambda h: h["face"])
    target = next(h for h in group if h["box"][0] > 200 and h["box"][0] < 450)  # GROUP's face 1
    args = [sys.executable, "-c", "from facefind.retrieval.cli import main; main()", "serve", "--index", str(index),
            "--port", "0", "--device", "cpu"]
    with Served(args, timeout=180) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=VIEWPORT, bypass_csp=True).new_page()
        page.goto(server.url + "?" + urlencode({"like_id": target["id"], "by": "person", "sel": target["id"]}))
        page.wait_for_selector(f"#panel .facebox.on[data-id='{target['id']}']", timeout=60_000)
        page.wait_for_function("() => [...document.querySelectorAll('img.thumb, #ref img')]"
                               ".every((i) => i.complete && i.naturalWidth > 0)", timeout=60_000)
        shot = out.with_suffix(".raw.png")
        page.screenshot(path=str(shot))
        browser.close()
    with Image.open(shot) as img:
        img.convert("RGB").quantize(256).save(out, optimize=True)
    shot.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "faces.png")
    parser.add_argument("--work", type=Path, help="folder for the photos and index (default: a temporary one)")
    parser.add_argument("--chromium", help="the Chromium binary (default: /usr/bin/chromium or one on PATH)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="facefind-shot-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        index, entries = build(work)
        shoot(index, entries, args.out, args.chromium)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
