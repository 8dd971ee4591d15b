"""The model factory, preprocessing, checkpoints and the decoded-image cache (no training run)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facefind.db.errors import DatasetError, ModelError
from facefind.db.files import file_sha256
from facefind.trainer.checkpoint import (
    FORMAT_VERSION,
    CheckpointMeta,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from facefind.trainer.data import (
    ImageCache,
    augment,
    batch_indices,
    build_cache,
    find_cache,
    parse_img_size,
    training_input,
)
from facefind.trainer.decode import decode_paths
from facefind.trainer.model import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    preprocess,
    resize_images,
)

ATTRS = ["5_o_Clock_Shadow", "Bald", "Smiling"]


def _meta(arch: str = "resnet18", k: int = 3, size: tuple[int, int] = (40, 32), dim: int = 16) -> CheckpointMeta:
    return CheckpointMeta(
        arch=arch, attributes=ATTRS[:k], img_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding_dim=dim,
        dropout=0.3, thresholds=[0.3, 0.5, 0.7][:k],
    )


# --------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "small_cnn"])
def test_archs_give_logits_and_embedding_in_one_pass(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_attributes=5, embedding_dim=24, dropout=0.5).eval()
    with torch.no_grad():
        logits, embedding = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and embedding.shape == (2, 24)
    assert torch.isfinite(logits).all()
    # the embedding is taken before the ReLU (centred, so cosine similarity can spread over [-1, 1])
    assert (embedding < 0).any()
    # the classifier reads the embedding: relu(embedding) through it gives the logits (eval: no dropout)
    assert torch.allclose(model.classifier(torch.relu(embedding)), logits, atol=1e-5)


def test_every_arch_is_known() -> None:
    assert {"resnet50", "densenet121", "inception_v3", "resnet18", "efficientnet_b0", "mobilenet_v3_small",
            "convnext_tiny", "small_cnn"} <= set(ARCHS)


def test_small_cnn_keeps_resolution_trains_and_round_trips(tmp_path: Path) -> None:
    """Our own backbone: no torchvision, no ImageNet weights, rebuilt from the checkpoint alone."""
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="--no-pretrained"):
        create_model("small_cnn", 3, pretrained=True)
    model = create_model("small_cnn", 3, embedding_dim=16).to(memory_format=torch.channels_last)
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.stride == (1, 1)  # the first features see every input pixel (small cues survive)
    x = preprocess(torch.randint(0, 256, (4, 3, 40, 32), dtype=torch.uint8), _meta("small_cnn"))
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = first.weight.detach().clone()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(before, first.weight)
    model.eval()
    loaded, meta = load_model(save_checkpoint(tmp_path / "s.pt", model, _meta("small_cnn")))
    assert meta.arch == "small_cnn"
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ModelError, match="at least 16x16"):
        loaded(torch.randn(1, 3, 8, 8))


def test_unknown_arch_lists_the_choices() -> None:
    with pytest.raises(ModelError, match="resnet50.*densenet121.*inception_v3"):
        create_model("vgg11", 40)


def test_bad_head_settings_are_model_errors() -> None:
    with pytest.raises(ModelError, match="dropout"):
        create_model("resnet18", 3, dropout=1.0)
    with pytest.raises(ModelError, match="attribute"):
        create_model("resnet18", 0)


def test_pretrained_offline_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import urllib.error

    from torchvision.models._api import WeightsEnum

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ModelError, match="--no-pretrained"):
        create_model("resnet18", 40, pretrained=True)


@pytest.mark.parametrize("arch,side", [("resnet50", 32), ("densenet121", 32), ("inception_v3", 75)])
def test_big_backbones_train_one_step_on_the_cpu(arch: str, side: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_attributes=40, embedding_dim=32).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (2, 40)).float()
    before = model.classifier.weight.detach().clone()
    logits, embedding = model(x)
    assert logits.shape == (2, 40) and embedding.shape == (2, 32)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.classifier.weight)
    if arch == "inception_v3":
        model.eval()
        with pytest.raises(ModelError, match="at least 75x75"):
            model(torch.randn(1, 3, 64, 64))
        # a rebuild from the file has the same architecture (aux head off, same input transform)
        meta = _meta(arch, k=3, size=(75, 75), dim=32)
        meta.attributes, meta.thresholds = [f"a{i}" for i in range(40)], [0.5] * 40
        loaded, _ = load_model(save_checkpoint(tmp_path / "i.pt", model, meta))
        with torch.no_grad():
            assert torch.allclose(model(x)[0], loaded(x)[0], rtol=1e-4, atol=1e-4)


def test_batchnorm_momentum_is_raised_for_short_runs() -> None:
    model = create_model("mobilenet_v3_small", 3, embedding_dim=8)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.1}


# ---------------------------------------------------------------------------------------- preprocess


def test_preprocess_resizes_scales_and_normalises() -> None:
    meta = _meta(size=(20, 16))
    white = torch.full((2, 3, 40, 30), 255, dtype=torch.uint8)
    x = preprocess(white, meta)
    assert x.shape == (2, 3, 20, 16) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(white.float(), meta)


def test_resize_is_one_function_for_uint8_and_float() -> None:
    img = torch.randint(0, 256, (1, 3, 50, 40), dtype=torch.uint8)
    small_u8 = resize_images(img, (25, 20))
    small_f = resize_images(img.float(), (25, 20))
    assert small_u8.dtype == torch.uint8
    assert (small_u8.float() - small_f).abs().max() <= 1.0
    assert resize_images(img, (50, 40)) is img


def test_training_input_without_augmentation_equals_preprocess() -> None:
    meta = _meta(size=(24, 20))
    images = torch.randint(0, 256, (3, 3, 24, 20), dtype=torch.uint8)
    assert torch.allclose(training_input(images, meta.mean, meta.std, None), preprocess(images, meta))


def test_augment_is_seeded_in_range_and_changes_pixels() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(3))
    b = augment(images, torch.Generator().manual_seed(3))
    c = augment(images, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, images.float() / 255, atol=1e-3)


def test_batches_never_hold_one_image_when_training() -> None:
    rows = np.arange(10)
    batches = batch_indices(rows, 4, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(np.concatenate(batches))) == 8
    assert [len(b) for b in batch_indices(rows, 4, shuffle=False)] == [4, 4, 2]
    assert [len(b) for b in batch_indices(np.arange(3), 64, shuffle=False, drop_last=True)] == [3]
    with pytest.raises(DatasetError):
        batch_indices(np.arange(1), 4, shuffle=False, drop_last=True)


@pytest.mark.parametrize("text,size", [("64", (64, 64)), ("218x178", (218, 178)), ("native", (218, 178)), (96, (96, 96))])
def test_parse_img_size(text, size) -> None:
    assert parse_img_size(text) == size


@pytest.mark.parametrize("bad", ["big", "1x2x3", "4", "0x10"])
def test_parse_img_size_rejects_nonsense(bad: str) -> None:
    with pytest.raises(DatasetError):
        parse_img_size(bad)


# --------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 3, embedding_dim=16).eval()
    meta = _meta()
    meta.history = [{"epoch": 1, "train_loss": 0.5}]
    meta.train_args = {"lr": 0.001, "data": "/somewhere"}
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind

    loaded, meta2 = load_model(path)
    assert not loaded.training
    assert meta2.attributes == ATTRS and meta2.thresholds == [0.3, 0.5, 0.7]
    assert meta2.img_size == (40, 32) and meta2.history == meta.history and meta2.train_args == meta.train_args
    assert meta2.format_version == FORMAT_VERSION and "torch" in meta2.versions
    x = preprocess(torch.randint(0, 256, (2, 3, 40, 32), dtype=torch.uint8), meta2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _good_checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "good.pt", create_model("resnet18", 3, embedding_dim=16), _meta())


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    data = _good_checkpoint(tmp_path).read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable facefind checkpoint") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_random_bytes_are_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelError, match="not a readable"):
        load_model(bad)


def test_foreign_torch_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "state_dict.pt"
    torch.save(create_model("resnet18", 3, embedding_dim=16).state_dict(), plain)
    with pytest.raises(ModelError, match="not a facefind checkpoint"):
        load_model(plain)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, other)
    with pytest.raises(ModelError, match="not a facefind checkpoint"):
        load_model(other)


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"format": "facefind-checkpoint", "x": Evil()}, fh)
    with pytest.raises(ModelError):
        load_model(bad)
    assert not (tmp_path / "pwned").exists()


def test_missing_newer_and_mismatched_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no checkpoint at"):
        load_model(tmp_path / "absent.pt")
    payload = load_checkpoint(_good_checkpoint(tmp_path))
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(ModelError, match="newer"):
        load_model(tmp_path / "newer.pt")
    payload["format_version"] = FORMAT_VERSION
    payload["meta"]["arch"] = "resnet34"
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(ModelError, match="do not fit a resnet34"):
        load_model(tmp_path / "wrong.pt")


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _good_checkpoint(tmp_path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, create_model("resnet18", 3, embedding_dim=16), _meta())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt"]


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"facefind" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"facefind" * 1000).hexdigest()


# ------------------------------------------------------------------------------------------- cache


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i + 1:06d}.{'png' if i % 5 == 4 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cache_is_built_once_then_reused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = _images(root / "img", 70)
    seen = []
    first = build_cache(paths, (24, 20), root=root, cache_dir=tmp_path / "cache", workers=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert first.built and first.images.shape == (70, 3, 24, 20) and seen[-1] == (70, 70)
    assert torch.equal(torch.from_numpy(np.array(first.images[:5])), torch.from_numpy(decode_paths(paths[:5], (24, 20))))
    again = build_cache(paths, (24, 20), root=root, cache_dir=tmp_path / "cache")
    assert not again.built and again.path == first.path
    assert find_cache(paths, (32, 32), root=root, cache_dir=tmp_path / "cache") is None
    assert find_cache(paths[:10], (24, 20), root=root, cache_dir=tmp_path / "cache") is None
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]
    assert leftovers == [] and not any(p.suffix == ".npy" for p in root.rglob("*"))


def test_cache_refuses_to_live_in_the_dataset(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = _images(root / "img", 2)
    with pytest.raises(DatasetError, match="inside the dataset"):
        build_cache(paths, (16, 16), root=root, cache_dir=root / "cache")


def test_unreadable_image_in_the_cache_is_named(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = _images(root / "img", 3)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=f"{paths[1].name}.*remove or replace"):
        build_cache(paths, (16, 16), root=root, cache_dir=tmp_path / "cache", workers=1)
    assert list((tmp_path / "cache").glob("*.npy")) == []



@pytest.mark.parametrize("background", [False, True])
def test_device_images_yield_every_batch_in_order(background: bool) -> None:
    from facefind.trainer.data import DeviceImages

    images = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    cache = ImageCache(Path("x.npy"), images, (4, 4), built=True)
    device_images = DeviceImages(cache, torch.device("cpu"))
    order = [np.array([3, 1]), np.array([0, 9, 2]), np.array([5])]
    got = list(device_images.batches(order, background=background))
    assert [list(i) for i, _ in got] == [[3, 1], [0, 9, 2], [5]]
    assert all(torch.equal(x, torch.from_numpy(images[i])) for i, x in got)
    with pytest.raises(IndexError):  # a failure on the helper thread reaches the consumer
        list(device_images.batches([np.array([0]), np.array([99])], background=background))
    # a consumer that stops early does not leave the helper thread blocked
    first = next(iter(device_images.batches(order * 5, prefetch=1, background=background)))
    assert list(first[0]) == [3, 1]
