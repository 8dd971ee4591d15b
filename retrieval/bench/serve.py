"""`facefind bench serve`: the web API's latency over loopback HTTP beside the engine's own time,
a concurrent load run, and the page's time to 60 thumbnails in Chromium.

The index is ``facefind.retrieval.bench.query.synthetic_snapshot`` (CelebA-like probabilities, labels and
512-d embeddings at any size) with its paths pointing, in turn, at a few hundred synthetic face
files, so thumbnails are real. The server runs in its own process (``serve_main``), as
`facefind serve` would, and every query answer carries ``Server-Timing: engine;dur=MS``, the
time spent inside ``Engine.query``; the difference to the client's wall time is what HTTP,
routing and JSON cost. Clients use keep-alive connections from the stdlib.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlencode, urlsplit

import numpy as np
import uvicorn

from facefind.db.snapshot import PathList
from facefind.retrieval.bench.query import EXPRESSIONS, synthetic_snapshot
from facefind.retrieval.engine import Engine
from facefind.retrieval.web.app import create_app
from facefind.retrieval.web.live import FixedIndex, Labels
from facefind.retrieval.web.server import bind_socket
from facefind.trainer.synth import synthesize

log = logging.getLogger(__name__)

N_FACE_FILES = 600   # distinct image files behind the synthetic index's paths
PAGE = 60            # hits per page, as the page asks for them
BROWSER_QUERY = "not Bald"  # ~98% of a CelebA-like index: the 'huge result' case for the page
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def chromium_binary() -> str | None:
    """The system Chromium (``$FACEFIND_CHROMIUM``, /usr/bin/chromium, or one on PATH), or None."""
    for candidate in (os.environ.get("FACEFIND_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- the server process ---------------------------------------------------------------------


def synthetic_source(n: int, seed: int, faces: Path) -> FixedIndex:
    """A ``FixedIndex`` over a synthetic snapshot of ``n`` images whose paths cycle over ``faces``."""
    files = sorted(str(p) for p in faces.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no face files in {faces}")
    snap, labels = synthetic_snapshot(n, seed=seed)
    snap = dataclasses.replace(snap, paths=PathList.from_list([files[i % len(files)] for i in range(n)]))
    return FixedIndex(Engine(snap), Labels(snap.ids, np.ascontiguousarray(labels.T), list(snap.attributes)))


def serve_main(argv: Sequence[str] | None = None) -> None:
    """``N SEED FACES THUMBS``: serve a synthetic index on a free loopback port; prints the URL."""
    n, seed, faces, thumbs = (argv if argv is not None else sys.argv[1:])[:4]
    source = synthetic_source(int(n), int(seed), Path(faces))
    engine = source.current().engine
    engine.query(None, limit=1, like_id=int(engine.ids[0]))  # build the similarity index before timing
    app = create_app(source=source, thumbs_dir=Path(thumbs))
    sock = bind_socket("127.0.0.1", 0)
    print(f"URL http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


class Served:
    """A server subprocess (``serve_main`` or `facefind serve`), stopped on exit."""

    def __init__(self, args: list[str], timeout: float = 600.0, env: dict[str, str] | None = None) -> None:
        root = str(Path(__file__).resolve().parents[2])
        full_env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=full_env, cwd=root)
        self.url = self._wait_for_url(timeout)
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", int(parts.port or 80)

    def _wait_for_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"(http://[^\s]+/)", line)
            if found:
                threading.Thread(target=self._drain, daemon=True).start()
                return found.group(1)
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(seen[-20:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log.debug("server: %s", line.rstrip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTP timing ---------------------------------------------------------------------------------


def timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[int, float, float | None, bytes]:
    """(status, wall seconds, engine seconds from Server-Timing or None, body) of one GET."""
    start = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    wall = time.perf_counter() - start
    found = re.search(r"engine;dur=([0-9.]+)", resp.getheader("Server-Timing") or "")
    return resp.status, wall, float(found.group(1)) / 1e3 if found else None, body


def _ms(samples: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples, dtype=np.float64) * 1e3, q)), 3)


def latency(served: Served, kinds: dict[str, Sequence[str]], repeats: int) -> dict[str, dict[str, float]]:
    """Per kind of request: engine and wall-clock percentiles over ``repeats`` GETs.

    The kinds take turns (one request of each, round after round), so that every kind sees the
    same machine: on a shared 2-core box the load swings by 10x within a minute.
    """
    conn = http.client.HTTPConnection(served.host, served.port, timeout=60)
    for paths in kinds.values():  # warm: per-attribute log-odds rows, the connection
        for path in paths[:3]:
            timed_get(conn, path)
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    engines: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(repeats):
        for kind, paths in kinds.items():
            path = paths[i % len(paths)]
            status, wall, engine, body = timed_get(conn, path)
            if status != 200 or engine is None:
                raise RuntimeError(f"GET {path} -> {status}: {body[:200]!r}")
            walls[kind].append(wall)
            engines[kind].append(engine)
    conn.close()
    out = {}
    for kind in kinds:
        overhead = np.asarray(walls[kind]) - np.asarray(engines[kind])
        out[kind] = {"engine_p50_ms": _ms(engines[kind], 50), "engine_p99_ms": _ms(engines[kind], 99),
                     "http_p50_ms": _ms(walls[kind], 50), "http_p99_ms": _ms(walls[kind], 99),
                     "overhead_p50_ms": _ms(overhead, 50), "overhead_p99_ms": _ms(overhead, 99),
                     "requests": repeats}
    return out


def mixed_requests(ids: Sequence[int], expressions: Sequence[str]) -> list[tuple[str, int]]:
    """The load run's request mix: (path, expected status), hostile ones included."""
    out: list[tuple[str, int]] = []
    for i, expr in enumerate(expressions):
        image = ids[(i * 7919) % len(ids)]
        out += [
            ("/api/query?" + urlencode({"q": expr, "limit": PAGE}), 200),
            ("/api/query?" + urlencode({"q": expr, "limit": PAGE, "offset": 600, "eval": "false"}), 200),
            ("/api/query?" + urlencode({"q": expr, "limit": PAGE, "like_id": image}), 200),
            (f"/api/images/{image}?" + urlencode({"q": expr}), 200),
            (f"/api/images/{image}/thumb", 200),
            ("/api/attributes", 200),
            ("/api/info", 200),
            ("/api/query?" + urlencode({"q": expr + " and Eyeglases"}), 400),
            ("/api/images/..%2f..%2fetc%2fpasswd/full", 404),
            ("/api/images/999999999/thumb", 404),
        ]
    return out


