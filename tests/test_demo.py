"""`facefind demo`: the whole pipeline on synthetic faces, and a second run that reuses it all."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facefind.retrieval.cli import app
from facefind.retrieval.demo import DEMO_QUERIES, run_demo

pytestmark = pytest.mark.slow


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def test_demo_runs_end_to_end_then_reuses_everything(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--dir", str(folder), "--n", "200", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for expr in DEMO_QUERIES:
        assert f'query "{expr}"' in result.stdout
    assert "of 200 images match" in result.stdout
    assert "facefind query" in result.stdout  # the commands to go further
    assert "facefind serve --index" in " ".join(result.stdout.strip().splitlines()[-3:])  # last: the web page
    assert (folder / "model.pt").is_file() and (folder / "index" / "catalog.db").is_file()

    similar = folder / "similar.html"
    page = _Images()
    page.feed(similar.read_text(encoding="utf-8"))
    assert len(page.sources) == 5 and all(src.startswith("data:image/jpeg;base64,") for src in page.sources)

    again = run_demo(folder, n=200, epochs=1, device="cpu")
    assert [step.reused for step in again.steps[:3]] == [True, True, True]
    # the reference face itself comes back first from the similarity search, with cosine ~1
    top = again.similar.hits[0]
    assert Path(top.path) == again.similar_to and top.score == pytest.approx(1.0, abs=1e-3)
    assert again.similar.hits[1].score < 0.999  # embeddings are centred: other faces are not all ~1
    for result_ in again.queries:
        assert result_.n_indexed == 200 and len(result_.hits) <= 5


def test_demo_refuses_a_folder_made_with_another_size(tmp_path: Path) -> None:
    from facefind.trainer.synth import synthesize

    synthesize(tmp_path / "faces", n=250, seed=1)
    result = CliRunner().invoke(app, ["demo", "--dir", str(tmp_path), "--n", "200", "--device", "cpu"])
    assert result.exit_code == 1
    assert "holds a different synthetic set" in result.stderr and "Traceback" not in result.output


def test_printed_commands_and_paths_stay_whole_on_a_narrow_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    from facefind.retrieval.cli.demo import go_further, print_report
    from facefind.retrieval.demo import DemoReport, DemoStep

    folder = tmp_path / "a folder with a long name" / "facefind-demo"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "40")
    photo = folder / "faces" / "img_align_celeba" / "001038.jpg"
    report = DemoReport(folder=folder, faces=folder / "faces", model=folder / "model.pt", index=folder / "index",
                        similar_to=photo, galleries=[folder / "gallery.html", folder / "similar.html"],
                        steps=[DemoStep("train", 73.3, f"small_cnn at 64px -> {folder / 'model.pt'}; held-out test "
                                                       "mean accuracy 0.894, macro F1 0.562")])
    print_report(report)
    lines = capsys.readouterr().out.splitlines()
    commands = go_further(report)
    assert len(commands) == 6
    for command in commands:
        assert f"  {command}" in lines  # one line each, as pasted
    # Paths are relative to the current folder (they paste there) and quoted where they hold spaces.
    assert "'a folder with a long name/facefind-demo/faces/img_align_celeba/001038.jpg'" in commands[2]
    assert str(tmp_path) not in "\n".join(lines)
    train = next(line for line in lines if line.startswith("train"))
    assert train.endswith("-> a folder with a long name/facefind-demo/model.pt; held-out test mean accuracy 0.894, "
                          "macro F1 0.562")
