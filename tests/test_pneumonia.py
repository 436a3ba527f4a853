"""The MedMNIST path on 64 images: preparer -> shards -> encode -> heads -> one CE.

Runs on a MedMNIST-layout array generated here (phantoms, 28x28, label = fractured), so a fresh clone tests it
with nothing beside it; the same test runs on 64 real PneumoniaMNIST chest X-rays (``realdata``) when the shared
copy sits beside the checkout, and skips with the reason otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.medmnist import generated_npz

from harness.config import Task, load_config
from harness.data import read_manifest
from harness.data.sources import ensure_shards
from harness.diffusion import alphas_cumprod, linear_betas
from harness.encode import encode_to_table
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.counterfactual import binary_counterfactuals
from harness.method.heads import fit_task
from harness.method.latents import load_latents
from harness.models import build_dae

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["generated", pytest.param("real", marks=pytest.mark.realdata)])
def small_npz(request, tmp_path_factory) -> Path:
    """64 images: 32 train, 16 val, 16 test, each split with both classes (generated, or the shared real copy)."""
    folder = tmp_path_factory.mktemp(f"npz-{request.param}")
    if request.param == "generated":
        source = generated_npz(folder / "generated.npz")
    elif NPZ.is_file():
        source = NPZ
    else:
        pytest.skip(f"{NPZ} is not beside this checkout (real PneumoniaMNIST; see ../shared/data/README.md)")
    data = np.load(source, allow_pickle=False)
    out = {}
    for split, n in (("train", 32), ("val", 16), ("test", 16)):
        labels = data[f"{split}_labels"][:, 0]
        rows = np.concatenate([np.flatnonzero(labels == 0)[: n // 2], np.flatnonzero(labels == 1)[: n // 2]])
        out[f"{split}_images"], out[f"{split}_labels"] = data[f"{split}_images"][rows], data[f"{split}_labels"][rows]
    path = folder / "pneumoniamnist.npz"
    np.savez(path, **out)
    return path


def test_real_chest_xrays_from_npz_to_counterfactual(small_npz, tmp_path):
    config = load_config(REPO / "jobs" / "pneumoniamnist.yaml",
                         [f"--data.raw_path={small_npz}", f"--data.shard_dir={tmp_path / 'shards'}"])
    shards = ensure_shards(config.data, progress=False)
    manifest = read_manifest(shards)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 32, "val": 16, "test": 16}
    assert manifest["splits"]["train"]["label_counts"]["pneumonia"] == {"0": 16, "1": 16}
    assert manifest["image_size"] == [32, 32] and manifest["channels"] == 1

    torch.manual_seed(0)
    dae = build_dae("tiny-32")
    with torch.no_grad():  # a fresh UNet predicts eps = 0 and ignores z_sem; give it weights that use z_sem
        for p in dae.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ae = DiffusionAutoencoder(dae, alphas_cumprod(linear_betas()), device="cpu", batch_size=16)
    table = load_latents(encode_to_table(ae, shards, ["train", "test"], tmp_path / "latents.parquet",
                                         batch_size=16, progress=False))
    assert table.z_sem.shape == (48, 512) and table.split_counts() == {"test": 16, "train": 32}
    assert sorted(np.unique(table.labels["pneumonia"]).tolist()) == [0, 1]

    task = Task("pneumonia", "pneumonia", positives=(1,))
    result = fit_task(table, task, kind="svm", calibration="lstsq")
    assert result.head.n_pos == 16 and result.head.n_neg == 16  # fitted on the train split's rows only

    from harness.data import eval_loader

    x = next(iter(eval_loader(shards, 2, split="test")))["image"]  # (2, 1, 32, 32)
    ce = binary_counterfactuals(ae, x, result.head, invert_steps=3, decode_steps=3)
    assert ce.x_ce.shape == x.shape and torch.isfinite(ce.x_ce).all()
    np.testing.assert_allclose(result.head.hyperplane.distance(ce.z_ce.numpy()), -ce.dist, atol=1e-4)
