"""``dae-cf findings``: one job file runs the head sweep over every finding, the floors, the multi-label DenseNet121
baseline and the comparison (with each finding's best floor AUC and ``beats_floor``); its bad input is one line and
exit status 2 before any work; and the heads verb refuses the quadratic SVM solver above its row limit."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from harness.cli import run_main
from harness.config import DiffusionConfig, load_yaml
from harness.config.heads import MAX_ROWS_QUADRATIC, HeadsConfig
from harness.config.sizes import DAE_SIZES
from harness.data.cxr_phantoms import TABLES, generate_corpus
from harness.data.prepare.__main__ import main as prepare_main
from harness.data.shards import read_manifest
from harness.evaluation.floors import images_from_shards, random_encoder_latents
from harness.method.latents import LatentsTable, save_latents
from harness.model_spec import WEIGHTS_NAME, ModelSpec, write_model_spec
from harness.ops import compare_job, findings_job, fit_heads_job
from harness.ops.findings_job import FindingsJob

TINY_DENSENET = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}
# a DAE architecture small enough that building and running its encoder on 200 images takes a second
TINY_DAE = dataclasses.replace(DAE_SIZES["nano-32"], base_channels=8, z_dim=32, time_embed_dim=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """~200 chest X-ray phantoms at 32 px as shards (``--findings all``), a DAE model folder (untrained weights of
    TINY_DAE) and latents of those shards whose meta names the folder, as ``dae-cf encode`` writes them."""
    root = tmp_path_factory.mktemp("findings")
    raw = root / "mimic-cxr-jpg"
    generate_corpus(raw, 240, seed=3, size=32, workers=1, progress=False)
    shards = root / "shards"
    # a patient-level split with large val / test parts: every finding needs both classes in each split
    assert prepare_main(["mimic-cxr", str(raw), "--metadata", str(raw / TABLES["metadata"]),
                         "--labels", str(raw / TABLES["chexpert"]), "--split-fractions", "train=0.5,val=0.25,test=0.25",
                         "--views", "all", "--size", "32", "--findings", "all", "--uncertain", "ignore",
                         "--blank", "ignore", "--out", str(shards), "--workers", "1", "--no-progress"]) == 0
    model = root / "dae"
    model.mkdir()
    spec = ModelSpec(architecture=TINY_DAE, in_channels=1, diffusion=DiffusionConfig())
    torch.manual_seed(0)
    save_file(spec.build().state_dict(), str(model / WEIGHTS_NAME))
    write_model_spec(model, spec)
    images = images_from_shards(shards, ["train", "val", "test"], 32, 1)
    # stand-in latents: an encoder of another seed than the floor's (the job only needs ids, splits and labels)
    table = random_encoder_latents(TINY_DAE, 1, 32, images, seed=11)
    latents = save_latents(LatentsTable(ids=table.ids, splits=table.splits, z_sem=table.z_sem, labels=table.labels,
                                        meta={"model": str(model)}), root / "latents.parquet")
    return {"root": root, "shards": shards, "latents": latents, "model": model}


def findings(shards: Path, count: int = 2) -> list[str]:
    """Findings with at least 4 positive and 4 negative images in each split of the tiny corpus."""
    splits = read_manifest(shards)["splits"]
    usable = [name for name in sorted(splits["train"]["label_counts"])
              if all(splits[s]["label_counts"].get(name, {}).get(v, 0) >= 4 for s in ("train", "val", "test")
                     for v in ("0", "1"))]
    assert len(usable) >= count, usable
    return usable[:count]


def write_job(path: Path, corpus: dict[str, Path], **changes) -> Path:
    names = findings(corpus["shards"])
    job = {"latents": str(corpus["latents"]), "shards": str(corpus["shards"]), "out_dir": str(path.parent / "out"),
           "tasks": [{"name": n, "column": n, "positives": [1], "negatives": [0], "select": "auc"} for n in names],
           "sweep": {"uncertain": "ignore", "resources": {"cpu": 1, "gpu": 0},
                     "search": {"kinds": ["logistic"], "C": [0.1, 1.0]}},
           "baseline": {"model": TINY_DENSENET, "resources": {"cpu": 1, "gpu": 0},
                        "search": {"lr": [3e-3], "epochs": [1], "patience": 1, "batch_size": 32,
                                   "eval_batch_size": 64}},
           "floors": {"max_train_rows": 100},
           "track": {"experiment": "findings-test"}}
    job.update(changes)
    path.write_text(yaml.safe_dump(job))
    return path


def _error_line(main, argv: list[str], capsys) -> str:
    assert run_main(main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow
def test_one_job_runs_sweep_floors_baseline_and_comparison(corpus, tmp_path, local_ray):
    import mlflow

    config = write_job(tmp_path / "findings.yaml", corpus)
    job = load_yaml(config, FindingsJob)
    names = [task.name for task in job.tasks]
    out = tmp_path / "out"
    clock = time.perf_counter()
    summary = findings_job.main(["--config", str(config), "--num-cpus", "2"])
    print(f"findings job: {time.perf_counter() - clock:.1f} s; stages {summary['seconds']}")
    for stage in ("sweep", "baseline", "floors", "comparison"):
        assert (out / stage).is_dir(), stage
    rows = summary["rows"]
    assert [(row["task"], row["method"][:3]) for row in rows] == [(name, m) for name in names for m in ("DAE", "Den")]
    for row in rows:  # every finding has a tuned floor beside it, from both floors
        assert math.isfinite(row["floor_auc"]) and 0.0 <= row["floor_auc"] <= 1.0, row
        assert row["beats_floor"] == (math.isfinite(row["auc"]) and row["auc"] > row["floor_auc"])
    floors = json.loads((out / "floors" / "floors.json").read_text())
    assert {row["floor"] for row in floors["rows"]} == {"raw pixels", "random encoder"}
    assert floors["random_encoder"] == str(corpus["model"]) and floors["train_rows"] <= 100
    assert all(row["C"] in (0.1, 1.0) and "val AUC" in row["C_chosen_on"] for row in floors["rows"])
    assert "max_train_rows=100" in floors["caption"]
    table = json.loads((out / "comparison" / "tables" / "comparison.json").read_text())
    assert {"floor_auc", "beats_floor"} <= set(table[0]) and len(table) == 2 * len(names)
    best = {name: max(r["auc"] for r in floors["rows"] if r["task"] == name) for name in names}
    assert all(row["floor_auc"] == pytest.approx(best[row["task"]]) for row in table)
    # dae-cf compare of the separate stages' folders, given the floors, makes the same table
    compare_job.main(["--heads", str(out / "sweep"), "--baseline", str(out / "baseline"), "--floors",
                      str(out / "floors"), "--out", str(tmp_path / "compare")])
    again = json.loads((tmp_path / "compare" / "tables" / "comparison.json").read_text())
    assert [(r["task"], r["floor_auc"], r["beats_floor"]) for r in again] == [
        (r["task"], r["floor_auc"], r["beats_floor"]) for r in table]
    # one MLflow parent run holding the sweep's and the baseline's
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    for child in summary["child_run_ids"].values():
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"


def test_bad_key_unknown_finding_and_existing_out_are_one_line_before_any_work(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    bad = write_job(tmp_path / "a.yaml", corpus, sweep={"search": {"kinds": ["logistic"], "C": [-1.0]},
                                                        "uncertain": "maybe"}, baseline={"epochz": 2})
    line = _error_line(findings_job.main, ["--config", str(bad)], capsys)
    assert all(key in line for key in ("sweep.search.C", "sweep.uncertain", "baseline.epochz")), line
    tasks = [{"name": "pneumothorax_x", "column": "pneumothorax_x", "positives": [1], "negatives": [0]}]
    line = _error_line(findings_job.main, ["--config", str(write_job(tmp_path / "b.yaml", corpus, tasks=tasks))],
                       capsys)
    assert "'pneumothorax_x'" in line
    clock = time.perf_counter()
    line = _error_line(findings_job.main, ["--config", str(write_job(tmp_path / "c.yaml", corpus)), "--address",
                                           "127.0.0.1:1"], capsys)
    assert "127.0.0.1:1" in line and "does not answer" in line and time.perf_counter() - clock < 15
    assert not out.exists()
    out.mkdir()
    line = _error_line(findings_job.main, ["--config", str(write_job(tmp_path / "d.yaml", corpus))], capsys)
    assert str(out) in line and "--overwrite" in line
    assert list(out.iterdir()) == []


def edema_table(n: int = 300) -> LatentsTable:
    """200 train, 50 val, 50 test rows of 8-d latents with a binary ``edema`` label."""
    rng = np.random.default_rng(0)
    labels = {"edema": (rng.random(n) < 0.4).astype(np.float64)}
    return LatentsTable(ids=[f"s{i}" for i in range(n)], splits=np.repeat(["train", "val", "test"], [200, 50, 50]),
                        z_sem=rng.normal(size=(n, 8)).astype(np.float32), labels=labels, meta={})


def test_heads_verb_refuses_the_quadratic_solver_above_its_limit(tmp_path, capsys):
    assert HeadsConfig().max_rows_quadratic == MAX_ROWS_QUADRATIC  # the sweep's default, one constant
    latents = save_latents(edema_table(), tmp_path / "latents.parquet")
    task = "--heads.tasks=[{name: edema, column: edema, positives: [1], negatives: [0]}]"
    out = tmp_path / "heads"
    argv = ["--latents", str(latents), "--out", str(out), task, "--heads.kinds=[svm, logistic]",
            "--heads.protocol=paper", "--heads.backend=sklearn", "--heads.max_rows_quadratic=150"]
    line = _error_line(fit_heads_job.main, argv, capsys)
    assert "svc_linear" in line and "200 training rows" in line and "max_rows_quadratic=150" in line
    assert "linear_svc" in line and "cuml" in line
    assert not (out / "heads.json").exists()
    # the same job under the limit fits both heads (the limit is the section's, not a fixed one)
    assert run_main(fit_heads_job.main, [*argv[:-1], "--heads.max_rows_quadratic=200"]) == 0
    assert (out / "heads.json").exists()


def test_the_pipeline_refuses_the_quadratic_solver_before_fitting_a_head(tmp_path, monkeypatch):
    from harness import pipeline
    from harness.config import load_config
    from harness.evaluation import heads as evaluation_heads
    from harness.method.heads import HeadFitError

    fitted = []
    fit_task = evaluation_heads.fit_task
    monkeypatch.setattr(evaluation_heads, "fit_task", lambda *args, **kw: fitted.append(kw["kind"]) or fit_task(
        *args, **kw))

    config = load_config(None, [f"--eval.out_dir={tmp_path / 'eval'}", "--heads.protocol=paper",
                                "--heads.kinds=[logistic, svm]", "--heads.backend=sklearn",
                                "--heads.max_rows_quadratic=120",
                                "--heads.tasks=[{name: edema, column: edema, positives: [1], negatives: [0]}]"])
    latents = pipeline.Latents(ae=None, path=tmp_path / "latents.parquet", table=edema_table())
    with pytest.raises(HeadFitError, match=r"svc_linear.*200 training rows.*max_rows_quadratic=120.*linear_svc"):
        pipeline.fit_heads(config, latents)
    assert fitted == [] and not (tmp_path / "eval").exists()  # not even the logistic head, listed first, was fitted
    # under the (default) limit both kinds fit, the svm with the quadratic solver
    config = load_config(None, [f"--eval.out_dir={tmp_path / 'eval'}", "--heads.protocol=paper",
                                "--heads.kinds=[logistic, svm]", "--heads.backend=sklearn",
                                "--heads.tasks=[{name: edema, column: edema, positives: [1], negatives: [0]}]"])
    monkeypatch.setattr(pipeline, "save_heads", lambda *args, **kw: None)
    heads = pipeline.fit_heads(config, latents)
    assert fitted == ["logistic", "svm"] and len(heads.evaluation.detection_rows) == 2


def test_the_shipped_job_file_holds_both_stages_for_every_finding():
    from harness.data.prepare.mimic_cxr import ALL_FINDINGS
    from harness.ops.baseline import BaselineJob
    from harness.ops.sweep import SweepJob
    from harness.ops.sweep_job import trial_configs

    root = Path(__file__).resolve().parents[1] / "jobs"
    job = load_yaml(root / "findings_cxr.yaml", FindingsJob)
    sweep, baseline = job.sweep_job("out/sweep"), job.baseline_job("out/baseline")
    assert [task.column for task in job.tasks] == list(ALL_FINDINGS) and sweep.uncertain == "ignore"
    assert all(len(trial_configs(task, sweep)) >= 20 for task in sweep.tasks)
    assert baseline.multilabel and [task.name for task in baseline.tasks] == [task.name for task in sweep.tasks]
    # the same stages as the separate job files, which stay the building blocks
    alone = load_yaml(root / "sweep_cxr.yaml", SweepJob)
    assert sweep.search == alone.search and sweep.tasks == alone.tasks
    assert baseline.model == load_yaml(root / "baseline_cxr.yaml", BaselineJob).model
