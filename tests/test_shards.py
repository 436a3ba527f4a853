"""Shard writer, manifest, checksums, the deterministic and resumable readers, and error reporting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from harness.data.loaders import eval_loader, train_loader
from harness.data.shards import ShardError, read_manifest, verify_shards, write_phantom_shards, write_shards
from harness.data.transforms import AugmentSpec, encode_image, to_model_range

SIZE = 16


def _samples(n: int, prefix: str = "s", seed: int = 0, channels: int = 1):
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE) if channels == 1 else (SIZE, SIZE, channels)
    for i in range(n):
        labels = {"grade": i % 4, "score": float(rng.random()), "site": "ab"[i % 2], "extra": {"i": i}}
        yield f"{prefix}{i:04d}", rng.integers(0, 256, shape, dtype=np.uint8), labels


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(_samples(40, "tr"), out, "train", samples_per_shard=8, source="unit test")
    write_shards(_samples(21, "te", seed=1), out, "test", samples_per_shard=8)
    return out


def test_manifest_layout_and_merge(shard_dir):
    manifest = read_manifest(shard_dir)
    assert manifest["format_version"] == 1 and manifest["image_size"] == [SIZE, SIZE]
    assert manifest["channels"] == 1 and manifest["image_format"] == "png" and manifest["created"]
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]  # writing "test" kept "train"
    assert train["count"] == 40 and train["shards"] == [f"train-{i:06d}.tar" for i in range(5)]
    assert test["count"] == 21 and len(test["shards"]) == 3
    assert train["label_counts"]["grade"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    assert train["label_counts"]["site"] == {"a": 20, "b": 20} and "score" not in train["label_counts"]
    assert set(manifest["checksums"]) == set(train["shards"]) | set(test["shards"])
    assert sorted(p.name for p in shard_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [*manifest["checksums"], "manifest.json"])  # nothing temporary left behind
    verify_shards(shard_dir)


def test_rewriting_a_split_replaces_its_shards(tmp_path):
    write_shards(_samples(20), tmp_path, "train", samples_per_shard=5)
    write_shards(_samples(6), tmp_path, "train", samples_per_shard=5)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert read_manifest(tmp_path)["splits"]["train"]["count"] == 6
    with pytest.raises(ValueError, match="image_size"):  # one folder holds one image geometry
        write_shards([("k", np.zeros((8, 8), np.uint8), {})], tmp_path, "val")


@pytest.mark.parametrize("key, image, labels, message", [
    ("bad", np.full((4, 4), np.nan, np.float32), {}, "'bad'.*NaN"),
    ("f64", np.zeros((4, 4)), {}, "'f64'.*dtype"),
    ("dims", np.zeros((2, 4, 4, 1), np.uint8), {}, "'dims'.*shape"),
    ("a.b", np.zeros((4, 4), np.uint8), {}, "'a.b'"),
    ("nan_label", np.zeros((4, 4), np.uint8), {"y": float("nan")}, "'nan_label'.*'y'"),
    ("obj", np.zeros((4, 4), np.uint8), {"y": object()}, "'obj'.*JSON"),
])
def test_writer_rejects_bad_samples_naming_the_key(tmp_path, key, image, labels, message):
    with pytest.raises(ValueError, match=message):
        write_shards([(key, image, labels)], tmp_path, "train", image_format="npy" if key == "bad" else "png")


def test_duplicate_key_fails_and_leaves_no_partial_shard(tmp_path):
    samples = [*_samples(7), ("s0003", np.zeros((SIZE, SIZE), np.uint8), {})]
    with pytest.raises(ValueError, match="'s0003'.*duplicate"):
        write_shards(samples, tmp_path, "train", samples_per_shard=5)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["train-000000.tar"]  # complete one only
    assert not (tmp_path / "manifest.json").exists()


def test_verify_names_a_corrupt_shard(tmp_path):
    write_shards(_samples(10), tmp_path, "train", samples_per_shard=5)
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar"):
        verify_shards(tmp_path)


def test_eval_batches_hold_images_labels_and_meta(shard_dir):
    originals = {key: (image, labels) for key, image, labels in _samples(21, "te", seed=1)}
    batches = list(eval_loader(shard_dir, 8))
    assert [len(b["key"]) for b in batches] == [8, 8, 5]  # one pass, smaller last batch
    batch = batches[0]
    assert batch["image"].shape == (8, 1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["labels"]["grade"].dtype == torch.long and batch["labels"]["score"].dtype == torch.float32
    assert set(batch["labels"]) == {"grade", "score"}
    for i, key in enumerate(batch["key"]):
        image, labels = originals[key]
        assert torch.equal(batch["image"][i, 0], to_model_range(image))
        assert batch["labels"]["grade"][i] == labels["grade"]
        assert batch["meta"][i] == {"site": labels["site"], "extra": labels["extra"]}
    resized = next(iter(eval_loader(shard_dir, 4, image_size=8, channels=3)))
    assert resized["image"].shape == (4, 3, 8, 8) and resized["image"].abs().max() <= 1.0


def test_eval_sees_every_sample_once_over_ranks_and_workers(shard_dir):
    expected = sorted(key for key, _, _ in _samples(21, "te", seed=1))
    single = _keys(eval_loader(shard_dir, 4))
    assert sorted(single) == expected and single == _keys(eval_loader(shard_dir, 4))  # fixed order
    per_rank = [_keys(eval_loader(shard_dir, 4, rank=r, world_size=4)) for r in range(4)]
    assert sorted(k for keys in per_rank for k in keys) == expected  # disjoint, complete, no padding
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 3
    assert sorted(_keys(eval_loader(shard_dir, 4, num_workers=2))) == expected


def test_npy_float_images_round_trip(tmp_path):
    images = np.random.default_rng(3).random((5, SIZE, SIZE, 3), dtype=np.float32)
    write_shards([(f"k{i}", im, {"y": i}) for i, im in enumerate(images)], tmp_path, "test", image_format="npy")
    batch = next(iter(eval_loader(tmp_path, 5, channels=3)))
    assert torch.allclose(batch["image"], torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)


def test_training_stream_is_infinite_deterministic_and_rank_disjoint(shard_dir):
    def take(n, **kw):
        stream = iter(train_loader(shard_dir, 8, shuffle_buffer=16, **kw))
        return [next(stream) for _ in range(n)]

    first, again = take(8), take(8)  # 64 samples from 40: the stream resamples
    assert all(torch.equal(a["image"], b["image"]) and a["key"] == b["key"] for a, b in zip(first, again, strict=True))
    assert [b["key"] for b in take(8, seed=1)] != [b["key"] for b in first]
    assert {k for b in first for k in b["key"]} == {key for key, _, _ in _samples(40, "tr")}  # each pass sees all
    rank_keys = [{k for b in take(4, rank=r, world_size=2) for k in b["key"]} for r in range(2)]
    assert rank_keys[0] and rank_keys[1] and not rank_keys[0] & rank_keys[1]
    with pytest.raises(ShardError, match="5 shard"):
        train_loader(shard_dir, 8, world_size=6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_resumes_the_exact_stream(shard_dir, num_workers):
    spec, k = AugmentSpec(p=0.5), 5
    kw = dict(batch_size=4, augment=spec, num_workers=num_workers, seed=3, shuffle_buffer=16)
    stream = iter(train_loader(shard_dir, **kw))
    uninterrupted = [next(stream) for _ in range(k + 3)][k:]
    resumed_stream = iter(train_loader(shard_dir, start_batch=k, **kw))
    resumed = [next(resumed_stream) for _ in range(3)]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["labels"]["grade"], b["labels"]["grade"])


def _replace_with_broken_shard(directory: Path) -> Path:
    """Rewrite test-000001.tar with one good sample followed by three broken ones."""
    path = directory / "test-000001.tar"
    good = encode_image(np.zeros((SIZE, SIZE), np.uint8), "png")
    with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False) as tar:
        tar.write({"__key__": "good", "image.png": good, "labels.json": b'{"grade": 1}'})
        tar.write({"__key__": "no_labels", "image.png": good})
        tar.write({"__key__": "bad_json", "image.png": good, "labels.json": b"{grade"})
        tar.write({"__key__": "bad_png", "image.png": b"not a png", "labels.json": b"{}"})
    return path


def test_broken_samples_raise_naming_shard_and_key_or_are_skipped_and_counted(tmp_path):
    write_shards(_samples(12), tmp_path, "test", samples_per_shard=4)
    shard = _replace_with_broken_shard(tmp_path)
    with pytest.raises(ShardError, match=f"{shard}.*'no_labels'"):
        _keys(eval_loader(tmp_path, 4))
    with pytest.raises(ShardError, match="'no_labels'"):  # also from inside a DataLoader worker
        _keys(eval_loader(tmp_path, 4, num_workers=2))
    loader = eval_loader(tmp_path, 4, on_error="skip")
    assert len(_keys(loader)) == 9 and "good" in _keys(loader)
    assert loader.skipped == 6 and loader.missing == 0  # counts accumulate over passes
    assert [(s, k) for s, k, _ in loader.skipped_samples[:3]] == [(str(shard), "no_labels"),
                                                                  (str(shard), "bad_json"), (str(shard), "bad_png")]
    assert "labels.json" in loader.skipped_samples[1][2] and "undecodable" in loader.skipped_samples[2][2]


def test_unreadable_and_truncated_tars_are_reported(tmp_path):
    write_shards(_samples(12), tmp_path, "test", samples_per_shard=4)
    shard = tmp_path / "test-000002.tar"
    original = shard.read_bytes()
    shard.write_bytes(b"garbage" * 200)
    with pytest.raises(ShardError, match="test-000002.tar.*unreadable tar"):
        _keys(eval_loader(tmp_path, 4))
    skipping = eval_loader(tmp_path, 4, on_error="skip")
    assert len(_keys(skipping)) == 8 and skipping.skipped == 1 and skipping.missing == 3
    for cut in (1024 * 3, len(original) // 2 + 100):  # a cut header, or a cut that reads as a shorter valid tar
        shard.write_bytes(original[:cut])
        with pytest.raises(ShardError, match="test-000002.tar"):
            _keys(eval_loader(tmp_path, 4))
        skipping = eval_loader(tmp_path, 4, on_error="skip")
        read = len(_keys(skipping))
        assert read < 12 and read + skipping.skipped + skipping.missing == 12  # every lost sample accounted for


def test_phantom_shards_are_written_once_with_distinct_splits(tmp_path):
    out = write_phantom_shards(tmp_path / "ph", size=16, n_train=12, n_val=0, n_test=6, samples_per_shard=5)
    manifest = read_manifest(out)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 12, "test": 6}
    mtime = os.stat(out / "manifest.json").st_mtime_ns
    assert write_phantom_shards(out, size=16, n_train=12, n_val=0, n_test=6, samples_per_shard=5) == out
    assert os.stat(out / "manifest.json").st_mtime_ns == mtime  # kept, not regenerated
    with pytest.raises(ShardError, match=r"holds other shards \(counts: \(12, 0, 6\) -> \(10, 0, 6\)\)"):
        write_phantom_shards(out, size=16, n_train=10, n_val=0, n_test=6)
    assert os.stat(out / "manifest.json").st_mtime_ns == mtime  # refused: nothing rewritten
    batch = next(iter(eval_loader(out, 6)))
    assert set(batch["labels"]) == {"grade", "fracture", "height_loss"} and "phantom" in batch["meta"][0]
    train_keys = _keys(eval_loader(out, 6, split="train"))
    assert not set(train_keys) & set(batch["key"])
    assert json.loads(json.dumps(batch["meta"][0]["phantom"]))["noise_seed"] >= 0


def test_a_null_label_is_a_missing_number_so_the_column_stays_in_every_batch(tmp_path):
    # An uncertain finding under the "ignore" policy is stored as null: the batch keeps the column as float with
    # NaN there, instead of moving it to meta (which made latents chunks disagree on their label columns).
    rng = np.random.default_rng(0)
    samples = [(f"k{i}", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
                {"edema": None if i % 3 == 0 else i % 2, "grade": i % 4}) for i in range(6)]
    write_shards(samples, tmp_path, "test", samples_per_shard=6)
    all_null, mixed = list(eval_loader(tmp_path, 1))[0], next(iter(eval_loader(tmp_path, 6)))
    assert set(all_null["labels"]) == {"edema", "grade"} and torch.isnan(all_null["labels"]["edema"]).all()
    edema = mixed["labels"]["edema"]
    assert edema.dtype == torch.float32 and torch.isnan(edema[[0, 3]]).all()
    assert edema[[1, 2, 4, 5]].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert mixed["labels"]["grade"].dtype == torch.long and "edema" not in mixed["meta"][0]
