"""One-call GPU check: install, CUDA tests, benchmarks, real-data accuracy, fast-vs-simple agreement.

Driven by scripts/gpu_check.sh (see docs/GPU.md). Two phases:

    prepare   here, with the package registry: wheels of what the GPU machine lacks -> .gpu-wheels/,
              the real CelebA sample as one tar -> .gpu-data/; checks that all that travels fits.
    run       there, offline: every step in its own process with its own timeout (and one overall
              budget), logged to OUT/<step>.log (JSON results in OUT/<step>.json); a failed step is
              recorded and the next one runs. Ends with OUT/summary.json and a short table.

Standard library only: on the GPU machine this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLI = [PY, "-m", "facefind.retrieval.cli"]
MIB = 1 << 20
TRAVEL_LIMIT = 64 * MIB  # the device tool carries at most this much (working tree + carried folders)
TAR_NAME = "celeba-sample.tar.gz"
ANNOTATIONS = ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt")
# Runtime dependencies the GPU machine already has (or that cannot travel: dlib's models are ~100 MB;
# face detection imports dlib lazily and is not part of this check).
ON_MACHINE = {"torch", "torchvision", "numpy", "pandas", "pillow", "typer", "rich", "click", "pygments",
              "dlib-bin", "face-recognition-models", "setuptools"}
EXTRA = ["pytest>=8"]  # to run the tests marked cuda
TARGETS = {  # issue 24, on one H200 at full size
    "bench-index": "index 202,599 >= 13,500 img/s and >= 9x the same-settings pipeline",
    "bench-train-resnet50": "resnet50 training >= 4,000 img/s",
    "bench-train-densenet121": "densenet121 training >= 2,500 img/s",
}
# Fast path (CUDA: bf16 autocast, channels_last) against the simple path (CPU float32), same inputs.
PROB_TOL = 0.02       # max |p_cuda - p_cpu| over every image and attribute
DECISION_MIN = 0.99   # share of (image, attribute) decisions that must agree
METRIC_TOL = 0.005    # |mean accuracy / macro F1 difference| on the val split


class CheckError(Exception):
    """A problem the user fixes (missing sample, over the size limit); shown as one line."""


# ------------------------------------------------------------------------------------------ prepare


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def missing_requirements() -> list[str]:
    """The project's runtime dependencies that the GPU machine lacks, as pyproject states them."""
    import tomllib  # Python 3.11+: prepare runs on the development machine

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for spec in deps:
        name = spec.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if _norm(name) not in ON_MACHINE:
            out.append(spec)
    return out + EXTRA


