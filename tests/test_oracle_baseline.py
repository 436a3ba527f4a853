"""The DenseNet121 baseline as the CEs' oracle: loaded from the baseline's output folder, run before the CEs,
saved beside the heads as safetensors + spec, and packaged into the served explainer, whose answer carries its
verdict (and says so when no oracle was packaged)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers.serving import STEPS, TASK, export_tiny_dae, phantom_images, png_b64, png_pixels, write_heads

from harness.cli import run_main
from harness.config import ConfigError, Task, load_config
from harness.data import write_phantom_shards
from harness.evaluation.oracle import (
    ORACLE_SPEC,
    ORACLE_WEIGHTS,
    load_oracle,
    module_oracle,
    save_oracle,
    train_cnn_oracle,
)
from harness.ops.baseline import ORACLE_BUILDERS, WEIGHTS_FILE, DenseNetSpec, build_densenet, load_detection_model

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
REPO = Path(__file__).resolve().parents[1]
TINY = DenseNetSpec(init_features=8, growth_rate=4, block_config=(1, 1, 1, 1))  # tests only


def write_baseline_folder(out: Path, task: Task, seed: int = 0, auc: float = 0.875) -> torch.nn.Module:
    """A baseline output folder as ``harness.ops.baseline_job`` leaves it: job.json and the selected detection
    network's ``best/<task>-detection/`` (safetensors weights + record.json); the network is returned."""
    torch.manual_seed(seed)
    model = build_densenet(TINY, 1).eval()
    folder = out / "best" / f"{task.name}-detection"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / "record.json").write_text(json.dumps({
        "task": {**task.to_dict(), "objectives": ["detection"]}, "objective": "detection", "model": TINY.name,
        "selected": "lr=0.001 epochs=2 (best epoch 2)", "test": {"auc": auc, "f1": 0.5}, "val": {"auc": 0.8}}))
    (out / "job.json").write_text(json.dumps({"model": {"init_features": 8, "growth_rate": 4,
                                                        "block_config": [1, 1, 1, 1], "dropout": 0.0}}))
    return model


def test_the_baselines_densenet_loads_as_an_oracle_and_round_trips_through_safetensors(tmp_path):
    task = Task("fracture", "grade", (1, 2, 3))
    original = write_baseline_folder(tmp_path / "baseline", task)
    model, found = load_detection_model(tmp_path / "baseline", "fracture")
    assert found["test_auc"] == 0.875 and found["spec"]["in_channels"] == 1 and found["spec"]["output_index"] == 0
    oracle = module_oracle(model, f"{TINY.name} baseline", task, found["test_auc"], spec=found["spec"])
    x = torch.rand(6, 1, 32, 32) * 2 - 1  # (6, 1, 32, 32) in model range
    with torch.no_grad():
        expected = torch.sigmoid(original(x)[:, 0]).double().numpy()
    np.testing.assert_allclose(oracle.probabilities(x), expected, rtol=1e-5)  # the selected weights, not new ones
    assert oracle.feature_array(x).shape == (6, model.class_layers.out.in_features)  # pooled features (B, F)

    saved = save_oracle(oracle, tmp_path / "eval" / "oracle")
    assert sorted(p.name for p in saved.iterdir()) == sorted([ORACLE_SPEC, ORACLE_WEIGHTS])
    again = load_oracle(saved, ORACLE_BUILDERS)
    assert again.name == oracle.name and again.test_auc == 0.875 and again.task == task
    np.testing.assert_allclose(again.probabilities(x), oracle.probabilities(x), rtol=1e-6)
    np.testing.assert_allclose(again.feature_array(x), oracle.feature_array(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no builder"):
        load_oracle(saved)  # this layer cannot build a DenseNet by itself
    with pytest.raises(ConfigError, match="no selected detection model of task 'edema'"):
        load_detection_model(tmp_path / "baseline", "edema")
    spec = json.loads((saved / ORACLE_SPEC).read_text())
    spec["spec"]["out_channels"] = 3
    (saved / ORACLE_SPEC).write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="does not fit"):
        load_oracle(saved, ORACLE_BUILDERS)


def test_the_small_cnn_oracle_round_trips_too(tmp_path):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 64), ("test", 32)):
        offset = rng.uniform(-0.4, 0.4, n)
        images = np.clip(rng.uniform(-0.5, 0.5, (n, 1, 16, 16)) + offset[:, None, None, None], -1, 1)
        splits[split] = (torch.from_numpy(images).float(), {"bright": (offset > 0).astype(np.int64)}, [])
    oracle = train_cnn_oracle(splits, Task("bright", "bright", (1,)), epochs=1, width=4)
    again = load_oracle(save_oracle(oracle, tmp_path / "oracle"))
    test = splits["test"][0]
    np.testing.assert_allclose(again.probabilities(test), oracle.probabilities(test), rtol=1e-6)
    assert again.test_auc == pytest.approx(oracle.test_auc) and again.info["n_train"] == 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=32, n_val=8, n_test=16, seed=2, samples_per_shard=16)
    return out


