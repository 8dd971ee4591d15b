"""`facefind serve`: the web page and JSON API over the index; `facefind bench serve`: its latency.

FastAPI, uvicorn and the app (and the benchmark, which imports them) are imported inside the
commands, so `facefind query` (which loads every command module) never pays for them.
"""

from __future__ import annotations

import logging
import threading
import webbrowser
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from facefind.db.errors import FacefindError
from facefind.retrieval.cli.bench import bench_app
from facefind.retrieval.cli.common import DeviceOpt, IndexOpt, JsonOpt, guard, index_or_demo_hint, print_json
from facefind.retrieval.web.server import bind_socket, is_loopback  # stdlib only

log = logging.getLogger(__name__)


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind beyond this machine without a token (anyone on the network could search)."""
    if not is_loopback(host) and not token:
        raise FacefindError(f"--host {host} lets other machines connect: also pass --token SECRET "
                            "(every request must then carry it), or keep the default --host 127.0.0.1")
    if token is not None and len(token) < 8:
        raise FacefindError("--token must be at least 8 characters (e.g. `python -c 'import secrets; "
                            "print(secrets.token_urlsafe())'`)")


def serve(
    index_dir: IndexOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Require this secret on every request (header, cookie or ?token=).",
                     envvar="FACEFIND_TOKEN", show_default=False),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a web browser.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Serve a web page to search the index by attributes and by example, and its JSON API (/docs)."""
    check_bind(host, token)
    import uvicorn  # here, not at the top: `facefind query` imports this module (see above)

    from facefind.retrieval.web.app import create_app

    app = create_app(index_or_demo_hint(index_dir), token=token, device=device)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
    n = len(app.state.source.current().engine)
    typer.echo(f"facefind serve: {n:,} images at {url}  (API docs: /docs; Ctrl-C stops)", err=False)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.source.close()


def bench_serve(
    n: Annotated[int, typer.Option("--n", min=100, help="Images in the synthetic index (CelebA: 202,599).")] = 202_599,
    repeats: Annotated[int, typer.Option("--repeats", min=5, help="Timed requests per kind.")] = 200,
    clients: Annotated[int, typer.Option("--clients", min=1, help="Concurrent clients in the load run.")] = 8,
    requests: Annotated[int, typer.Option("--requests", min=1, help="Requests per client in the load run.")] = 200,
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Also time the page in Chromium.")] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """API latency over loopback HTTP beside the engine's own time, a concurrent load run, and
    (with Chromium) the time from navigation to 60 thumbnails painted."""
    from facefind.retrieval.bench.serve import run_serve_bench  # imports uvicorn and the app (see above)

    result = run_serve_bench(n=n, repeats=repeats, clients=clients, requests=requests, browser=browser,
                             seed=seed)
    if as_json:
        print_json(result)
        return
    _show(result)


def _show(result: dict[str, Any]) -> None:
    table = Table("", "engine p50", "engine p99", "HTTP p50", "HTTP p99", "HTTP - engine p50",
                  title=f"facefind serve, {result['n']:,} images, {result['limit']} hits (ms)")
    for name, row in result["latency"].items():
        table.add_row(name, *(f"{row[k]:.2f}" for k in ("engine_p50_ms", "engine_p99_ms", "http_p50_ms",
                                                          "http_p99_ms", "overhead_p50_ms")))
    Console().print(table)
    load = result["load"]
    typer.echo(f"load: {load['clients']} clients x {load['requests']} mixed requests: {load['errors']} errors, "
               f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['requests_per_s']:.0f} req/s")
    page = result.get("browser")
    if page:
        typer.echo(f"Chromium ({page['count']}): navigation -> 60 thumbnails painted: cold {page['cold_ms']:.0f} ms, "
                   f"warm {page['warm_ms']:.0f} ms; jump to the middle -> 60 painted {page['jump_to_middle_ms']:.0f} ms; "
                   f"scrolling: frame p50 {page['scroll_frame_p50_ms']:.1f} ms, p99 {page['scroll_frame_p99_ms']:.1f} ms, "
                   f"at most {page['max_cards_in_dom']} cards in the DOM")
    elif result.get("browser_skipped"):
        typer.echo(f"Chromium: skipped ({result['browser_skipped']})")


def register(app: typer.Typer) -> None:
    """Add `serve`, and `bench serve` to the bench group."""
    app.command("serve", help="Serve a web page and JSON API to search faces (binds 127.0.0.1 by default).")(
        guard(serve))
    bench_app.command("serve")(guard(bench_serve))