def download_wheels(dest: Path, python_version: str) -> list[Path]:
    """``pip download`` the missing requirements and their dependencies for manylinux x86_64."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [PY, "-m", "pip", "download", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "--abi", abi, "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "any", "-d", str(dest),
           "--quiet", *missing_requirements()]
    print("pip download:", " ".join(missing_requirements()), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise CheckError("pip download failed (see above); check the network to the package registry")
    wheels = []
    for whl in sorted(dest.glob("*.whl")):
        if _norm(whl.name.split("-")[0]) in ON_MACHINE:
            whl.unlink()  # pulled in as a dependency, but the GPU machine has it
        else:
            wheels.append(whl)
    return wheels


def _split_of(sample: Path) -> dict[str, str]:
    parts = {}
    for line in (sample / "list_eval_partition.txt").read_text().splitlines():
        bits = line.split()
        if len(bits) == 2:
            parts[bits[0]] = bits[1]
    return parts


def _filtered(path: Path, keep: set[str], header_lines: int) -> bytes:
    """An annotation file cut down to the images in ``keep`` (line endings kept; count updated)."""
    lines = path.read_bytes().splitlines(keepends=True)
    head, rows = lines[:header_lines], [ln for ln in lines[header_lines:] if ln.split()[:1]
                                         and ln.split()[0].decode() in keep]
    if header_lines == 2:  # list_attr_celeba.txt: line 1 is the row count
        head[0] = str(len(rows)).encode() + (b"\r\n" if head[0].endswith(b"\r\n") else b"\n")
    return b"".join(head + rows)


def _reencode(path: Path, quality: int) -> bytes:
    from PIL import Image  # prepare only

    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def build_sample_tar(sample: Path, dest: Path, byte_budget: int, quality: int) -> dict[str, Any]:
    """Pack the real sample (images present + annotations cut to them) into one tar.gz under
    ``byte_budget``: as is if it fits, else re-encoded at ``quality``, else without the last
    train-split images (the val split always goes whole: it is what the accuracy is measured on)."""
    img_dir = sample / "img_align_celeba"
    if not img_dir.is_dir() or not all((sample / a).is_file() for a in ANNOTATIONS):
        raise CheckError(f"{sample} is not a CelebA sample folder (img_align_celeba/ and "
                         f"{', '.join(ANNOTATIONS)}): pass --sample")
    split = _split_of(sample)
    files = sorted(p for p in img_dir.glob("*.jpg"))
    order = [p for p in files if split.get(p.name) != "0"] + [p for p in files if split.get(p.name) == "0"]
    raw = sum(p.stat().st_size for p in files)
    reencode = raw + MIB > byte_budget
    blobs = [(p.name, _reencode(p, quality) if reencode else p.read_bytes()) for p in order]
    limit = byte_budget  # gzip squeezes the JPEGs a little; the loop below trims any overshoot
    while True:
        kept, used = [], 0
        for name, data in blobs:  # val first: only train images are ever left out
            if used + len(data) <= limit:
                kept.append((name, data))
                used += len(data)
        keep = {name for name, _ in kept}
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(f"celeba/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))

            for name, header in zip(ANNOTATIONS, (2, 0, 0)):
                add(name, _filtered(sample / name, keep, header))
            for name, data in sorted(kept):
                add(f"img_align_celeba/{name}", data)
        over = dest.stat().st_size - byte_budget
        if over <= 0:
            break
        limit -= over + 64 * 1024
    dropped = len(blobs) - len(kept)
    n_val = sum(split.get(n) == "1" for n in keep)
    return {"images": len(keep), "val_images": n_val, "train_images": len(keep) - n_val, "dropped": dropped,
            "reencoded_quality": quality if reencode else None, "bytes": dest.stat().st_size}


def tree_bytes() -> int:
    """Bytes of the working tree that travel: tracked files plus untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def prepare(args: argparse.Namespace) -> int:
    wheels_dir, data_dir, sample = Path(args.wheels), Path(args.data), Path(args.sample)
    if not all((sample / a).exists() for a in ("img_align_celeba", *ANNOTATIONS)):
        raise CheckError(f"{sample} is not a CelebA sample folder (img_align_celeba/ and "
                         f"{', '.join(ANNOTATIONS)}): pass --sample")
    for stale in [*wheels_dir.glob("*.whl"), data_dir / TAR_NAME, data_dir / "prepared.json"]:
        stale.unlink(missing_ok=True)  # only what prepare writes: these folders may be the user's
    wheels = download_wheels(wheels_dir, args.python_version)
    tree = tree_bytes()
    wheel_bytes = folder_bytes(wheels_dir)
    budget = TRAVEL_LIMIT - args.headroom_mib * MIB - tree - wheel_bytes
    if budget < 8 * MIB:
        raise CheckError(f"the tree ({tree / MIB:.1f} MiB) and wheels ({wheel_bytes / MIB:.1f} MiB) leave "
                         f"{budget / MIB:.1f} MiB for the sample: drop wheels or large files from the tree")
    info = build_sample_tar(sample, data_dir / TAR_NAME, budget, args.quality)
    total = tree + wheel_bytes + folder_bytes(data_dir)
    print(f"wheels   {len(wheels):3d} files  {wheel_bytes / MIB:6.1f} MiB  in {wheels_dir}")
    for w in wheels:
        print(f"           {w.name}  {w.stat().st_size / MIB:.2f} MiB")
    note = (f"re-encoded at JPEG quality {info['reencoded_quality']}" if info["reencoded_quality"]
            else "as published")
    print(f"sample   {info['images']} images ({info['train_images']} train, {info['val_images']} val; "
          f"{note}; {info['dropped']} train images left out to fit)  {info['bytes'] / MIB:6.1f} MiB  "
          f"in {data_dir / TAR_NAME}")
    print(f"tree     git ls-files (+ untracked, not ignored)  {tree / MIB:6.1f} MiB")
    print(f"total    {total / MIB:.1f} MiB of {TRAVEL_LIMIT / MIB:.0f} MiB that may travel")
    if total > TRAVEL_LIMIT:
        raise CheckError(f"{total / MIB:.1f} MiB would travel, over the {TRAVEL_LIMIT / MIB:.0f} MiB limit: "
                         "raise --headroom-mib or lower --quality")
    (data_dir / "prepared.json").write_text(json.dumps({**info, "wheels": [w.name for w in wheels],
                                                        "tree_bytes": tree, "total_bytes": total}, indent=2))
    rel = [str(d.resolve().relative_to(ROOT)) if d.resolve().is_relative_to(ROOT) else str(d)
           for d in (wheels_dir, data_dir)]
    print(f"carry: {json.dumps(rel)}")
    return 0


