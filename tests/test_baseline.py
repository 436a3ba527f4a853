"""DenseNet121 baseline: pieces without Ray, one tiny Ray Tune run with sqlite MLflow, and the comparison report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness.config import ConfigError, load_yaml, validate
from harness.evaluation.report import check_report
from harness.ops import baseline_job, compare_job
from harness.ops.baseline import (
    BaselineJob,
    BaselineTask,
    DataShape,
    DenseNetSpec,
    EarlyStopping,
    build_densenet,
    evaluate_weights,
    labels_used,
    score,
)
from harness.ops.compare import load_summary, method_row, write_comparison

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}  # tests only


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Trials get one core each from Ray; the driver-side parts here do the same (threads spin on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from harness.data.shards import write_phantom_shards

    return write_phantom_shards(tmp_path_factory.mktemp("phantoms") / "shards", size=32, n_train=48, n_val=24,
                                n_test=24, seed=3, samples_per_shard=24)


def job_dict(tmp_path: Path, **changes) -> dict:
    job = {
        "out_dir": str(tmp_path / "out"), "model": TINY_MODEL,
        "augment": {"enabled": True, "p": 0.5},  # the DAE's augmentation path, exercised
        "search": {"lr": [3e-3, 3e-2], "epochs": [2], "patience": 1, "batch_size": 16, "eval_batch_size": 24},
        "resources": {"cpu": 1, "gpu": 0}, "track": {"experiment": "baseline-test"},
        "tasks": [{"name": "fracture", "column": "grade", "positives": [1, 2, 3], "grade_range": [0, 3]}],
    }
    job.update(changes)
    return job


# ---------------------------------------------------------------------------------------------------------
# Without Ray.
# ---------------------------------------------------------------------------------------------------------


def test_job_file_is_strict(tmp_path):
    job = validate(BaselineJob, job_dict(tmp_path))
    assert job.tasks[0].run_objectives == ("detection", "grading") and job.model.name.startswith("DenseNet(")
    assert load_yaml(ROOT / "jobs" / "baseline_phantoms.yaml", BaselineJob).model.name == "DenseNet121"
    for changes, message in (({"search": {"lrs": [1e-3]}}, r"unknown key\(s\) \['lrs'\]"),
                             ({"augment": {"rotate": 10}}, r"unknown key\(s\) \[.rotate.\] in augment"),
                             ({"select_grading": "auc"}, "select_grading"),
                             ({"tasks": [{"name": "a", "column": "grade", "positives": [1],
                                          "objectives": ["grading"]}]}, "needs a grade_range")):
        with pytest.raises(ConfigError, match=message):
            validate(BaselineJob, job_dict(tmp_path, **changes))


def test_scoring_early_stopping_and_label_counts():
    task = BaselineTask("fracture", "grade", (2, 3), (0,), grade_range=(0, 3))
    labels = np.array([0, 1, 2, 3, 0, np.nan])
    detection = score(np.array([-2.0, 5.0, 1.0, 3.0, 0.5, 9.0]), labels, task, "detection")
    assert detection["n_pos"] == 2 and detection["n_neg"] == 2  # grade 1 and the missing label are left out
    assert detection["auc"] == 1.0 and detection["f1"] == pytest.approx(0.8)  # the grade-0 row at 0.5 is a FP
    grading = score(np.array([-0.7, 1.4, 2.6, 7.0, 0.2, 1.0]), labels, task, "grading")
    assert grading["mae"] == pytest.approx(1 / 5) and grading["confusion"][2][3] == 1  # 2.6 -> 3; 7 -> 3 clipped
    stopper = EarlyStopping(patience=2)
    seen = [stopper.update(v, e) for e, v in enumerate([0.5, math.nan, 0.7, 0.6, 0.7], start=1)]
    assert seen == [True, False, True, False, False] and stopper.stop and stopper.best_epoch == 3
    assert labels_used({"0": 10, "1": 5, "2": 3, "3": 2}, task) == 20  # graded: every row counts
    assert labels_used({"0": 10, "1": 5, "2": 3, "3": 2}, BaselineTask("f", "grade", (2, 3), (0,))) == 15


def test_default_network_is_densenet121_from_scratch_and_learns_at_32px():
    from monai.networks.nets import DenseNet121

    model = build_densenet(DenseNetSpec(), in_channels=1)
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)  # MONAI's own DenseNet121
    assert DenseNetSpec().name == "DenseNet121"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # random initialisation: nothing pretrained (the reference is another random draw)
    assert not torch.equal(model.state_dict()["features.conv0.weight"], reference.state_dict()["features.conv0.weight"])
    # one optimisation step at the phantoms' 32 px lowers the loss on that batch
    torch.manual_seed(0)
    images, grades = torch.randn(4, 1, 32, 32), torch.tensor([0.0, 1.0, 2.0, 3.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    before = torch.nn.functional.mse_loss(model(images).reshape(-1), grades)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(images).reshape(-1), grades)
    assert float(after) < float(before.detach())


# ---------------------------------------------------------------------------------------------------------
# A tiny Ray Tune run, then the comparison report.
# ---------------------------------------------------------------------------------------------------------


def test_baseline_tunes_selects_on_val_and_tests_once(shards, tmp_path, local_ray):
    from mlflow.tracking import MlflowClient

    config = tmp_path / "baseline.yaml"
    config.write_text(yaml.safe_dump(job_dict(tmp_path)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = baseline_job.main(
        ["--shards", str(shards), "--task", "fracture", "--config", str(config), "--tracking-uri", uri])
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["pretrained"] == "False"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # 2 learning rates x 1 epoch budget x 2 objectives
    job = load_yaml(config, BaselineJob)
    data = DataShape(str(shards), 32, 1, 48, 1.0)
    for objective, key in (("detection", "auc"), ("grading", "macro_f1")):
        runs = [r for r in children if r.data.tags["objective"] == objective]
        assert len(runs) == 2
        for run in runs:
            assert not any(name.startswith("test") for name in run.data.metrics)  # test: never in a trial
            epochs_run = int(run.data.metrics["epoch"])
            assert len(client.get_metric_history(run.info.run_id, f"val_{key}")) == epochs_run  # one per epoch
        selected = [r for r in runs if r.data.tags["selected"] == "true"]
        assert len(selected) == 1
        assert selected[0].data.metrics["best_score"] == max(r.data.metrics["best_score"] for r in runs)
        # the parent's test metric is that of the selected trial's best checkpoint, scored once
        parent_metric = f"fracture/{objective}/test_{key}"
        assert len(client.get_metric_history(parent.info.run_id, parent_metric)) == 1
        folder = tmp_path / "out" / "best" / f"fracture-{objective}"
        record = json.loads((folder / "record.json").read_text())
        recomputed = evaluate_weights(folder, data, job.tasks[0], objective, job)
        assert recomputed["test"][key] == pytest.approx(parent.data.metrics[parent_metric])
        assert record["val"][key] == pytest.approx(recomputed["val"][key])
        assert f"lr={float(selected[0].data.params['lr']):.3g}" in record["selected"]

    row = summary["rows"][0]
    assert row["method"].startswith("DenseNet(") and row["labels_used"] == 48 and row["trials"] == 4
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["gpu_s"] == 0

    # comparison report beside a head row of the same task
    head = method_row("fracture", "DAE + svm head", {"auc": 0.9, "f1": 0.8}, {"grade_macro_f1": 0.6, "grade_mae": 0.4},
                      labels_used=48, wall_s=row["wall_s"] / 10, cpu_s=1.0, gpu_s=0.0, trials=12, selected="svm C=1")
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "summary.json").write_text(json.dumps({"rows": [head]}))
    index = compare_job.main(["--heads", str(tmp_path / "heads"), "--baseline",
                                             str(tmp_path / "out"), "--out", str(tmp_path / "compare")])
    assert check_report(index) == []
    table = json.loads((tmp_path / "compare" / "tables" / "task-fracture.json").read_text())
    assert [r["method"] for r in table] == ["DAE + svm head", row["method"]]
    assert table[0]["macro_f1"] == 0.6 and table[1]["auc"] == pytest.approx(row["auc"])
    ratios = json.loads((tmp_path / "compare" / "tables" / "cost_ratios.json").read_text())
    assert ratios[0]["wall_s_ratio"] == pytest.approx(0.1)
    assert load_summary(tmp_path / "out")[0]["task"] == "fracture"
    with pytest.raises(ValueError, match="nothing to compare"):
        write_comparison([], [], tmp_path / "empty")
