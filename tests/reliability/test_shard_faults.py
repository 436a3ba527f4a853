"""Damaged shards, for each reader (training stream, evaluation pass) and each error policy (raise, skip).

A folder of 3 shards x 4 samples (16 px) gets one fault in its middle shard. With ``on_error="raise"`` reading
must stop with a ``ShardError`` naming the shard (and the sample, where one is to blame); with ``"skip"`` every
good sample must still arrive, the bad ones must be counted, and an evaluation pass must account for all 12.
Faults of the folder itself (manifest, missing shard, unknown split) fail when the reader is made, in both modes.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from harness.data import ShardError, eval_loader, train_loader, verify_shards, write_shards
from harness.data.transforms import encode_image

SIZE, PER_SHARD = 16, 4
DAMAGED = "test-000001.tar"


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _write_folder(root: Path, image_format: str = "png") -> set[str]:
    samples = [(f"s{i:02d}", _image(i), {"grade": i % 4}) for i in range(3 * PER_SHARD)]
    write_shards(samples, root, "test", samples_per_shard=PER_SHARD, image_format=image_format)
    return {key for key, _, _ in samples}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# One bad sample (key "bad") in place of the damaged shard's second sample: fields of the bad sample.
SAMPLE_FAULTS: dict[str, Callable[[], dict[str, bytes]]] = {
    "corrupt_image": lambda: {"image.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "labels.json": b'{"grade": 1}'},
    "png_bytes_named_npy": lambda: {"image.npy": encode_image(_image(99), "png"), "labels.json": b'{"grade": 1}'},
    "npy_bytes_named_png": lambda: {"image.png": _npy_bytes(_image(99)), "labels.json": b'{"grade": 1}'},
    "wrong_image_size": lambda: {"image.png": encode_image(_image(99, size=8), "png"), "labels.json": b'{"grade": 1}'},
    "labels_not_json": lambda: {"image.png": encode_image(_image(99), "png"), "labels.json": b"{grade: 1"},
    "labels_not_an_object": lambda: {"image.png": encode_image(_image(99), "png"), "labels.json": b"[1, 2]"},
    "labels_missing": lambda: {"image.png": encode_image(_image(99), "png")},
    "image_missing": lambda: {"labels.json": b'{"grade": 1}'},
}


def _replace_second_sample(root: Path, fields: dict[str, bytes]) -> set[str]:
    """Rewrite the damaged shard with its second sample replaced by ``bad``; returns the keys it lost."""
    path = root / DAMAGED
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    lost = samples[1]["__key__"]
    with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False) as tar:
        for index, sample in enumerate(samples):
            if index == 1:
                tar.write({"__key__": "bad", **fields})
            else:
                tar.write({k: v for k, v in sample.items() if k in ("__key__", "image.png", "labels.json")})
    return {lost}


def _cut(root: Path, at: int) -> None:
    path = root / DAMAGED
    path.write_bytes(path.read_bytes()[:at])


def _member_offsets(root: Path) -> list[tuple[int, int, int]]:
    """(header offset, data offset, size) of each member of the damaged shard, in order (2 per sample)."""
    with tarfile.open(root / DAMAGED) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def _take_training(root: Path, on_error: str, batches: int = 9, num_workers: int = 0):
    loader = train_loader(root, 4, split="test", on_error=on_error, shuffle_buffer=8, num_workers=num_workers)
    stream = iter(loader)
    keys = [key for _ in range(batches) for key in next(stream)["key"]]  # 36 samples: three passes
    return loader, keys


@pytest.mark.parametrize("fault", sorted(SAMPLE_FAULTS))
def test_a_bad_sample_is_named_or_skipped_and_counted(tmp_path, fault):
    good = _write_folder(tmp_path) - _replace_second_sample(tmp_path, SAMPLE_FAULTS[fault]())
    shard = re.escape(str(tmp_path / DAMAGED))
    readers = (lambda mode: list(eval_loader(tmp_path, 4, on_error=mode)), lambda mode: _take_training(tmp_path, mode))
    for read in readers:
        with pytest.raises(ShardError, match=f"{shard}: sample 'bad'"):
            read("raise")
    evaluation = eval_loader(tmp_path, 4, on_error="skip")
    keys = [key for batch in evaluation for key in batch["key"]]
    assert sorted(keys) == sorted(good) and evaluation.skipped == 1 and evaluation.missing == 0
    assert evaluation.skipped_samples[0][:2] == (str(tmp_path / DAMAGED), "bad")
    training, keys = _take_training(tmp_path, "skip")
    assert set(keys) == good and training.skipped >= 1  # the bad sample is met (and skipped) on every pass
    assert {(s, k) for s, k, _ in training.skipped_samples} == {(str(tmp_path / DAMAGED), "bad")}


def test_skip_from_inside_dataloader_workers(tmp_path):
    good = _write_folder(tmp_path) - _replace_second_sample(tmp_path, SAMPLE_FAULTS["corrupt_image"]())
    with pytest.raises(ShardError, match="'bad'"):
        _take_training(tmp_path, "raise", num_workers=1)
    training, keys = _take_training(tmp_path, "skip", num_workers=1)
    assert set(keys) == good and training.skipped >= 1


@pytest.mark.parametrize("image_format", ["png", "npy"])
@pytest.mark.parametrize("fault", ["not_a_tar", "cut_inside_a_sample"])
def test_an_unreadable_shard_is_named_or_skipped_and_counted(tmp_path, fault, image_format):
    keys = _write_folder(tmp_path, image_format)
    if fault == "not_a_tar":
        (tmp_path / DAMAGED).write_bytes(b"this is not a tar file " * 100)
    else:
        _, data_offset, size = _member_offsets(tmp_path)[4]  # the third sample's image
        _cut(tmp_path, data_offset + size // 2)  # two whole samples, then half of the third one's image
    shard = str(tmp_path / DAMAGED)
    with pytest.raises(ShardError, match=f"{re.escape(shard)}: .*unreadable tar data"):
        list(eval_loader(tmp_path, 4))
    with pytest.raises(ShardError, match=f"{re.escape(shard)}: .*unreadable tar data"):
        _take_training(tmp_path, "raise")
    evaluation = eval_loader(tmp_path, 4, on_error="skip")
    read = [key for batch in evaluation for key in batch["key"]]
    assert set(read) <= keys and len(read) + evaluation.skipped + evaluation.missing == len(keys)
    assert evaluation.skipped == 1 and evaluation.skipped_samples[0][0] == shard
    training, taken = _take_training(tmp_path, "skip")
    assert set(taken) <= keys and training.skipped >= 1
    with pytest.raises(ShardError, match=DAMAGED):
        verify_shards(tmp_path)


def test_a_shard_cut_between_samples(tmp_path):
    """A cut at a sample boundary reads as a valid, shorter tar: the evaluation pass notices by the count, the
    checksum names the shard; a training stream cannot tell (it is infinite): verify the folder before training."""
    keys = _write_folder(tmp_path)
    _cut(tmp_path, _member_offsets(tmp_path)[4][0])  # exactly two samples kept
    with pytest.raises(ShardError, match="manifest.json lists 12 samples but 10 were read"):
        list(eval_loader(tmp_path, 4))
    evaluation = eval_loader(tmp_path, 4, on_error="skip")
    assert len([k for batch in evaluation for k in batch["key"]]) == 10 and evaluation.missing == 2
    _, taken = _take_training(tmp_path, "raise")
    assert set(taken) < keys
    with pytest.raises(ShardError, match=f"{DAMAGED}: checksum does not match"):
        verify_shards(tmp_path)


FOLDER_FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest_missing": (lambda root: (root / "manifest.json").unlink(), "no manifest"),
    "manifest_not_json": (lambda root: (root / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
    "manifest_other_version": (
        lambda root: (root / "manifest.json").write_text(json.dumps({"format_version": 99})), "format_version 99"),
    "shard_missing": (lambda root: (root / DAMAGED).unlink(), f"{DAMAGED}: shard of split 'test' is missing"),
}


@pytest.mark.parametrize("fault", sorted(FOLDER_FAULTS))
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_folder_faults_fail_when_the_reader_is_made(tmp_path, fault, on_error):
    _write_folder(tmp_path)
    damage, message = FOLDER_FAULTS[fault]
    damage(tmp_path)
    for make in (eval_loader, train_loader):
        with pytest.raises(ShardError, match=message):
            make(tmp_path, 4, split="test", on_error=on_error)


def test_an_unknown_split_is_named(tmp_path):
    _write_folder(tmp_path)
    for make in (eval_loader, train_loader):
        with pytest.raises(ShardError, match=r"no split 'val'; has \['test'\]"):
            make(tmp_path, 4, split="val")
