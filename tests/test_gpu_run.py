"""The GPU run's smoke form: `benchmarks/gpu_run.sh --smoke` takes every stage's code path on this CPU.

The PneumoniaMNIST stage reads a MedMNIST-layout file generated here (phantoms, label = fractured), so the test
needs nothing beside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers.medmnist import generated_npz

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_smoke_form_runs_every_stage_and_writes_one_record(tmp_path):
    npz = generated_npz(tmp_path / "pneumoniamnist.npz", counts=(96, 32, 32), seed=20)
    out = tmp_path / "out"
    env = {**os.environ, "DAECF_PNEUMONIAMNIST": str(npz), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = list(out.glob("gpu_run-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    notes = record["notes"].get("gpu_run", [])
    assert not [note for note in notes if "failed" in note], notes
    metrics = record["metrics"]
    assert metrics["gpu_run/train/tiny-32/bf16/images_per_s"]["value"] > 0
    assert 0 < metrics["gpu_run/train/tiny-32/fp32/mfu"]["value"] < 1
    assert metrics["gpu_run/ce/tiny-32/fp32/fixed_point10/latency_s"]["value"] > 0
    assert metrics["gpu_run/pneumonia/train_images_per_s"]["value"] > 0
    assert any(name.startswith("gpu_run/pneumonia/") and name.endswith("/auc") for name in metrics)
    if "deepspeed: not installed" not in " ".join(notes):
        assert metrics["gpu_run/deepspeed_zero2/tiny-32/images_per_s"]["value"] > 0
    assert (out / "models" / "pneumonia" / "final" / "dae_spec.json").is_file()  # the model comes back with the figures
    assert (out / "eval-pneumonia" / "report" / "index.html").is_file()
