"""The head sweep on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a worker node):
trials spread over both nodes and record the node that ran them; a worker node killed mid-sweep loses only its
running trial, which Tune runs again; and the job's bad input (an uncertain policy, a finding, a cluster address,
the quadratic solver on too many rows) is one line and exit status 2 before any work."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.cli import run_main
from harness.method.latents import LatentsTable, save_latents
from harness.ops import sweep_job

FINDINGS = ("edema", "pleural_effusion", "atelectasis")


def findings_latents(path: Path, n_train: int = 400, dim: int = 16, seed: int = 0) -> Path:
    """Binary findings (1 / 0 / -1 uncertain / missing) each carried by its own latent direction."""
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_train // 4, "test": n_train // 4}
    n = sum(counts.values())
    z = rng.normal(size=(n, dim))  # (N, D)
    labels = {}
    for index, name in enumerate(FINDINGS):
        truth = rng.random(n) < 0.35
        z[:, index] += 1.2 * truth
        values = truth.astype(np.float64)
        values[rng.random(n) < 0.08] = -1.0  # uncertain
        values[rng.random(n) < 0.05] = np.nan  # not mentioned
        labels[name] = values
    table = LatentsTable(ids=[f"s{i}" for i in range(n)], splits=np.repeat(list(counts), list(counts.values())),
                         z_sem=z.astype(np.float32), labels=labels, meta={"dae": "dae-test:v1"})
    return save_latents(table, path)


def cxr_job(path: Path, **changes) -> Path:
    job = {"out_dir": str(path.parent / "out"), "uncertain": "ignore", "max_failures": 3,
           "resources": {"cpu": 1, "gpu": 0}, "track": {"experiment": "sweep-cluster-test"},
           "search": {"kinds": ["svm", "logistic"], "C": [0.1, 1.0], "class_weights": ["balanced", None]},
           "tasks": [{"name": name, "column": name, "positives": [1], "negatives": [0]} for name in FINDINGS]}
    job.update(changes)
    path.write_text(yaml.safe_dump(job))
    return path


def _error_line(argv: list[str], capsys) -> str:
    assert run_main(sweep_job.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    latents = findings_latents(tmp_path / "latents.parquet")
    out = tmp_path / "never"
    base = ["--latents", str(latents), "--out", str(out)]
    line = _error_line([*base, "--config", str(cxr_job(tmp_path / "a.yaml", uncertain="maybe"))], capsys)
    assert "uncertain" in line and "maybe" in line
    bad_task = [{"name": "pneumothorax", "column": "pneumothorax", "positives": [1]}]
    line = _error_line([*base, "--config", str(cxr_job(tmp_path / "b.yaml", tasks=bad_task))], capsys)
    assert "'pneumothorax'" in line and all(name in line for name in FINDINGS)
    clock = time.perf_counter()
    line = _error_line([*base, "--config", str(cxr_job(tmp_path / "c.yaml")), "--address", "127.0.0.1:1"], capsys)
    assert "127.0.0.1:1" in line and "does not answer" in line and time.perf_counter() - clock < 15
    quadratic = cxr_job(tmp_path / "d.yaml", max_rows_quadratic=100,
                        search={"kinds": ["svm"], "C": [1.0], "svm_solver": "svc_linear"})
    line = _error_line([*base, "--config", str(quadratic)], capsys)
    assert "svc_linear" in line and "max_rows_quadratic=100" in line and "linear_svc" in line and "cuml" in line
    assert not out.exists()


def test_uncertain_policy_applies_to_the_minus_one_labels(tmp_path):
    from harness.config import load_yaml
    from harness.method.latents import load_latents
    from harness.ops.sweep import SweepJob, apply_uncertain

    table = load_latents(findings_latents(tmp_path / "latents.parquet"))
    raw = np.asarray(table.labels["edema"], dtype=np.float64)
    uncertain = raw == -1
    for policy, expected in (("positive", 1.0), ("negative", 0.0)):
        job = load_yaml(cxr_job(tmp_path / f"{policy}.yaml", uncertain=policy), SweepJob)
        assert (apply_uncertain(table, job).labels["edema"][uncertain] == expected).all()
    ignored = apply_uncertain(table, load_yaml(cxr_job(tmp_path / "ignore.yaml"), SweepJob)).labels["edema"]
    assert np.isnan(ignored[uncertain]).all() and np.array_equal(ignored[~uncertain], raw[~uncertain],
                                                                 equal_nan=True)


@pytest.mark.slow
def test_two_node_sweep_survives_a_killed_worker_node(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    # trials slow enough (libsvm on 3k rows, 5 folds: about a second) that the worker is killed while one runs
    latents = findings_latents(tmp_path / "latents.parquet", n_train=3000)
    job = cxr_job(tmp_path / "job.yaml", cv_folds=5, search={"kinds": ["svm"], "C": [3.0, 10.0, 30.0],
                                                 "class_weights": ["balanced", None], "svm_solver": "svc_linear"},
                  tasks=[{"name": "edema", "column": "edema", "positives": [1], "negatives": [0]}])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_head": 1},
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"node_worker": 1})
    cluster.wait_for_nodes()
    killed = threading.Event()

    def kill_worker_while_it_runs_a_trial() -> None:
        """Once the first of the six trials has reported (the sweep is under way on both nodes, most of it still to
        run), kill the worker node without warning, as a node's death would."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list((tmp_path / "out" / "ray").glob("sweep-*/*/result.json")):
                time.sleep(0.3)
                cluster.remove_node(worker, allow_graceful=False)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker_while_it_runs_a_trial, daemon=True)
    killer.start()
    try:
        result = sweep_job.main(["--latents", str(latents), "--config", str(job), "--out", str(tmp_path / "out"),
                                 "--address", cluster.address])
    finally:
        killer.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
    assert killed.is_set()
    trials = [row for summary in result["tasks"].values() for row in summary["trials"]]
    assert len(trials) == 6  # three C x two class weights
    assert all(row["ok"] == 1 and np.isfinite(row["val_auc"]) for row in trials)  # every configuration scored
    # Whether a trial was mid-run on the worker at the kill depends on timing: a killed trial shows up as a retry;
    # either way every configuration was scored above, after the node died.
    assert all(0 <= row["retries"] <= 3 for row in trials)  # within the job's max_failures
    nodes = result["trials_per_node"]
    assert sum(node["trials"] for node in nodes.values()) == len(trials)
    resources = {node["resources"] for node in nodes.values()}
    assert "node_head=1" in resources
    assert all(row["node_id"] and row["node_ip"] for row in trials)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["trials_per_node"] == nodes


