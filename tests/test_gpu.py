"""What only a CUDA device can check: bf16 training, cuML heads against scikit-learn, a DeepSpeed ZeRO-2 step.

Every test here is marked ``gpu`` and skipped, with the reason, where ``torch.cuda.is_available()`` is false; the
code paths they exercise exist on every machine (Accelerate's bf16 autocast, ``heads.backend=cuml``,
``launch/deepspeed/zero2.json`` through ``harness.distributed``). Run them with ``pytest -m gpu`` on a GPU host.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.deepspeed_step import check_zero2_step, run_step
from helpers.training import run_training, tiny_args

from harness import checkpoint as ckpt
from harness.config import load_config
from harness.data import write_phantom_shards
from harness.method.heads import fit_head
from harness.models import build_dae

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is "
                                                             "false here)"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=64, n_val=16, n_test=16, seed=0, samples_per_shard=32)
    return out


def test_bf16_training_of_tiny32_through_accelerate(shards, tmp_path):
    """The trainer itself (harness/train_dae.py, one GPU, Accelerate's bf16 autocast): finite loss, weights move."""
    out = tmp_path / "run"
    proc = run_training(tiny_args(shards, out, total=32, **{"train.mixed_precision": "bf16"}))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    final = out / "final"
    summary = json.loads((final / "model.json").read_text())
    assert np.isfinite(summary["final_loss"]) and 0 < summary["final_loss"] < 2.0, summary
    config = load_config(str(final / "config.yaml"))
    assert config.train.mixed_precision == "bf16"
    # The initial weights, built as the trainer builds them (same seed): the trained EMA must have left them.
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    initial = build_dae(config.model.size, in_channels=config.data.channels,
                        **config.model.overrides(config.data.image_size)).state_dict()
    trained = ckpt.load_state_dict(final / "ema.safetensors")
    change = {name: float((value.float().cpu() - initial[name].float()).abs().max())
              for name, value in trained.items() if value.is_floating_point()}
    # Two steps from zero-initialised output layers: those move first (the layers before them get gradients
    # once the outputs are non-zero), so some tensors, not all, have moved; an untouched model moves none.
    moved = [name for name, delta in change.items() if delta > 0]
    assert len(moved) >= 10 and max(change.values()) > 1e-4, f"only {moved} moved"
    assert all(torch.isfinite(value).all() for value in trained.values() if value.is_floating_point())


@pytest.mark.parametrize("kind", ["logistic", "linear", "svm"])
def test_cuml_head_matches_scikit_learn_on_the_same_data(kind):
    pytest.importorskip("cuml", reason="cuML is not installed (the `gpu` extra)")
    rng = np.random.default_rng(0)
    n, dim = 600, 64
    direction = rng.normal(size=dim)
    y = rng.integers(0, 2, size=n)
    z = rng.normal(size=(n, dim)) + np.outer(2.0 * y - 1.0, direction / np.linalg.norm(direction)) * 1.5
    z_test, y_test = z[400:], y[400:]
    heads = {backend: fit_head(z[:400], y[:400], kind=kind, C=1.0, backend=backend) for backend in ("cuml", "sklearn")}
    assert heads["cuml"].backend == "cuml" and heads["sklearn"].backend == "sklearn"
    normals = {b: h.hyperplane.normal / np.linalg.norm(h.hyperplane.normal) for b, h in heads.items()}
    # Same objective, different solvers: the same hyperplane up to solver tolerance (LinearSVC least tight).
    assert float(normals["cuml"] @ normals["sklearn"]) > (0.95 if kind == "svm" else 0.99)
    predictions = {b: h.hyperplane.distance(z_test) > 0 for b, h in heads.items()}
    assert float(np.mean(predictions["cuml"] == predictions["sklearn"])) >= 0.97
    for head in heads.values():  # both learned the planted direction, not noise
        assert float(np.mean((head.hyperplane.distance(z_test) > 0) == y_test)) > 0.85


@pytest.mark.parametrize(("clip", "precision"), [(0.25, "bf16"), (0.0, "no")])
def test_deepspeed_zero2_step_on_gpu_takes_clipping_and_precision_from_the_job(tmp_path, clip, precision):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    pytest.importorskip("transformers", reason="the `deepspeed` extra is not installed (Accelerate needs transformers)")
    summary = run_step(tmp_path / "step.json", [f"--train.grad_clip={clip}", f"--train.mixed_precision='{precision}'"],
                       "cuda")
    check_zero2_step(summary, clip, precision, "cuda")
    assert np.isfinite(summary["loss"]) and 0 < summary["loss"] < 10
