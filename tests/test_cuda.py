"""The CUDA branches: GPU-resident training cache, bf16 autocast + channels_last in training and
inference, nvJPEG indexing, and the benchmarks' GPU settings.

Every test here is ``@pytest.mark.cuda``: tests/conftest.py skips them where torch sees no GPU, so
the first run on a GPU machine executes them unchanged. Each compares the CUDA path with the CPU
path it must agree with (bf16 keeps about 3 significant digits, hence the tolerances), or checks
that it learns.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facefind.trainer.synth import synthesize

    root = tmp_path_factory.mktemp("cuda") / "faces"
    synthesize(root, n=96, seed=4)
    return root


def test_resolve_device_and_cuda_switches() -> None:
    import torch

    from facefind.db.errors import FacefindError
    from facefind.trainer.device import configure, describe_device, resolve_device

    dev = resolve_device("auto")
    assert dev.type == "cuda" and describe_device(dev).startswith("cuda:")
    configure(dev)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(FacefindError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resident_and_streamed_cache_batches_equal_the_cache(faces: Path, tmp_path: Path) -> None:
    import torch

    from facefind.trainer.celeba import load_celeba
    from facefind.trainer.data import DeviceImages, build_cache

    ds = load_celeba(faces)
    cache = build_cache(ds.paths, (32, 32), root=ds.root, cache_dir=tmp_path / "cache", workers=1)
    dev = torch.device("cuda")
    resident = DeviceImages(cache, dev, on_device=True)
    streamed = DeviceImages(cache, dev, on_device=False)
    assert resident.resident is not None and resident.resident.device.type == "cuda"
    assert streamed.resident is None
    batches = [np.array([5, 0, 95, 5]), np.arange(10, 42), np.array([1])]
    for source in (resident, streamed):
        for background in (False, True):
            got = list(source.batches(batches, background=background))
            assert [idx.tolist() for idx, _ in got] == [b.tolist() for b in batches]
            for idx, images in got:
                assert images.device.type == "cuda" and images.dtype == torch.uint8
                np.testing.assert_array_equal(images.cpu().numpy(), cache.images[idx])


def test_training_on_cuda_learns(synth_dataset: Path, tmp_path: Path) -> None:
    """bf16 autocast, channels_last and the GPU-resident cache, through the real ``fit``."""
    import torch

    from facefind.trainer.checkpoint import load_model
    from facefind.trainer.fit import FitConfig, fit

    config = FitConfig(
        data=synth_dataset, out=tmp_path / "model.pt", arch="mobilenet_v3_small", img_size=64, epochs=6,
        batch_size=32, lr=3e-3, embedding_dim=64, device="cuda", seed=0, workers=2, cache_dir=tmp_path / "cache",
    )
    result = fit(config)
    assert result.device.startswith("cuda")
    # the CPU run of these settings (tests/conftest.py trained_model) beats the majority by > 0.03
    assert result.val.mean_accuracy > result.baseline_val.mean_accuracy + 0.03
    losses = [r["train_loss"] for r in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.85
    model, _ = load_model(result.checkpoint, "cpu")  # a GPU-trained checkpoint loads on the CPU
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_cuda_inference_is_bf16_and_agrees_with_the_cpu(faces: Path, tmp_path: Path) -> None:
    import torch

    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.checkpoint import load_model
    from facefind.trainer.decode import decode_paths
    from facefind.trainer.device import autocast
    from facefind.trainer.model import preprocess
    from facefind.indexer.predict import infer

    images = sorted((faces / "img_align_celeba").glob("*.jpg"))
    path = tiny_checkpoint(tmp_path / "m.pt", read_attributes(faces / "list_attr_celeba.txt").attributes,
                           calibrate=images[:48])
    pixels = torch.from_numpy(decode_paths(images, (64, 64)))
    cpu_model, meta = load_model(path, "cpu")
    gpu_model, _ = load_model(path, "cuda")
    dev = torch.device("cuda")
    x = preprocess(pixels.to(dev), meta)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(dev):
        logits, _ = gpu_model(x)
    assert logits.dtype == torch.bfloat16  # autocast really ran the model in bf16
    p_cpu, e_cpu = infer(cpu_model, meta, pixels, torch.device("cpu"))
    p_gpu, e_gpu = infer(gpu_model, meta, pixels, dev)
    assert p_gpu.dtype == np.float32 and p_gpu.shape == p_cpu.shape
    assert np.abs(p_gpu - p_cpu).max() < 0.05 and np.abs(p_gpu - p_cpu).mean() < 0.01
    assert (np.sum(e_gpu * e_cpu, axis=1) > 0.99).all()  # unit embeddings: cosine similarity


def test_index_on_cuda_agrees_with_the_cpu_index(faces: Path, tmp_path: Path) -> None:
    """nvJPEG decoding + bf16 inference on the GPU against PIL + fp32 on the CPU, file by file."""
    from facefind.db.catalog import Catalog
    from facefind.indexer.pipeline import index_folder
    from facefind.trainer.celeba import read_attributes

    images = sorted((faces / "img_align_celeba").glob("*.jpg"))
    path = tiny_checkpoint(tmp_path / "m.pt", read_attributes(faces / "list_attr_celeba.txt").attributes,
                           calibrate=images[:48])
    probs = {}
    for dev in ("cpu", "cuda"):
        report = index_folder(faces / "img_align_celeba", path, tmp_path / f"index-{dev}", batch_size=32,
                              device=dev, workers=0)
        assert report.indexed == len(images) and not report.failures
        with Catalog.open(tmp_path / f"index-{dev}", create=False) as catalog:
            preds = catalog.export(catalog.latest_model().id)[1]
        probs[dev] = dict(zip(preds.paths, preds.probs))
    assert probs["cpu"].keys() == probs["cuda"].keys()
    diff = np.array([np.abs(probs["cuda"][p] - probs["cpu"][p]).max() for p in probs["cpu"]])
    assert diff.max() < 0.05 and diff.mean() < 0.01, diff


def test_benchmarks_on_cuda_compare_at_the_same_precision(tmp_path: Path) -> None:
    from facefind.retrieval.bench.index import run_index_bench
    from facefind.retrieval.bench.train import run_train_bench

    train = run_train_bench(arch="mobilenet_v3_small", n=80, img_size=32, batch_size=8, steps=2, warmup=1,
                            device="cuda", workers=0)
    rows = {row["name"]: row for row in train["rows"]}
    assert rows["facefind"]["precision"] == rows["same_settings"]["precision"] == "bf16 autocast"
    assert rows["study_style"]["precision"] == "fp32"
    index = run_index_bench(n=24, out=tmp_path / "bench", device="cuda", batch_size=8,
                            arch="mobilenet_v3_small", img_size=64, workers=0)
    assert index["indexed"] == 24
    assert index["precision"] == index["baselines"]["same_settings"]["precision"] == "bf16 autocast"
    assert index["baselines"]["study_style"]["precision"] == "fp32"
