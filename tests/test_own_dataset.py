"""A new graded RGB data set in the MedMNIST layout, as the README's "Your own data set" section uses it."""

from __future__ import annotations

import numpy as np
import pytest

from harness.config import load_config
from harness.data import eval_loader
from harness.data.phantom_npz import colourise, write_phantom_npz
from harness.data.prepare.common import PrepareError
from harness.data.shards import ShardError
from harness.data.sources import check_shards_match, ensure_shards

JOB = "jobs/own_dataset_rgb.yaml"


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_phantom_npz(tmp_path_factory.mktemp("own") / "colour.npz", size=32, counts=(24, 8, 8), rgb=True)


def _config(npz, shard_dir, *extra: str):
    return load_config(JOB, [f"--data.raw_path={npz}", f"--data.shard_dir={shard_dir}", *extra])


def test_the_colour_phantom_npz_has_the_medmnist_layout(npz):
    with np.load(npz) as data:
        assert sorted(data.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
        assert data["train_images"].shape == (24, 32, 32, 3) and data["train_images"].dtype == np.uint8
        assert data["test_labels"].shape == (8, 1) and set(np.unique(data["train_labels"])) <= {0, 1, 2, 3}
    ramp = colourise(np.arange(256, dtype=np.uint8).reshape(16, 16))  # (16, 16, 3)
    assert ramp[0, 0].tolist() != ramp[-1, -1].tolist() and (ramp[..., 0] != ramp[..., 2]).any()  # colour, not grey


def test_the_job_prepares_rgb_shards_with_the_named_label_column(npz, tmp_path):
    config = _config(npz, tmp_path / "shards")
    ensure_shards(config.data, progress=False)
    manifest = check_shards_match(config.data)
    assert manifest["channels"] == 3 and manifest["image_size"] == [32, 32]
    batch = next(iter(eval_loader(tmp_path / "shards", 8, split="test", image_size=32, channels=3)))
    assert batch["image"].shape == (8, 3, 32, 32) and set(batch["labels"]) >= {"grade"}
    # Asking for grey images from these shards is refused, not silently converted.
    with pytest.raises(ShardError, match="data.channels is 1 but .* holds 3-channel images"):
        check_shards_match(_config(npz, tmp_path / "shards", "--data.channels=1").data)
    # The same folder with another preparation setting is not reused: the message names the setting.
    with pytest.raises(PrepareError, match=r"config.fit: 'resize' -> 'pad'"):
        ensure_shards(_config(npz, tmp_path / "shards", "--data.fit=pad").data, progress=False)


def test_an_unknown_set_without_label_columns_says_what_to_set(npz, tmp_path):
    config = load_config(JOB, [f"--data.raw_path={npz}", f"--data.shard_dir={tmp_path / 's'}",
                               "--data.label_columns=[]", "--data.num_classes=null"])
    with pytest.raises(PrepareError, match="unknown MedMNIST data set 'colour'"):
        ensure_shards(config.data, progress=False)


def test_five_grades_bin_the_height_loss_and_refine_the_four(tmp_path):
    from harness.data.phantom_npz import FIVE_GRADE_EDGES, grade_of

    path = write_phantom_npz(tmp_path / "five.npz", size=16, counts=(200, 4, 4), rgb=True, grades=5)
    with np.load(path) as data:
        labels = data["train_labels"][:, 0]
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    # Each of the five grades lies inside one of the four (grade 2 and 3 split, 0 and 1 kept).
    for four, loss in ((0, 0.05), (1, 0.22), (2, 0.30), (2, 0.35), (3, 0.42), (3, 0.55)):
        five = grade_of({"grade": four, "height_loss": loss}, 5)
        assert five == int(np.searchsorted(FIVE_GRADE_EDGES, loss, side="right"))
        assert grade_of({"grade": four, "height_loss": loss}, 4) == four
    with pytest.raises(ValueError, match="grades=3"):
        write_phantom_npz(tmp_path / "bad.npz", counts=(2, 2, 2), grades=3)
    assert not (tmp_path / "bad.npz").exists()
