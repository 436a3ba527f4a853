"""The ``quality`` suite: the phantom end-to-end method with fixed seeds, scored against the phantoms' truth.

The same steps as ``harness.pipeline.run`` (train -> encode -> heads -> reconstruction -> counterfactuals), through
the functions it uses, without the report and figures. Because a phantom can be re-rendered at another grade
with the same nuisance parameters, counterfactuals are scored against the true ones (CE-vs-truth error).

Small form (a 2-core CPU, a few minutes): tiny-32 trained for a few thousand samples, DDIM 20 / 20 steps.
Full form (a GPU): the demo budget of ``jobs/phantoms_demo.yaml`` (60,000 samples) and the paper's 250 / 100 steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from benchmarks.records import Metric, SuiteResult
from benchmarks.suites import SuiteContext

SMALL_BUDGET = dict(n_train=1024, n_val=32, n_test=256, total_samples=8192, batch_size=32, invert_steps=20,
                    decode_steps=20, ce_images=16)
FULL_BUDGET = dict(n_train=2048, n_val=256, n_test=256, total_samples=60_000, batch_size=32, invert_steps=250,
                   decode_steps=100, ce_images=64)


def _overrides(work_dir: Path, shards: Path, budget: dict) -> list[str]:
    settings = {
        "data.source": "shards", "data.shard_dir": shards, "data.seed": 0, "model.size": "tiny-32",
        "train.out_dir": work_dir / "quality-model", "train.total_samples": budget["total_samples"],
        "train.batch_size": budget["batch_size"], "train.lr": 2e-4, "train.ema_decay": 0.999, "train.seed": 0,
        "train.log_every": budget["total_samples"], "train.checkpoint_every": budget["total_samples"],
        "train.preview_every": 10 * budget["total_samples"], "train.preview_images": 4,
        "diffusion.invert_steps": budget["invert_steps"], "diffusion.decode_steps": budget["decode_steps"],
        "eval.batch_size": 64, "eval.out_dir": work_dir / "quality-eval", "track.enabled": "false",
        "heads.backend": "sklearn",
    }
    return [f"--{key}={value}" for key, value in settings.items()]


def quality_suite(ctx: SuiteContext) -> SuiteResult:
    """Detection AUC, grading MAE and macro-F1, CE validity, CE-vs-truth error and reconstruction error."""
    from harness.config import load_config
    from harness.data import eval_loader, write_phantom_shards
    from harness.encode import encode_to_table
    from harness.evaluation.evaluate import evaluate_counterfactual_set, evaluate_heads, evaluate_reconstruction
    from harness.method.autoencoder import DiffusionAutoencoder
    from harness.method.latents import load_latents
    from harness.train_dae import main as train_main

    budget = SMALL_BUDGET if ctx.small else FULL_BUDGET
    result = SuiteResult(notes=[f"budget: {budget}"])
    shards = write_phantom_shards(ctx.work_dir / "quality-phantoms", size=32, n_train=budget["n_train"],
                                  n_val=budget["n_val"], n_test=budget["n_test"], seed=0, samples_per_shard=256)
    overrides = _overrides(ctx.work_dir, shards, budget)
    config = load_config(None, overrides)
    torch.manual_seed(0)
    trained = train_main(overrides + ["--resume"])

    # Encode train and test without augmentation; fit the fracture task's heads on train, score on test.
    ae = DiffusionAutoencoder.load(trained["model_dir"], device=ctx.device, batch_size=config.eval.batch_size)
    latents = ctx.work_dir / "quality-latents.parquet"
    encode_to_table(ae, shards, ["train", "test"], latents, batch_size=config.eval.batch_size,
                    image_size=config.data.image_size, channels=config.data.channels, progress=False)
    table = load_latents(latents)
    task = config.heads.tasks[0]  # fracture: grade >= 1, calibrated over grades 0..3
    heads = evaluate_heads(table, [task], ("svm",), C=config.heads.C, calibration=config.heads.calibration,
                           backend="sklearn", split="test")
    detection, grading = heads.detection_rows[0], heads.grading_rows[0]
    head_result = heads.results[(task.name, "svm")]
    result.rows += [{"kind": "detection", **detection}, {"kind": "grading", **grading}]

    # Reconstruction and counterfactuals on the first test images (fixed order: the eval loader is deterministic).
    batch = next(iter(eval_loader(shards, budget["ce_images"], split="test", image_size=config.data.image_size,
                                  channels=config.data.channels)))
    steps = dict(invert_steps=budget["invert_steps"], decode_steps=budget["decode_steps"])
    recon = evaluate_reconstruction(ae, batch["image"], [(steps["invert_steps"], steps["decode_steps"])])[0]
    ce_rows, _ = evaluate_counterfactual_set(ae, batch, head_result, class_names=("healthy", "fracture"),
                                             **steps)
    result.rows += [{"kind": "reconstruction", **recon}, *({"kind": "counterfactual", **r} for r in ce_rows)]

    # Tolerances: these are deterministic on one machine; the slack covers float differences elsewhere.
    m = result.metrics
    m["quality/detection/auc"] = Metric(detection["auc"], "AUC", tolerance=0.05, abs_tolerance=0.03)
    m["quality/grading/mae"] = Metric(grading["grade_mae"], "grades", False, tolerance=0.15, abs_tolerance=0.05)
    m["quality/grading/macro_f1"] = Metric(grading["grade_macro_f1"], "F1", tolerance=0.15, abs_tolerance=0.05)
    m["quality/recon/mse"] = Metric(recon["mse"], "MSE in [-1, 1]", False, tolerance=0.25, abs_tolerance=0.002)
    m["quality/recon/mean_image_mse"] = Metric(recon["mean_image_mse"], "MSE in [-1, 1]", False, tolerance=None)
    for row in ce_rows:  # "healthy -> fracture" -> healthy_to_fracture, "grade >0 -> grade 0" -> grade_gt0_to_grade_0
        slug = re.sub(r"[^a-z0-9]+", "_", row["kind"].replace(" -> ", " to ").replace(">", "gt")).strip("_")
        # Validity is a fraction of a handful of images: one image is 1 / ce_images.
        m[f"quality/ce/{slug}/validity"] = Metric(row["validity"], "fraction", tolerance=0.0, abs_tolerance=0.15)
        if "mae_true" in row:
            m[f"quality/ce/{slug}/mae_vs_truth"] = Metric(row["mae_true"], "MAE in [-1, 1]", False, tolerance=0.15,
                                                          abs_tolerance=0.01)
            m[f"quality/ce/{slug}/input_mae_vs_truth"] = Metric(row["mae_input_vs_true"], "MAE in [-1, 1]", False,
                                                                tolerance=None)
    for name, metric in m.items():
        print(f"[quality] {name}: {metric.value:.4f}", flush=True)
    return result
