"""The multi-label DenseNet baseline (``multilabel: true``): one network, one logit per finding, a masked BCE,
trained through the Ray baseline job on chest X-ray phantom shards prepared with ``--findings all``, reported
per finding in the comparison-table form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness.config import ConfigError, Task, load_yaml
from harness.data.cxr_phantoms import TABLES, generate_corpus
from harness.data.prepare.__main__ import main as prepare_main
from harness.data.shards import read_manifest
from harness.ops.baseline import BaselineJob, masked_bce, multilabel_targets
from harness.ops.baseline_job import run_baselines

TINY_MODEL = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}


@pytest.fixture(scope="module")
def cxr_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cxr-multilabel")
    corpus = root / "mimic-cxr-jpg"
    generate_corpus(corpus, 160, seed=7, size=32, workers=1, progress=False)
    out = root / "shards"
    assert prepare_main(["mimic-cxr", str(corpus), "--metadata", str(corpus / TABLES["metadata"]),
                         "--labels", str(corpus / TABLES["chexpert"]), "--split", str(corpus / TABLES["split"]),
                         "--views", "all", "--size", "32", "--findings", "all", "--uncertain", "ignore",
                         "--blank", "ignore", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def test_masked_bce_ignores_masked_entries_and_targets_follow_each_rule():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])  # (B, T)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    weights = torch.tensor([1.0, 2.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[mask.bool()], target[mask.bool()], pos_weight=weights.expand(2, 2)[mask.bool()])
    assert torch.isclose(masked_bce(logits, target, mask, weights), expected)
    changed = logits.clone()
    changed[0, 1] = 100.0  # a masked entry: no effect on the loss
    assert torch.isclose(masked_bce(changed, target, mask, weights), expected)
    tasks = (Task("a", "a", (1,), (0,)), Task("b", "b", (1,)))
    labels = np.array([[1.0, np.nan], [0.0, 0.0], [np.nan, 1.0], [-1.0, -1.0]])
    used, y = multilabel_targets(labels, tasks)
    assert used.tolist() == [[True, False], [True, True], [False, True], [False, True]]  # "b": -1 is "rest"
    assert y[used].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_one_multilabel_densenet_reports_every_finding(cxr_shards, tmp_path, local_ray):
    counts = read_manifest(cxr_shards)["splits"]["train"]["label_counts"]
    findings = [name for name in ("lung_opacity", "pleural_effusion", "support_devices", "edema", "cardiomegaly",
                                  "atelectasis") if counts.get(name, {}).get("1", 0) >= 3
                and counts.get(name, {}).get("0", 0) >= 3][:4]
    assert len(findings) >= 3
    job = {"out_dir": str(tmp_path / "out"), "multilabel": True, "model": TINY_MODEL,
           "search": {"lr": [3e-3], "epochs": [2], "patience": 1, "batch_size": 16, "eval_batch_size": 32},
           "resources": {"cpu": 1, "gpu": 0}, "track": {"experiment": "baseline-multilabel-test"},
           "tasks": [{"name": n, "column": n, "positives": [1], "negatives": [0]} for n in findings]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_baselines(cxr_shards, load_yaml(path, BaselineJob), tmp_path / "out", num_cpus=1)
    rows = result["rows"]
    assert [row["task"] for row in rows] == findings  # one row per finding, from ONE network
    assert all("(multi-label)" in row["method"] for row in rows)
    assert sum(math.isfinite(row["auc"]) for row in rows) >= len(findings) - 1
    assert all(0.0 <= row["f1"] <= 1.0 for row in rows if math.isfinite(row["f1"]))
    record = json.loads((tmp_path / "out" / "best" / "multilabel" / "record.json").read_text())
    assert set(record["test"]) == set(findings) and record["selection_metric"] == "mean val auc"
    assert (tmp_path / "out" / "best" / "multilabel" / "model.safetensors").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["task"] for row in summary["rows"]] == findings


def test_multilabel_refuses_grading_tasks(tmp_path):
    job = {"multilabel": True, "tasks": [{"name": "g", "column": "grade", "positives": [1], "grade_range": [0, 3],
                                          "objectives": ["detection", "grading"]}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="multilabel"):
        load_yaml(path, BaselineJob)
