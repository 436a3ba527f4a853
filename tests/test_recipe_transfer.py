"""The default recipe on sets that did not choose it (benchmarks/transfer_suite.py): the jobs copy the recipe
unchanged, and the suite's measurement runs end to end (at a toy budget here)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality_suite import measure_job
from benchmarks.suites import SuiteContext
from benchmarks.transfer_suite import RECIPE_JOB, TRANSFER_SETS, recipe_of
from harness.config import load_config
from harness.data.phantom_npz import write_phantom_npz


@pytest.mark.parametrize("transfer", TRANSFER_SETS, ids=lambda t: t.name)
def test_every_transfer_job_keeps_the_default_recipe(transfer):
    if not transfer.job.is_file():
        pytest.fail(f"{transfer.job} is listed in TRANSFER_SETS but missing")
    recipe, job = recipe_of(load_config(str(RECIPE_JOB), [])), recipe_of(load_config(str(transfer.job), []))
    for section, values in recipe.items():
        changed = {k: (v, job[section].get(k)) for k, v in values.items() if job[section].get(k) != v}
        assert not changed, f"{transfer.job.name} retunes the recipe's {section}: {changed}"


def test_the_transfer_measurement_runs_on_colour_phantoms_with_five_grades(tmp_path):
    npz = write_phantom_npz(tmp_path / "colour5.npz", size=32, counts=(96, 48, 48), rgb=True, grades=5)
    job = next(t.job for t in TRANSFER_SETS if t.name == "colour_phantoms5")
    overrides = [f"--data.raw_path={npz}", f"--data.shard_dir={tmp_path / 'shards'}", "--data.samples_per_shard=32",
                 f"--train.out_dir={tmp_path / 'model'}", f"--eval.out_dir={tmp_path / 'eval'}",
                 "--track.enabled=false", "--train.total_samples=64", "--train.checkpoint_every=64",
                 "--train.preview_every=64", "--train.log_every=32", "--train.probe_images=0",
                 "--train.readiness.enabled=false",
                 "--diffusion.invert_steps=2", "--diffusion.decode_steps=2", "--eval.counterfactual_images=8",
                 "--counterfactual.gain_images=8", "--counterfactual.evaluate_directions=[pattern]",
                 "--counterfactual.move_sizes=[1.0]", "--eval.batch_size=32"]
    ctx = SuiteContext(small=True, device=torch.device("cpu"), work_dir=tmp_path)
    result = measure_job(job, ctx, "transfer/colour_phantoms5", overrides, floors=True)
    metrics = result.metrics
    for name in ("detection/auc", "detection/best_floor_auc", "detection/margin_over_floors", "oracle/test_auc",
                 "grading/macro_f1"):
        assert math.isfinite(metrics[f"transfer/colour_phantoms5/{name}"].value), name
    validity = [k for k in metrics if k.endswith("/validity")]
    assert validity and all(0.0 <= metrics[k].value <= 1.0 for k in validity)
    assert any(k.endswith("/oracle_flip") for k in metrics)  # judged by a classifier that never saw a CE
    floors = {row["floor"] for row in result.rows if row["kind"] == "floor"}
    assert floors == {"raw pixels", "random encoder"}
