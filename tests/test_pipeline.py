"""The main job end to end at a tiny budget, encoding across ranks, and the import boundaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import write_phantom_shards
from harness.diffusion import alphas_cumprod, linear_betas
from harness.encode import encode_to_table
from harness.evaluation.report import check_report
from harness.fingerprint import manifest_hash, weights_sha256
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.latents import load_latents
from harness.models import build_dae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=96, n_val=16, n_test=32, seed=1, samples_per_shard=16)
    return out


def untrained_autoencoder() -> DiffusionAutoencoder:
    torch.manual_seed(0)
    return DiffusionAutoencoder(build_dae("tiny-32"), alphas_cumprod(linear_betas()), device="cpu", batch_size=8)


def test_encoding_split_over_ranks_equals_one_process_and_resumes(shards, tmp_path):
    ae = untrained_autoencoder()
    kwargs = dict(batch_size=8, with_x_T=True, invert_steps=2, batches_per_chunk=1, progress=False)
    single = load_latents(encode_to_table(ae, shards, ["val", "test"], tmp_path / "one.npz", **kwargs))
    # Two "ranks" run one after the other; rank 0 merges once every chunk is there.
    assert encode_to_table(ae, shards, ["val", "test"], tmp_path / "two.npz", rank=1, world_size=2, **kwargs) is None
    merged = load_latents(encode_to_table(ae, shards, ["val", "test"], tmp_path / "two.npz", rank=0, world_size=2,
                                          **kwargs))
    assert len(single) == 48 and single.split_counts() == {"test": 32, "val": 16}
    np.testing.assert_array_equal(single.ids, merged.ids)
    np.testing.assert_allclose(single.z_sem, merged.z_sem, atol=1e-5)
    np.testing.assert_allclose(single.x_T, merged.x_T, atol=1e-4)
    np.testing.assert_array_equal(single.labels["grade"], merged.labels["grade"])
    assert single.x_T.shape == (48, 1, 32, 32) and single.z_sem.shape == (48, 512)
    # The table records what made it: these weights, these shards, these settings.
    made_by = single.meta["fingerprint"]
    assert made_by["weights_sha256"] == weights_sha256(ae.dae) and made_by["invert_steps"] == 2
    assert made_by["data_manifest_sha256"] == manifest_hash(shards) and made_by["splits"] == ["val", "test"]
    assert weights_sha256(untrained_autoencoder().dae) == made_by["weights_sha256"]  # same seed, same weights
    other = untrained_autoencoder()
    with torch.no_grad():
        next(other.dae.parameters()).add_(1e-3)
    assert weights_sha256(other.dae) != made_by["weights_sha256"]

    # Resume: chunks already on disk are not encoded again (a poisoned encoder would change them).
    parts = tmp_path / "resume.npz.parts"
    encode_to_table(ae, shards, ["test"], tmp_path / "resume.npz", **kwargs)
    full = load_latents(tmp_path / "resume.npz")
    from harness.encode import encode_split

    encode_split(ae, shards, "test", parts, batch_size=8, batches_per_chunk=1, progress=False)
    first_chunk = sorted(parts.glob("*.npz"))[0]
    first_chunk.unlink()  # as if the job died after writing all but the first chunk
    calls = []
    original = ae.encode
    ae.encode = lambda x: calls.append(len(x)) or original(x)
    encode_split(ae, shards, "test", parts, batch_size=8, batches_per_chunk=1, progress=False)
    assert calls == [8], "only the missing chunk should be encoded again"
    assert len(full) == 32


@pytest.mark.slow
def test_main_pipeline_tiny_budget_writes_complete_report(shards, tmp_path):
    from harness.pipeline import run

    overrides = ["--data.source=shards", f"--data.shard_dir={shards}", f"--train.out_dir={tmp_path / 'dae'}",
                 f"--eval.out_dir={tmp_path / 'eval'}", "--train.total_samples=64", "--train.batch_size=16",
                 "--train.preview_images=4", "--diffusion.invert_steps=3", "--diffusion.decode_steps=3",
                 "--eval.counterfactual_images=8", "--eval.strip_images=2", "--eval.batch_size=16",
                 "--eval.encode_splits=[train, test]", "--counterfactual.render=local",
                 "--counterfactual.calibrate_gain=true", "--counterfactual.gain_images=8"]
    index = run(str(REPO / "jobs" / "phantoms_demo.yaml"), overrides)
    assert index.is_file() and check_report(index) == []
    html = index.read_text()
    for figure in ("strips.png", "moves.png", "latent_map.png", "roc_fracture.png", "calibration_fracture.png",
                   "truth_to_high.png"):
        assert f"figures/{figure}" in html
    tables = index.parent / "tables"
    for name in ("detection", "grading", "counterfactuals", "reconstruction", "floors", "beats_floors", "z_usage"):
        assert (tables / f"{name}.csv").is_file()
    import csv
    import json

    with open(tables / "counterfactuals.csv") as handle:
        ce_rows = list(csv.DictReader(handle))
    measured = {(r["direction"], r["move"]) for r in ce_rows}
    for direction in ("pattern+gain", "normal", "pattern", "normal_subspace", "mean_diff"):  # every one x move size
        assert {(direction, "1x"), (direction, "2x"), (direction, "4x"), (direction, "-")} <= measured
    assert all(r["closer_than_input"] != "" for r in ce_rows)  # phantoms: every CE row is scored against the truth
    shares = [float(r["centre_share"]) for r in ce_rows if r["centre_share"] not in ("", "nan")]
    assert shares and all(0.0 <= share <= 1.0 for share in shares)  # bounded, whatever the border does
    with open(tables / "floors.csv") as handle:
        floors = {(r["floor"], r["kind"]) for r in csv.DictReader(handle)}
    assert ("raw pixels", "logistic") in floors and ("random encoder", "svm") in floors
    heads = json.loads((tmp_path / "eval" / "heads.json").read_text())
    assert {entry["direction"]["name"] for entry in heads.values()} == {"pattern"}  # the job's direction
    # The CE head carries the gain measured on training images (the served explainer moves as the report did);
    # the other heads, never rendered here, keep the exact latent move.
    gains = {key: entry["direction"]["gain"] for key, entry in heads.items()}
    assert gains.pop("fracture/svm") != [1.0, 1.0] and all(g == [1.0, 1.0] for g in gains.values())
    detection = (tables / "detection.csv").read_text().splitlines()
    assert detection[0].startswith("task,kind,split,auc,f1") and len(detection) == 1 + 2 * 3  # 2 tasks x 3 kinds
    table = load_latents(tmp_path / "eval" / "latents.parquet")
    assert set(np.unique(table.splits)) == {"train", "test"}
    assert (tmp_path / "eval" / "heads.json").is_file()


def test_core_modules_do_not_import_entry_point_libraries():
    code = ("import sys, harness.config, harness.diffusion, harness.models, harness.method.heads, "
            "harness.method.counterfactual, harness.method.latents, harness.method.metrics, "
            "harness.method.autoencoder, harness.data.phantoms, harness.data.transforms\n"
            "bad = [m for m in ('accelerate', 'ray', 'mlflow', 'webdataset') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_baseline_is_a_call_on_the_loaded_job_and_its_rows_are_read_back(tmp_path, monkeypatch):
    """The pipeline's baseline step calls harness.ops.baseline_job.run_baselines (no subprocess to jobs/) with the job
    file loaded, and turns the records it writes into Table 3 rows."""
    import json

    from harness import pipeline
    from harness.config import load_config
    from harness.ops.baseline import BaselineJob

    calls = []

    def fake_run_baselines(shards, job, out, *, task_names=None, num_cpus=None):
        calls.append({"shards": shards, "job": job, "out": out, "task_names": task_names, "num_cpus": num_cpus})
        for objective, test in (("detection", {"auc": 0.9, "f1": 0.8, "accuracy": 0.85, "n_pos": 4}),
                                ("grading", {"macro_f1": 0.5})):
            folder = Path(out) / "best" / f"fracture-{objective}"
            folder.mkdir(parents=True)
            (folder / "record.json").write_text(json.dumps({
                "task": {"name": "fracture"}, "objective": objective, "model": "DenseNet121",
                "selected": "lr=0.001 epochs=20 (best epoch 3)", "test": test}))
        (Path(out) / "summary.json").write_text(json.dumps({"rows": [{"task": "fracture", "wall_s": 12.5}]}))
        return {"rows": [], "objectives": {}, "out": str(out), "parent_run_id": None}

    monkeypatch.setattr(pipeline, "run_baselines", fake_run_baselines)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the baseline ran as a subprocess"))
    job_file = REPO / "jobs" / "baseline_phantoms.yaml"
    config = load_config(None, [f"--eval.baseline_job={job_file}", "--eval.baseline_cpus=3",
                                f"--data.shard_dir={tmp_path / 'shards'}"])
    rows = pipeline.run_baseline(config, tmp_path / "eval")
    assert rows == [{"task": "fracture", "method": "DenseNet121 (from scratch)", "auc": 0.9, "f1": 0.8,
                     "accuracy": 0.85, "wall_s": 12.5, "selected": "lr=0.001 epochs=20 (best epoch 3)"}]
    (call,) = calls
    assert str(call["shards"]) == str(tmp_path / "shards") and Path(call["out"]) == tmp_path / "eval" / "baseline"
    assert isinstance(call["job"], BaselineJob) and call["job"].model.name == "DenseNet121"
    assert call["num_cpus"] == 3 and call["task_names"] is None  # every task of the job, as the old command line
    config = load_config(None, [f"--eval.baseline_job={job_file}", f"--data.shard_dir={tmp_path / 'shards'}"])
    pipeline.run_baseline(config, tmp_path / "eval2")
    assert calls[-1]["num_cpus"] is None  # no eval.baseline_cpus: Ray's default (all cores)


def test_take_balanced_finds_both_classes_in_a_split_written_sorted_by_label(tmp_path):
    # MedMNIST-prepared splits can open with hundreds of one class: the gain calibration and the CE batch must
    # still see both, or the "healthy" side is measured on misclassified positives.
    from harness.config import load_config
    from harness.data.shards import write_shards
    from harness.pipeline import take_balanced

    samples = [(f"s{i:04d}", np.full((8, 8), i % 256, np.uint8), {"label": int(i >= 40)}) for i in range(60)]
    samples = samples[40:] + samples[:40]  # 20 positives first, then 40 negatives
    write_shards(samples, tmp_path, "train", samples_per_shard=16)
    config = load_config(None, ["--data.image_size=8"])
    batch = take_balanced(str(tmp_path), "train", 8, config, "label")  # 32 at a time: the first 32 hold 12 negatives
    assert sorted(batch["labels"]["label"].tolist()) == [0] * 4 + [1] * 4
    assert batch["image"].shape == (8, 1, 8, 8) and len(batch["key"]) == len(batch["meta"]) == 8
    for key, label, image in zip(batch["key"], batch["labels"]["label"].tolist(), batch["image"], strict=True):
        index = int(key[1:])  # image, key and label still belong together after the regrouping
        assert label == int(index >= 40) and image.mean().item() == pytest.approx(index / 127.5 - 1.0, abs=1e-6)
    few = take_balanced(str(tmp_path), "train", 4, config, "label")  # the first 16 are all positive: read on
    assert sorted(few["labels"]["label"].tolist()) == [0, 0, 1, 1]