# ------------------------------------------------------------------------- helpers run as steps


def install(args: argparse.Namespace) -> int:
    """Wheels -> ``site`` (pip --target, offline; plain unzip when pip is missing), and the source
    tree as the ``facefind`` package (links to db/ trainer/ indexer/ retrieval/: no build needed)."""
    wheels, site = sorted(Path(args.wheels).glob("*.whl")), Path(args.site)
    if not wheels:
        print(f"no wheels in {args.wheels}: run `scripts/gpu_check.sh prepare` here and carry that folder")
        return 1
    site.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site), "--quiet",
           "--disable-pip-version-check", *map(str, wheels)]
    if subprocess.run(cmd).returncode != 0:
        print("pip install failed; unpacking the wheels instead")
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
    pkg = site / "facefind"
    pkg.mkdir(exist_ok=True)
    for folder in ("db", "trainer", "indexer", "retrieval"):
        link = pkg / folder
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / folder, target_is_directory=True)
    check = [PY, "-c", "import faiss, sqlalchemy, fastapi, pydantic, pytest, facefind.retrieval.cli;"
             "print('imports ok: faiss', faiss.__version__, '| sqlalchemy', sqlalchemy.__version__)"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(check, env=env).returncode


def environment(args: argparse.Namespace) -> int:
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            info["bf16"] = torch.cuda.is_bf16_supported()
    except ImportError as err:
        info["torch"] = f"missing ({err})"
    for mod in ("torchvision", "faiss", "sqlalchemy", "fastapi", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import dlib  # noqa: F401
        info["dlib"] = "present"
    except ImportError:
        info["dlib"] = "absent: face detection (predict --detect-face, index --faces) is not checked here"
    try:
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    print(json.dumps(info, indent=2))
    return 0


def unpack(args: argparse.Namespace) -> int:
    tar_path, dest = Path(args.tar), Path(args.dest)
    if not tar_path.is_file():
        print(f"no {tar_path}: run `scripts/gpu_check.sh prepare` here and carry its data folder")
        return 1
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    root = dest / "celeba"
    n = sum(1 for _ in (root / "img_align_celeba").glob("*.jpg"))
    print(json.dumps({"root": str(root), "images": n}))
    return 0


def _cli_json(cmd: list[str]) -> Any:
    r = subprocess.run(CLI + cmd, capture_output=True, text=True)
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        raise CheckError(f"`facefind {' '.join(cmd[:1])}` exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def agree(args: argparse.Namespace) -> int:
    """The fast path on ``--device`` against the CPU float32 path, on the same val images."""
    data, model = Path(args.data), Path(args.model)
    split = _split_of(data)
    images = sorted(p for p in (data / "img_align_celeba").glob("*.jpg") if split.get(p.name) == "1")[: args.n]
    if not images:
        print(f"no val-split images in {data}")
        return 1
    runs = {}
    for dev in (args.device, "cpu"):
        t0 = time.perf_counter()
        runs[dev] = _cli_json(["predict", *map(str, images), "--model", str(model), "--no-detect-face",
                               "--device", dev, "--json"])
        print(f"predict --device {dev}: {len(images)} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    fast, simple = runs[args.device], runs["cpu"]
    worst, total, pairs, same = 0.0, 0.0, 0, 0
    for a, b in zip(fast, simple):
        for name, p in a["attributes"].items():
            d = abs(p - b["attributes"][name])
            worst, total, pairs = max(worst, d), total + d, pairs + 1
            same += (name in a["present"]) == (name in b["present"])
    ev_cpu = _cli_json(["evaluate", str(model), str(data), "--split", "val", "--device", "cpu",
                        "--cache-dir", args.cache_dir, "--json"])
    ev_fast = json.loads(Path(args.eval_json).read_text())
    result = {
        "images": len(images), "device": args.device,
        "max_abs_prob_diff": round(worst, 5), "mean_abs_prob_diff": round(total / pairs, 6),
        "decision_agreement": round(same / pairs, 5),
        "val_mean_accuracy": {args.device: ev_fast["mean_accuracy"], "cpu": ev_cpu["mean_accuracy"]},
        "val_macro_f1": {args.device: ev_fast["macro_f1"], "cpu": ev_cpu["macro_f1"]},
        "tolerance": {"max_abs_prob_diff": PROB_TOL, "decision_agreement": DECISION_MIN, "metric": METRIC_TOL},
    }
    result["within_tolerance"] = bool(
        worst <= PROB_TOL and same / pairs >= DECISION_MIN
        and abs(ev_fast["mean_accuracy"] - ev_cpu["mean_accuracy"]) <= METRIC_TOL
        and abs(ev_fast["macro_f1"] - ev_cpu["macro_f1"]) <= METRIC_TOL)
    print(json.dumps(result, indent=2))
    return 0 if result["within_tolerance"] else 1


# ------------------------------------------------------------------------------------ the run


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: float
    figure: Callable[[Any, str], str] = lambda out, log: ""
    json: bool = False           # stdout is the step's JSON result (-> OUT/<name>.json)
    needs: list[str] = field(default_factory=list)
    target: Callable[[Any], bool] | None = None
    skip_reason: str = "--no-install: using this Python's packages"  # when argv is empty


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f} img/s"


def _index_figure(d: Any, _: str) -> str:
    b = d.get("baselines", {})
    study = b.get("study_style", {}).get("speedup")
    return f"{_fmt_rate(d['images_per_second'])}, {d['speedup']}x same-settings, {study}x study"


def _train_figure(d: Any, _: str) -> str:
    same = d.get("baselines", {}).get("same_settings", {}).get("images_per_s")
    return f"{_fmt_rate(d['images_per_second'])} (DataLoader {same:,.0f})" if same else _fmt_rate(d["images_per_second"])


def _pytest_figure(_: Any, log: str) -> str:
    lines = [ln.strip("= ") for ln in log.splitlines() if " in " in ln and any(
        w in ln for w in ("passed", "failed", "skipped", "error", "deselected"))]
    return lines[-1] if lines else ""


def _fit_figure(d: Any, _: str) -> str:
    return (f"val acc {d['val']['mean_accuracy']:.3f} (majority {d['val_majority_baseline']['mean_accuracy']:.3f}), "
            f"{_fmt_rate(d['train_images_per_s'])}")


def _agree_figure(d: Any, _: str) -> str:
    return (f"max |dp| {d['max_abs_prob_diff']:.4f}, decisions {100 * d['decision_agreement']:.2f}% same, "
            f"acc {'/'.join(f'{v:.4f}' for v in d['val_mean_accuracy'].values())}")


def plan(args: argparse.Namespace, work: Path, out: Path, site: Path) -> list[Step]:
    dev, small = args.device, args.small
    me = [PY, str(Path(__file__).resolve())]
    data, model, cache = work / "sample" / "celeba", work / "resnet18.pt", work / "cache"
    if small:  # the CPU dry run: every step, tiny sizes
        index = ["--n", "64", "--arch", "resnet18", "--img-size", "64", "--batch-size", "32", "--workers", "1"]
        train = ["--n", "16", "--img-size", "32", "--steps", "1", "--batch-size", "4", "--workers", "1"]
        query = ["--n", "2000", "--repeats", "3", "--queries", "5"]
        fit = ["--epochs", "1", "--subset", "64", "--img-size", "64", "--batch-size", "16"]
        ddp = ["--epochs", "1", "--subset", "48", "--img-size", "32", "--batch-size", "16"]
        agree_n = "16"
    else:
        index = ["--n", "202599"]
        train = ["--img-size", "native"]
        query = ["--n", "202599", "--repeats", "20", "--queries", "50"]
        fit = ["--epochs", "20", "--img-size", "native"]
        ddp = ["--epochs", "1", "--subset", "2048", "--img-size", "native", "--batch-size", "256"]
        agree_n = "256"
    steps = [
        Step("install", me + ["_install", "--wheels", args.wheels, "--site", str(site)], 120),
        Step("env", me + ["_env"], 60, lambda d, _: d.get("gpu") or f"no GPU (torch {d.get('torch')})", json=True),
        Step("bench-index", CLI + ["bench", "index", *index, "--device", dev, "--out", str(work / "bench-index"),
                                   "--json"], 300, _index_figure, json=True,
             target=lambda d: d["images_per_second"] >= 13_500 and d["speedup"] >= 9),
        Step("bench-train-resnet50", CLI + ["bench", "train", "--arch", "resnet50", *train, "--device", dev,
                                            "--json"], 90, _train_figure, json=True,
             target=lambda d: d["images_per_second"] >= 4_000),
        Step("bench-train-densenet121", CLI + ["bench", "train", "--arch", "densenet121", *train, "--device", dev,
                                               "--json"], 90, _train_figure, json=True,
             target=lambda d: d["images_per_second"] >= 2_500),
        Step("unpack", me + ["_unpack", "--tar", str(Path(args.data) / TAR_NAME), "--dest", str(work / "sample")],
             60, lambda d, _: f"{d['images']} images", json=True),
        Step("train-resnet18", CLI + ["train", str(data), "--arch", "resnet18", *fit, "--device", dev,
                                      "--out", str(model), "--cache-dir", str(cache), "--json"], 180,
             _fit_figure, json=True, needs=["unpack"]),
        Step("evaluate-val", CLI + ["evaluate", str(model), str(data), "--split", "val", "--device", dev,
                                    "--cache-dir", str(cache), "--json"], 60,
             lambda d, _: f"{d['n_images']} images: acc {d['mean_accuracy']:.3f}, macro F1 {d['macro_f1']:.3f}",
             json=True, needs=["train-resnet18"]),
        Step("agree", me + ["_agree", "--model", str(model), "--data", str(data), "--device", dev, "--n", agree_n,
                            "--eval-json", str(out / "evaluate-val.json"), "--cache-dir", str(cache)], 90,
             _agree_figure, json=True, needs=["evaluate-val"]),
        Step("cuda-tests", [PY, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "tests/test_reader.py",
                            "-q", "-p", "no:cacheprovider"], 150, _pytest_figure),
        Step("ddp", [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                     "facefind.retrieval.cli", "train", str(data), "--arch", "resnet18", *ddp, "--device", dev,
                     "--out", str(work / "ddp.pt"), "--cache-dir", str(cache), "--json"], 90,
             lambda d, _: f"1 rank ({'nccl' if dev.startswith('cuda') else 'gloo'}): {_fmt_rate(d['train_images_per_s'])}",
             json=True, needs=["unpack"]),
        Step("bench-query", CLI + ["bench", "query", *query, "--json"], 90,
             lambda d, _: f"filter+rank p50 {d['engine_p50_ms']} ms, {d['speedup']}x SQL (faiss on CPU)", json=True),
    ]
    if args.no_install:
        steps[0] = Step("install", [], 0)
    if args.steps:  # the named steps, what they need, and always install + env
        wanted = {"install", "env", *args.steps.split(",")}
        by_name = {s.name: s for s in steps}
        unknown = wanted - set(by_name)
        if unknown:
            raise CheckError(f"--steps: no step {', '.join(sorted(unknown))} (steps: {', '.join(by_name)})")
        todo = list(wanted)
        while todo:
            for need in by_name[todo.pop()].needs:
                if need not in wanted:
                    wanted.add(need)
                    todo.append(need)
        for step in steps:
            if step.name not in wanted:
                step.argv, step.skip_reason = [], "not in --steps"
    return steps


def _run_one(step: Step, out: Path, env: dict[str, str], timeout: float) -> tuple[str, int | None]:
    log = open(out / f"{step.name}.log", "w")
    stdout = open(out / f"{step.name}.json", "w") if step.json else log
    try:
        log.write(f"$ {' '.join(step.argv)}\n")
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=stdout, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return ("ok" if proc.wait(timeout=timeout) == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group: workers too
            proc.wait()
            log.write(f"\ntimed out after {timeout:.0f} s\n")
            return "timeout", None
    finally:
        log.close()
        if stdout is not log:
            stdout.close()


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    out = Path(args.out).resolve()
    names = [s.name for s in plan(args, out, out, out)]
    if args.fail_step and args.fail_step not in names:
        raise CheckError(f"--fail-step {args.fail_step}: no such step ({', '.join(names)})")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="facefind-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FACEFIND_CACHE": str(work / "cache")}
    if not args.no_install:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    steps = plan(args, work, out, site)
    deadline = t_start + args.budget
    records: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for step in steps:
        if args.fail_step == step.name:
            step.argv = [PY, "-c", "import sys; print('failure injected by --fail-step'); sys.exit(1)"]
        rec: dict[str, Any] = {"step": step.name, "status": "skipped", "figure": "", "seconds": 0.0,
                               "log": f"{step.name}.log"}
        missing = [n for n in step.needs if status.get(n) != "ok"]
        left = deadline - time.time()
        if not step.argv:
            rec["figure"] = step.skip_reason
        elif missing:
            rec["figure"] = f"needs {', '.join(missing)}"
        elif left < 10:
            rec["figure"] = f"no time left in the {args.budget:.0f} s budget"
        else:
            timeout = min(step.timeout, left)
            print(f"[{time.time() - t_start:5.0f} s] {step.name} (timeout {timeout:.0f} s)", flush=True)
            t0 = time.time()
            rec["status"], rec["returncode"] = _run_one(step, out, env, timeout)
            rec["seconds"] = round(time.time() - t0, 1)
            log_text = (out / f"{step.name}.log").read_text(errors="replace")
            result = None
            if step.json:
                try:
                    result = json.loads((out / f"{step.name}.json").read_text())
                    rec["result"] = f"{step.name}.json"
                except (OSError, ValueError):
                    result = None
            try:
                rec["figure"] = step.figure(result if result is not None else {}, log_text) if (
                    result is not None or not step.json) else ""
            except (KeyError, TypeError, ValueError) as err:
                rec["figure"] = f"(no figure: {err!r})"
            if rec["status"] != "ok" and not rec["figure"]:
                tail = [ln for ln in log_text.splitlines() if ln.strip()]
                rec["figure"] = tail[-1][:100] if tail else ""
            if step.target and result is not None and rec["status"] == "ok":
                measured = dev_is_cuda(args.device) and not args.small
                rec["target"] = TARGETS[step.name]
                rec["target_met"] = bool(step.target(result)) if measured else None
        status[step.name] = rec["status"]
        records.append(rec)
    summary = {
        "device": args.device, "small": args.small, "out": str(out), "work": str(work),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "seconds": round(time.time() - t_start, 1), "budget_s": args.budget,
        "tolerance": {"max_abs_prob_diff": PROB_TOL, "decision_agreement": DECISION_MIN, "metric": METRIC_TOL},
        "faiss_gpu": "facefind has no GPU FAISS path; faiss-gpu (~1.5 GB of CUDA wheels) cannot travel: "
                     "bench query runs faiss-cpu",
        "steps": records,
    }
    env_json = out / "env.json"
    if env_json.is_file():
        try:
            summary["env"] = json.loads(env_json.read_text())
        except ValueError:
            pass
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print_table(records, summary, out)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def dev_is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def print_table(records: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    def mark(r: dict[str, Any]) -> str:
        met = r.get("target_met")
        return "" if met is None else (" [target met]" if met else " [TARGET MISSED]")

    rows = [(r["step"], r["status"], f"{r['figure']}{mark(r)}", f"{r['seconds']:.1f}") for r in records]
    heads = ("step", "status", "key figure", "s")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    line = "  ".join("{:<%d}" % w for w in widths[:-1]) + "  {:>%d}" % widths[-1]
    print()
    print(line.format(*heads))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    failed = sum(r["status"] in ("failed", "timeout") for r in records)
    print(f"device {summary['device']}{' (small)' if summary['small'] else ''}: {len(records) - failed} of "
          f"{len(records)} steps not failed, {summary['seconds']:.0f} s; logs and summary.json in {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download wheels and pack the real sample (here, with network)")
    pp.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"))
    pp.add_argument("--data", default=str(ROOT / ".gpu-data"))
    pp.add_argument("--sample", default=str(ROOT.parent / "shared" / "celeba-sample"),
                    help="real CelebA sample folder (default: ../shared/celeba-sample)")
    pp.add_argument("--python-version", default="3.12", help="the GPU machine's Python (wheel tags)")
    pp.add_argument("--quality", type=int, default=75, help="JPEG quality when re-encoding is needed to fit")
    pp.add_argument("--headroom-mib", type=int, default=1, help="left free under the 64 MiB for tree growth")
    pr = sub.add_parser("run", help="run every step, offline (on the GPU machine)")
    pr.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    pr.add_argument("--small", action="store_true", help="tiny sizes: the CPU dry run")
    pr.add_argument("--out", default="gpu-check-out", help="folder for the logs and summary.json")
    pr.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    pr.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    pr.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"))
    pr.add_argument("--data", default=str(ROOT / ".gpu-data"), help=f"folder holding {TAR_NAME}")
    pr.add_argument("--no-install", action="store_true", help="use this Python's packages (no wheels)")
    pr.add_argument("--budget", type=float, default=525.0, help="seconds for the whole run (default 525)")
    pr.add_argument("--steps", default=None,
                    help="comma-separated steps to run (with what they need; install and env always run)")
    pr.add_argument("--fail-step", default=None, help="replace STEP with `exit 1` (tests the failure path)")
    for name, fn in (("_install", install), ("_env", environment), ("_unpack", unpack), ("_agree", agree)):
        sp = sub.add_parser(name)
        sp.set_defaults(fn=fn)
    sub.choices["_install"].add_argument("--wheels", required=True)
    sub.choices["_install"].add_argument("--site", required=True)
    sub.choices["_unpack"].add_argument("--tar", required=True)
    sub.choices["_unpack"].add_argument("--dest", required=True)
    sa = sub.choices["_agree"]
    for opt in ("--model", "--data", "--device", "--eval-json", "--cache-dir"):
        sa.add_argument(opt, required=True)
    sa.add_argument("--n", type=int, default=256)
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            return prepare(args)
        if args.cmd == "run":
            return run(args)
        return args.fn(args)
    except CheckError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