@pytest.mark.slow
def test_sweep_spreads_over_two_nodes(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    latents = findings_latents(tmp_path / "latents.parquet", n_train=2400)
    job = cxr_job(tmp_path / "job.yaml", screen={"top": 1},
                  search={"kinds": ["svm"], "C": [0.01, 0.1, 1.0], "class_weights": ["balanced", None],
                          "svm_solver": "svc_linear"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_head": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_worker": 1})
    cluster.wait_for_nodes()
    try:
        result = sweep_job.main(["--latents", str(latents), "--config", str(job), "--out", str(tmp_path / "out"),
                                 "--address", cluster.address])
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = result["trials_per_node"]
    assert {node["resources"] for node in nodes.values()} == {"node_head=1", "node_worker=1"}
    assert all(node["trials"] >= 1 for node in nodes.values())
    assert sum(node["trials"] for node in nodes.values()) == len(FINDINGS) * 2  # the screen's C x two weights
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    chosen = summary["screen"]["chosen"]
    assert set(chosen) == set(FINDINGS) and all(len(c) == 1 and c[0] in (0.01, 0.1, 1.0) for c in chosen.values())
    for name, c in chosen.items():
        assert {row["C"] for row in result["tasks"][name]["trials"]} == set(c)


def test_quadratic_solver_is_refused_above_the_limit_before_fitting():
    from harness.config import HeadOptions, Task
    from harness.method.heads import HeadFitError, fit_task
    from tests.helpers.latents import graded_table

    table = graded_table(n=240)
    task = Task("fracture", "grade", (1, 2, 3))
    paper = HeadOptions(protocol="paper", C=1.0)
    with pytest.raises(HeadFitError, match=r"svc_linear.*180 training rows.*max_rows_quadratic=100.*linear_svc"):
        fit_task(table, task, kind="svm", backend="sklearn", options=paper, max_rows_quadratic=100)
    assert fit_task(table, task, kind="svm", backend="sklearn", options=paper).head.n_pos > 0  # under the default
    assert fit_task(table, task, kind="logistic", backend="sklearn", options=paper, max_rows_quadratic=100).head


def test_shipped_cxr_job_files_cover_every_finding_with_twenty_configurations():
    from harness.config import load_yaml
    from harness.data.prepare.mimic_cxr import ALL_FINDINGS
    from harness.ops.baseline import BaselineJob
    from harness.ops.sweep import SweepJob
    from harness.ops.sweep_job import trial_configs

    root = Path(__file__).resolve().parents[1] / "jobs"
    sweep = load_yaml(root / "sweep_cxr.yaml", SweepJob)
    assert [task.column for task in sweep.tasks] == list(ALL_FINDINGS) and sweep.uncertain == "ignore"
    assert all(len(trial_configs(task, sweep)) >= 20 for task in sweep.tasks)
    baseline = load_yaml(root / "baseline_cxr.yaml", BaselineJob)
    assert baseline.multilabel and [task.column for task in baseline.tasks] == list(ALL_FINDINGS)
