"""MedMNIST preparer: 64 real PneumoniaMNIST images (sliced in a temp dir) and synthetic RetinaMNIST RGB files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import eval_loader, read_manifest
from harness.data.prepare import PrepareError, RunOptions, prepare_medmnist
from harness.data.prepare.__main__ import main as cli_main

REAL_NPZ = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pneumoniamnist.npz"
SLICE = {"train": 32, "val": 16, "test": 16}
QUIET = RunOptions(items_per_shard=10, progress=False)


@pytest.fixture(scope="module")
def pneumonia_arrays() -> dict[str, np.ndarray]:
    """The first 32/16/16 images and labels of each split of the real file (nothing is copied into the repo)."""
    if not REAL_NPZ.is_file():
        pytest.skip(f"real data {REAL_NPZ} not present in this checkout's parent folder")
    with np.load(REAL_NPZ) as npz:
        return {f"{split}_{part}": npz[f"{split}_{part}"][:n] for split, n in SLICE.items()
                for part in ("images", "labels")}


@pytest.fixture
def pneumonia_npz(tmp_path: Path, pneumonia_arrays: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **pneumonia_arrays)
    return path


def retina_arrays(seed: int = 0, n: tuple[int, int, int] = (20, 8, 8)) -> dict[str, np.ndarray]:
    """Synthetic RetinaMNIST: RGB (N, 28, 28, 3) uint8 and grades 0..4 of shape (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 5).reshape(-1, 1).astype(np.uint8)
    return arrays


def test_pneumonia_keeps_official_splits_labels_and_pixels(pneumonia_npz, pneumonia_arrays, tmp_path, read_shards):
    out = tmp_path / "shards"
    result = prepare_medmnist(pneumonia_npz, out, options=QUIET)
    manifest = read_manifest(out)
    assert manifest["image_size"] == [28, 28] and manifest["channels"] == 1
    assert {s: e["count"] for s, e in manifest["splits"].items()} == SLICE
    assert result.skipped == [] and result.shards_written == 8  # 4 + 2 + 2 shards of at most 10 images
    for split in SLICE:
        images, labels = pneumonia_arrays[f"{split}_images"], pneumonia_arrays[f"{split}_labels"][:, 0]
        counts = {str(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True), strict=True)}
        assert manifest["splits"][split]["label_counts"] == {"pneumonia": counts}
        samples = read_shards(out, split)
        assert len(samples) == len(images)
        for key, (image, sample_labels) in samples.items():
            index = sample_labels["source_index"]
            assert key == f"pneumoniamnist-{split}-{index:06d}"
            np.testing.assert_array_equal(image, images[index])  # lossless, untouched
            assert sample_labels["pneumonia"] == int(labels[index])
            assert sample_labels["source_file"] == "pneumoniamnist.npz"
        stats = manifest["prepare"]["pixel_stats"][split]
        assert stats["mean"][0] == pytest.approx(images.mean(), abs=1e-3)
        assert stats["std"][0] == pytest.approx(images.std(), abs=1e-3)
        assert (stats["min"], stats["max"]) == (int(images.min()), int(images.max()))
    batch = next(iter(eval_loader(out, 16, split="val")))  # the project's reader takes the folder unchanged
    assert batch["image"].shape == (16, 1, 28, 28)
    assert batch["labels"]["pneumonia"].tolist() == pneumonia_arrays["val_labels"][:, 0].tolist()


def test_pad_keeps_pixels_and_resize_changes_size(pneumonia_npz, pneumonia_arrays, tmp_path, read_shards):
    prepare_medmnist(pneumonia_npz, tmp_path / "pad", size=32, fit="pad", options=QUIET)
    prepare_medmnist(pneumonia_npz, tmp_path / "resize", size=64, fit="resize", channels=3, options=QUIET)
    original = pneumonia_arrays["test_images"]
    for image, labels in read_shards(tmp_path / "pad", "test").values():
        assert image.shape == (32, 32)
        np.testing.assert_array_equal(image[2:30, 2:30], original[labels["source_index"]])
        assert image[:2].max() == 0 and image[:, 30:].max() == 0  # black 2-pixel border
    manifest = read_manifest(tmp_path / "resize")
    assert manifest["image_size"] == [64, 64] and manifest["channels"] == 3
    for image, labels in read_shards(tmp_path / "resize", "test").values():
        assert image.shape == (64, 64, 3)
        np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray repeated into RGB
        shrunk = np.asarray(Image.fromarray(image[..., 0]).resize((28, 28), Image.Resampling.BOX), dtype=float)
        assert np.abs(shrunk - original[labels["source_index"]]).mean() < 8  # same picture, upsampled


