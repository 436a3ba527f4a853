"""The ``pneumonia`` suite: the real-data job (``jobs/pneumoniamnist.yaml``) at a reduced budget, so ``--check``
fails when the detection AUC on the official PneumoniaMNIST test split drops by more than a set margin.

Reads ``../shared/data/pneumoniamnist.npz`` beside the checkout (or ``$DAECF_PNEUMONIAMNIST``); prepares shards at
32 px (padded), trains tiny-32, encodes train and test without augmentation, fits the svm and logistic heads with
balanced class weights and scores them from their signed distances. The DenseNet121 baseline and the
counterfactuals are left to the job itself (``python -m harness.pipeline --config jobs/pneumoniamnist.yaml``).

Small form (2-core CPU, a few minutes): 8,192 training samples, DDIM 20 / 20 for the reconstruction check.
Full form: the job's own budget (120,000 samples) and 100 / 100 steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.records import Metric, SuiteResult
from benchmarks.suites import SuiteContext

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "pneumoniamnist.yaml"
SMALL_BUDGET = dict(total_samples=8192, invert_steps=20, decode_steps=20, recon_images=16)
FULL_BUDGET = dict(total_samples=120_000, invert_steps=100, decode_steps=100, recon_images=64)


def npz_path() -> Path:
    path = Path(os.environ.get("DAECF_PNEUMONIAMNIST", REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the pneumonia suite needs the PneumoniaMNIST npz "
                                "(set DAECF_PNEUMONIAMNIST to its path)")
    return path


def pneumonia_suite(ctx: SuiteContext) -> SuiteResult:
    """Test-split detection AUC and F1 of the svm and logistic heads, and the reconstruction MSE."""
    from harness.config import load_config
    from harness.data import eval_loader
    from harness.data.sources import ensure_shards
    from harness.encode import encode_to_table
    from harness.evaluation.evaluate import evaluate_heads, evaluate_reconstruction
    from harness.method.autoencoder import DiffusionAutoencoder
    from harness.method.latents import load_latents
    from harness.train_dae import main as train_main

    budget = SMALL_BUDGET if ctx.small else FULL_BUDGET
    result = SuiteResult(notes=[f"budget: {budget}"])
    settings = {
        "data.raw_path": npz_path(), "data.shard_dir": ctx.work_dir / "pneumonia-shards",
        "train.out_dir": ctx.work_dir / "pneumonia-model", "train.total_samples": budget["total_samples"],
        "train.log_every": budget["total_samples"], "train.checkpoint_every": budget["total_samples"],
        "train.preview_every": 10 * budget["total_samples"], "train.preview_images": 4,
        "diffusion.invert_steps": budget["invert_steps"], "diffusion.decode_steps": budget["decode_steps"],
        # The reconstruction check walks the full depth whatever depth the job's CEs use (the baseline's protocol).
        "diffusion.invert_to": "null",
        "track.enabled": "false", "heads.backend": "sklearn",
        # The suite's baseline was recorded with tiny-32 and DDIM; the job has since moved to nano-32 and
        # fixed-point inversion for its counterfactuals. Pinned, so a --check compares like with like.
        "model.size": "tiny-32", "train.lr": 2e-4, "diffusion.inversion": "ddim",
    }
    overrides = [f"--{key}={value}" for key, value in settings.items()]
    config = load_config(JOB, overrides)
    ensure_shards(config.data, progress=False)
    torch.manual_seed(0)
    trained = train_main(["--config", str(JOB), *overrides, "--resume"])

    ae = DiffusionAutoencoder.load(trained["model_dir"], device=ctx.device, batch_size=config.eval.batch_size)
    latents = ctx.work_dir / "pneumonia-latents.parquet"
    encode_to_table(ae, config.data.shard_dir, ["train", "test"], latents, batch_size=config.eval.batch_size,
                    image_size=config.data.image_size, channels=config.data.channels, progress=False)
    table = load_latents(latents)
    task = config.heads.tasks[0]
    heads = evaluate_heads(table, [task], ("svm", "logistic"), C=config.heads.C, backend="sklearn", split="test")
    batch = next(iter(eval_loader(config.data.shard_dir, budget["recon_images"], split="test",
                                  image_size=config.data.image_size, channels=config.data.channels)))
    recon = evaluate_reconstruction(ae, batch["image"], [(budget["invert_steps"], budget["decode_steps"])])[0]
    result.rows += [{"kind": "detection", **row} for row in heads.detection_rows]
    result.rows.append({"kind": "reconstruction", **recon})

    m = result.metrics
    for row in heads.detection_rows:
        # The margin the issue asks for: an AUC drop of more than 0.03 (absolute) fails the check.
        m[f"pneumonia/{row['kind']}/auc"] = Metric(row["auc"], "AUC", tolerance=0.0, abs_tolerance=0.03)
        m[f"pneumonia/{row['kind']}/f1"] = Metric(row["f1"], "F1", tolerance=0.0, abs_tolerance=0.05)
    m["pneumonia/recon/mse"] = Metric(recon["mse"], "MSE in [-1, 1]", False, tolerance=0.25, abs_tolerance=0.002)
    for name, metric in m.items():
        print(f"[pneumonia] {name}: {metric.value:.4f}", flush=True)
    return result