def load_run(served: Served, mix: Sequence[tuple[str, int]], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads, each with its own keep-alive connection, make ``requests`` requests."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(served.host, served.port, timeout=60)
        for i in range(requests):
            path, expected = mix[(c * 31 + i) % len(mix)]
            try:
                status, wall, _, body = timed_get(conn, path)
            except (OSError, http.client.HTTPException) as err:
                errors.append(f"{path}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(served.host, served.port, timeout=60)
                continue
            lat[c].append(wall)
            if status != expected or b"Traceback" in body:
                errors.append(f"{path}: {status} (expected {expected})")
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    walls = [w for per in lat for w in per]
    return {"clients": clients, "requests": requests, "errors": len(errors), "error_samples": errors[:5],
            "p50_ms": _ms(walls, 50), "p99_ms": _ms(walls, 99), "requests_per_s": round(len(walls) / seconds, 1),
            "server_alive": served.alive()}


# -- the page in Chromium ---------------------------------------------------------------------------

PAINTED_JS = """(want) => {
  const shown = [...document.querySelectorAll('img.thumb')].filter((i) => {
    const r = i.getBoundingClientRect();
    return i.complete && i.naturalWidth > 0 && r.top >= 0 && r.bottom <= innerHeight;
  });
  return shown.length >= want;
}"""
AFTER_PAINT_JS = "() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))"
JUMP_JS = """() => { const g = document.getElementById('grid');
  window.scrollTo(0, g.offsetTop + g.offsetHeight / 2); return performance.now(); }"""
SCROLL_JS = """async (steps) => {
  const deltas = []; let last = performance.now(), cards = 0;
  for (let i = 0; i < steps; i++) {
    window.scrollBy(0, 1200);
    await new Promise((r) => requestAnimationFrame(r));
    const now = performance.now(); deltas.push(now - last); last = now;
    cards = Math.max(cards, document.querySelectorAll('.card').length);
  }
  return { deltas, cards };
}"""


def first_paint(url: str, want: int = PAGE) -> float:
    """In Chromium, on a server that has just started: milliseconds from navigation to ``want``
    thumbnails painted on the page's first view (no query: what a first visitor sees), which the
    server's background thumbnail warmer (web/thumbs.Warmer) races to make ahead."""
    from playwright.sync_api import sync_playwright  # optional (the dev extra): imported only to time the page

    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no Chromium binary")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1700}, bypass_csp=True).new_page()
            page.goto(url, wait_until="commit")
            page.wait_for_function(PAINTED_JS, arg=want, timeout=60_000, polling="raf")
            return round(float(page.evaluate(AFTER_PAINT_JS)), 1)
        finally:
            browser.close()


def page_timings(url: str, want: int = PAGE, runs: int = 2, scroll_steps: int = 240) -> dict[str, Any]:
    """In Chromium: milliseconds from navigation start to ``want`` thumbnails decoded and painted
    on screen (run 1 cold: the server makes every thumbnail; later runs find them cached but start
    with an empty browser cache); a jump to the middle of the result until ``want`` thumbnails
    show; and frame times while scrolling 1,200 px per frame, with the most cards the DOM held."""
    from playwright.sync_api import sync_playwright  # optional (the dev extra): imported only to time the page

    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no Chromium binary")
    times: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        try:
            for _ in range(runs):
                context = browser.new_context(viewport={"width": 1600, "height": 1700}, bypass_csp=True)
                page = context.new_page()
                page.goto(url, wait_until="commit")
                page.wait_for_function(PAINTED_JS, arg=want, timeout=60_000, polling="raf")
                times.append(float(page.evaluate(AFTER_PAINT_JS)))
                context.close()
            context = browser.new_context(viewport={"width": 1600, "height": 1700}, bypass_csp=True)
            page = context.new_page()
            page.goto(url)
            page.wait_for_function(PAINTED_JS, arg=want, timeout=60_000, polling="raf")
            start = float(page.evaluate(JUMP_JS))
            page.wait_for_function(PAINTED_JS, arg=want, timeout=60_000, polling="raf")
            jump = float(page.evaluate(AFTER_PAINT_JS)) - start
            scroll = page.evaluate(SCROLL_JS, scroll_steps)
            count = page.inner_text("#count")
            context.close()
        finally:
            browser.close()
    frames = scroll["deltas"][1:]
    return {"cold_ms": round(times[0], 1), "warm_ms": round(min(times[1:] or times), 1), "runs_ms": times,
            "jump_to_middle_ms": round(jump, 1), "scroll_frame_p50_ms": round(float(np.median(frames)), 1),
            "scroll_frame_p99_ms": round(float(np.percentile(frames, 99)), 1), "max_cards_in_dom": scroll["cards"],
            "count": count, "viewport": "1600x1700", "thumbnails": want}


# -- the benchmark ---------------------------------------------------------------------------------


def run_serve_bench(n: int = 202_599, repeats: int = 200, clients: int = 8, requests: int = 200,
                    browser: bool = True, seed: int = 0) -> dict[str, Any]:
    """Latency (engine vs HTTP), load and page timings on a synthetic index of ``n`` images."""
    with tempfile.TemporaryDirectory(prefix="facefind-bench-serve-") as work:
        faces_root = Path(work) / "faces"
        synthesize(faces_root, n=N_FACE_FILES, seed=seed)
        faces = faces_root / "img_align_celeba"
        args = [sys.executable, "-c", "from facefind.retrieval.bench.serve import serve_main; serve_main()",
                str(n), str(seed), str(faces), str(Path(work) / "thumbs")]
        t0 = time.perf_counter()
        with Served(args) as served:
            startup = time.perf_counter() - t0
            cold_first_view = None
            if browser:  # first, while the server is cold: the "first paint" figure
                try:
                    cold_first_view = first_paint(served.url)
                except (ImportError, FileNotFoundError):
                    pass
            rng = np.random.default_rng(seed)
            ids = [int(i) for i in rng.integers(1, n + 1, 64)]
            plain = ["/api/query?" + urlencode({"q": e, "limit": PAGE, "eval": "false"}) for e in EXPRESSIONS]
            rows = latency(served, {
                "query (filter + rank)": plain,
                "query + quality block": ["/api/query?" + urlencode({"q": e, "limit": PAGE}) for e in EXPRESSIONS],
                "query with like_id": ["/api/query?" + urlencode({"q": e, "limit": PAGE, "like_id": ids[i % len(ids)],
                                                                   "eval": "false"})
                                       for i, e in enumerate(list(EXPRESSIONS) * 8)],
                "like_id, no filter": ["/api/query?" + urlencode({"limit": PAGE, "like_id": i, "eval": "false"})
                                       for i in ids],
            }, repeats)
            totals = {e: json.loads(timed_get(http.client.HTTPConnection(served.host, served.port),
                                              "/api/query?" + urlencode({"q": e, "limit": 0}))[3])["total"]
                      for e in EXPRESSIONS}
            load = load_run(served, mixed_requests(ids, EXPRESSIONS), clients, requests)
            result: dict[str, Any] = {"n": n, "limit": PAGE, "startup_s": round(startup, 1), "latency": rows,
                                      "totals": totals, "load": load, "cold_first_view_ms": cold_first_view}
            if browser:
                try:
                    result["browser"] = page_timings(served.url + "?" + urlencode({"q": BROWSER_QUERY}))
                except (ImportError, FileNotFoundError) as err:
                    result["browser_skipped"] = str(err)
    return result