def test_the_baseline_runs_before_the_ces_and_its_densenet_judges_them(shards, tmp_path, monkeypatch):
    """``pipeline.run`` with every stage but the oracle's stubbed: the baseline runs before the oracle stage and
    the CEs, whose judge is the baseline's selected network (saved to ``<eval.out_dir>/oracle``); the CE rows
    name it. Without a baseline job, or with ``eval.oracle: cnn``, the small CNN judges."""
    from harness import pipeline

    task = load_config(None, []).heads.tasks[0]
    calls: list[str] = []
    seen: dict = {}

    def stage(name, value=None):
        return lambda *args, **kwargs: calls.append(name) or value

    def fake_baseline(config, out_dir):
        calls.append("baseline")
        write_baseline_folder(out_dir / "baseline", task)
        return [{"task": task.name, "method": "DenseNet (from scratch)"}]

    def fake_ces(config, latents, heads, images, lpips=None, judges=None):
        calls.append("counterfactuals")
        seen["judges"] = judges
        return "ces"

    monkeypatch.setattr(pipeline, "train_model", stage("train"))
    monkeypatch.setattr(pipeline, "encode_latents", stage("encode", SimpleNamespace(path=tmp_path / "latents")))
    monkeypatch.setattr(pipeline, "fit_heads", stage("heads"))
    monkeypatch.setattr(pipeline, "check_autoencoder", stage("checks", SimpleNamespace(images={"meta": []})))
    monkeypatch.setattr(pipeline, "add_floors", stage("floors"))
    monkeypatch.setattr(pipeline, "run_baseline", fake_baseline)
    monkeypatch.setattr(pipeline, "make_counterfactuals", fake_ces)
    monkeypatch.setattr(pipeline, "write_report", stage("report", tmp_path / "index.html"))
    monkeypatch.setattr(pipeline, "_lpips_or_reason", lambda: (None, "no LPIPS here"))
    monkeypatch.setattr(pipeline, "_fid_or_none", lambda: None)
    job = REPO / "jobs" / "baseline_phantoms.yaml"
    common = [f"--data.shard_dir={shards}", "--data.source=shards", f"--eval.baseline_job={job}"]
    pipeline.run(None, [*common, f"--eval.out_dir={tmp_path / 'eval'}"])
    assert calls.index("baseline") < calls.index("counterfactuals") < calls.index("report")
    oracle = seen["judges"].oracle
    assert oracle.name == f"{TINY.name} baseline" and oracle.test_auc == 0.875
    saved = load_oracle(tmp_path / "eval" / "oracle", ORACLE_BUILDERS)
    assert saved.name == oracle.name and saved.spec["architecture"] == "densenet"

    calls.clear()
    pipeline.run(None, [*common, f"--eval.out_dir={tmp_path / 'cnn'}", "--eval.oracle=cnn"])
    assert "baseline" in calls and seen["judges"].oracle.name.startswith("small CNN")
    assert load_oracle(tmp_path / "cnn" / "oracle").spec["architecture"] == "small_cnn"


def test_the_ce_rows_name_their_oracle(monkeypatch):
    from harness import pipeline
    from harness.evaluation.evaluate import Judges

    judges = Judges(module_oracle(build_densenet(TINY, 1), "DenseNet121 baseline", TASK))
    monkeypatch.setattr(pipeline, "fit_directions", lambda *a, **k: {"pattern": None})
    monkeypatch.setattr(pipeline, "evaluate_counterfactual_set", lambda *a, **k: (
        [{"kind": "healthy -> fractured", "oracle_flip": 0.75}, {"kind": "grade 0 -> grade 3"}], {}))
    config = load_config(None, ["--counterfactual.calibrate_gain=false", "--counterfactual.direction=pattern"])
    latents = SimpleNamespace(ae=None, table=None)
    ces = pipeline.make_counterfactuals(config, latents, SimpleNamespace(main=None), {}, None, judges)
    assert ces.rows[0]["oracle"] == "DenseNet121 baseline" and "oracle" not in ces.rows[1]