def test_retina_rgb_kept_or_converted_to_gray(tmp_path, read_shards):
    arrays = retina_arrays()
    npz = tmp_path / "retinamnist_28.npz"  # a size suffix, as MedMNIST+ names its files
    np.savez(npz, **arrays)
    result = prepare_medmnist(npz, tmp_path / "rgb", options=QUIET)
    assert result.manifest["channels"] == 3 and result.manifest["source"] == "medmnist:retinamnist"
    assert result.manifest["splits"]["train"]["label_counts"] == {"grade": {str(g): 4 for g in range(5)}}
    for key, (image, labels) in read_shards(tmp_path / "rgb", "train").items():
        assert key.startswith("retinamnist-train-")
        np.testing.assert_array_equal(image, arrays["train_images"][labels["source_index"]])
        assert labels["grade"] == labels["source_index"] % 5
    prepare_medmnist(npz, tmp_path / "gray", channels=1, options=QUIET)
    for image, labels in read_shards(tmp_path / "gray", "val").values():
        expected = np.asarray(Image.fromarray(arrays["val_images"][labels["source_index"]]).convert("L"))
        np.testing.assert_array_equal(image, expected)
    assert len(result.manifest["prepare"]["pixel_stats"]["train"]["mean"]) == 3  # per channel


def _drop(arrays, key):
    return {k: v for k, v in arrays.items() if k != key}


@pytest.mark.parametrize("corrupt, expected", [
    (lambda a: _drop(a, "val_labels"), ["'val_labels'", "missing key"]),
    (lambda a: {**a, "train_labels": a["train_labels"][:19]},
     ["'train_images' has 20 images", "'train_labels' has 19"]),
    (lambda a: {**a, "test_labels": a["test_labels"] + 3}, ["'test_labels'", "outside 0..4", "row 2"]),
    (lambda a: {**a, "val_images": a["val_images"].astype(np.float32)}, ["'val_images'", "float32"]),
])
def test_bad_npz_stops_with_message_and_writes_nothing(tmp_path, corrupt, expected):
    npz = tmp_path / "retinamnist.npz"
    np.savez(npz, **corrupt(retina_arrays()))
    out = tmp_path / "shards"
    with pytest.raises(PrepareError) as error:
        prepare_medmnist(npz, out, options=QUIET)
    for fragment in expected:
        assert fragment in str(error.value)
    assert str(npz) in str(error.value)
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_npz_and_unknown_set(tmp_path):
    broken = tmp_path / "pneumoniamnist.npz"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(PrepareError, match="not a readable .npz"):
        prepare_medmnist(broken, tmp_path / "a", options=QUIET)
    other = tmp_path / "mysetmnist.npz"
    np.savez(other, **retina_arrays())
    with pytest.raises(PrepareError, match="unknown MedMNIST data set 'mysetmnist'"):
        prepare_medmnist(other, tmp_path / "b", options=QUIET)
    result = prepare_medmnist(other, tmp_path / "b", label_columns=["stage"], num_classes=5, options=QUIET)
    assert result.manifest["prepare"]["label_columns"] == ["stage"]


def test_parallel_equals_serial_rerun_is_noop_and_other_settings_need_overwrite(pneumonia_npz, tmp_path):
    serial = prepare_medmnist(pneumonia_npz, tmp_path / "serial", options=QUIET)
    parallel = prepare_medmnist(pneumonia_npz, tmp_path / "parallel",
                                options=RunOptions(workers=2, items_per_shard=10, progress=False))
    assert parallel.manifest["checksums"] == serial.manifest["checksums"]  # byte-identical shards
    shard = tmp_path / "serial" / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    again = prepare_medmnist(pneumonia_npz, tmp_path / "serial", options=QUIET)
    assert again.already_done and shard.stat().st_mtime_ns == before
    with pytest.raises(PrepareError, match="overwrite"):
        prepare_medmnist(pneumonia_npz, tmp_path / "serial", size=32, options=QUIET)
    replaced = prepare_medmnist(pneumonia_npz, tmp_path / "serial", size=32,
                                options=RunOptions(items_per_shard=10, progress=False, overwrite=True))
    assert replaced.manifest["image_size"] == [32, 32]


def test_command_line(pneumonia_npz, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["medmnist", str(pneumonia_npz), "--out", str(out), "--size", "32", "--fit", "pad",
                     "--workers", "0", "--no-progress"]) == 0
    assert read_manifest(out)["image_size"] == [32, 32]
    assert "train 32" in capsys.readouterr().out
    assert cli_main(["medmnist", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "missing.npz" in capsys.readouterr().err