def write_job(path: Path, tasks: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    (["--eval.oracle=densenet"], "eval.oracle: must be one of 'auto', 'cnn' or 'baseline'"),
    (["--eval.oracle=baseline"], "eval.oracle: 'baseline' needs eval.baseline_job"),
    (["--eval.baseline_job=JOB_OTHER"], "no task 'fracture'"),
    (["--eval.baseline_job=JOB_MISMATCH", "--eval.oracle=baseline"], "make them one task"),
])
def test_a_bad_oracle_setting_is_one_error_line_and_exit_2_before_any_work(overrides, message, tmp_path, capsys,
                                                                         monkeypatch):
    from harness import pipeline

    other = write_job(tmp_path / "other.yaml", [{"name": "edema", "column": "edema", "positives": [1]}])
    mismatch = write_job(tmp_path / "mismatch.yaml", [{"name": "fracture", "column": "grade", "positives": [2, 3]}])
    overrides = [o.replace("JOB_OTHER", str(other)).replace("JOB_MISMATCH", str(mismatch)) for o in overrides]
    monkeypatch.setattr(pipeline, "train_model", lambda config: pytest.fail("training started"))
    assert run_main(pipeline.main, [f"--eval.out_dir={tmp_path / 'eval'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------------------------------------
# The served answer.
# ---------------------------------------------------------------------------------------------------------


def test_the_served_answer_carries_the_packaged_oracles_verdict(tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from harness.ops import serving

    monkeypatch.setenv("DAE_CF_SERVING_DEVICE", "cpu")
    model_dir = export_tiny_dae(tmp_path / "dae" / "final")
    images = phantom_images(4)
    (tmp_path / "eval").mkdir()
    write_heads(tmp_path / "eval" / "heads.json", model_dir, images)
    torch.manual_seed(1)
    network = build_densenet(TINY, 1)
    spec = {"architecture": "densenet", "densenet": {"init_features": 8, "growth_rate": 4,
                                                     "block_config": [1, 1, 1, 1], "dropout": 0.0},
            "in_channels": 1, "out_channels": 1}
    oracle = module_oracle(network, "DenseNet baseline", TASK, 0.9, spec=spec)
    save_oracle(oracle, tmp_path / "eval" / "oracle")  # where the pipeline saves it, beside heads.json
    common = dict(invert_steps=STEPS, decode_steps=STEPS, max_images=8)
    with_oracle = serving.build_explainer(model_dir, tmp_path / "eval" / "heads.json", "fracture", "svm",
                                          tmp_path / "served", **common)
    request = pd.DataFrame({"image": [png_b64(image) for image in images]})
    answers = mlflow.pyfunc.load_model(str(with_oracle)).predict(request)
    probabilities = []
    for row in answers:
        ce = torch.from_numpy(png_pixels(row["ce_binary_png"]).astype(np.float32) / 127.5 - 1.0)[None, None]
        positive = float(oracle.probabilities(ce)[0])  # the same oracle on the answered CE image (8-bit)
        expected = positive if row["ce_binary_class"] == 1 else 1.0 - positive
        assert row["oracle"] == "DenseNet baseline"
        assert row["oracle_target_probability"] == pytest.approx(expected, abs=0.02)
        assert row["oracle_flipped"] == (row["oracle_target_probability"] > 0.5)
        probabilities.append(row["oracle_target_probability"])
    assert len(set(np.round(probabilities, 6))) > 1  # it judged each image, not a constant
    settings = json.loads((with_oracle / "artifacts" / "serving.json").read_text())
    assert settings["oracle"] == {"name": "DenseNet baseline", "test_auc": 0.9}
    assert any(line.startswith("monai") for line in (with_oracle / "requirements.txt").read_text().splitlines())
    # the answer without an oracle: tests/test_serving.py (its heads.json has no oracle/ beside it)
    with pytest.raises(ConfigError, match="judges task 'fracture', the explainer is for 'edema'"):
        serving.find_oracle(tmp_path / "eval" / "heads.json", "edema", tmp_path / "eval" / "oracle", 1)
    assert serving.find_oracle(tmp_path / "eval" / "heads.json", "edema", None, 1) is None


def test_the_pneumoniamnist_job_judges_128_ces_by_its_densenet121_baseline():
    from harness import pipeline
    from harness.config import load_yaml
    from harness.ops.baseline import BaselineJob

    config = load_config(REPO / "jobs" / "pneumoniamnist.yaml", [])
    assert config.eval.counterfactual_images >= 128 and config.eval.oracle_source == "baseline"
    pipeline.check_oracle_source(config)  # its baseline job trains detection of the heads' first task
    job = load_yaml(REPO / config.eval.baseline_job, BaselineJob)
    assert job.model.name == "DenseNet121" and job.tasks[0].name == config.heads.tasks[0].name
