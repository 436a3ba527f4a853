"""Model registry: version tags, the promotion rule, and a real `mlflow server` (sqlite) found via MlflowClient.

The server is started once for the module with ``mlflow/start_server.sh`` on a free loopback port; it boots
while the pure tests run and is stopped (its whole process group) at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.serving import (
    export_tiny_dae,
    free_port,
    phantom_images,
    start_server,
    stop_server,
    wait_until_ready,
    write_heads,
)

from harness.checkpoint import load_state_dict, save_state_dict
from harness.config import TrackConfig, load_config
from harness.data import write_phantom_shards
from harness.method.autoencoder import DiffusionAutoencoder
from harness.model_spec import write_model_spec
from harness.ops import registry, serving
from harness.ops.registry import compare_to_champion, config_hash, manifest_hash, metric_direction, version_tags
from harness.ops.tracking import Tracker, local_model_dir

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def tracking_server(tmp_path_factory) -> Iterator[dict]:
    """`mlflow/start_server.sh` with a sqlite store and a local artifact root, on 127.0.0.1:<free port>."""
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = store / "server.log"
    process = start_server(["bash", str(ROOT / "mlflow" / "start_server.sh"), "--store", str(store), "--port",
                            str(port), "--workers", "1"], log)
    try:
        yield {"process": process, "uri": f"http://127.0.0.1:{port}", "store": store, "log": log}
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server_uri(tracking_server) -> str:
    wait_until_ready(tracking_server["process"], f"{tracking_server['uri']}/health", tracking_server["log"])
    return tracking_server["uri"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Tiny phantom shards and an untrained tiny DAE exported as if trained on them."""
    root = tmp_path_factory.mktemp("registry")
    shards = root / "shards"
    write_phantom_shards(shards, size=32, n_train=8, n_val=4, n_test=4, seed=0, samples_per_shard=8)
    return {"root": root, "shards": shards, "model_dir": export_tiny_dae(root / "run" / "final", shard_dir=shards)}


# ---------------------------------------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------------------------------------


def test_metric_names_and_directions():
    assert metric_direction("recon_mse") == "lower" and metric_direction("eval/recon_mse") == "lower"
    assert metric_direction("recon/mse") == "lower"
    for name in ("auc", "fracture/svm/auc", "fracture.auc", "auc_fracture", "val_auc"):
        assert metric_direction(name) == "higher", name
    for name in ("config_hash", "model_size", "final_loss", "auction"):
        assert metric_direction(name) is None, name


@pytest.mark.parametrize("candidate, champion, promote, phrase", [
    ({"recon_mse": "0.05"}, None, True, "no current champion"),
    ({"config_hash": "abc"}, None, False, "no benchmark metric"),
    ({"recon_mse": "nan"}, None, False, "non-finite"),
    ({"recon_mse": "0.05"}, {"recon_mse": "0.05"}, True, "0.05 <= 0.05"),  # equal is not worse
    ({"recon_mse": "0.04"}, {"recon_mse": "0.05"}, True, "lower is better"),
    ({"recon_mse": "0.06"}, {"recon_mse": "0.05"}, False, "0.06 > 0.05"),
    ({"recon_mse": "0.04", "a/auc": "0.80"}, {"recon_mse": "0.05", "a/auc": "0.81"}, False, "0.8 < 0.81"),
    ({"recon_mse": "0.05", "a/auc": "0.90"}, {"recon_mse": "0.05", "a/auc": "0.81"}, True, "0.9 >= 0.81"),
    ({"recon_mse": "0.01"}, {"recon_mse": "0.05", "a/auc": "0.8"}, False, "a/auc: missing"),
    ({"recon_mse": "0.05", "b/auc": "0.7"}, {"recon_mse": "0.05"}, True, "not compared"),
    ({"recon_mse": "0.05"}, {"model_size": "tiny-32"}, True, "champion has no benchmark"),
])
def test_promotion_rule(candidate, champion, promote, phrase):
    decision = compare_to_champion(candidate, champion)
    assert decision.promote is promote
    assert phrase in str(decision), str(decision)


def test_config_hash_ignores_locations_and_manifest_hash_ignores_the_timestamp(exported, tmp_path):
    config_text = (exported["model_dir"] / "config.yaml").read_text()
    moved = tmp_path / "moved.yaml"
    moved.write_text(config_text.replace("out_dir: runs/dae-tiny", "out_dir: elsewhere/run")
                     .replace("experiment: dae-cf", "experiment: other"))
    changed = tmp_path / "changed.yaml"
    changed.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: 0.123", config_text))
    assert moved.read_text() != config_text and changed.read_text() != config_text
    original = config_hash(exported["model_dir"] / "config.yaml")
    assert config_hash(moved) == original and config_hash(changed) != original

    manifest = json.loads((exported["shards"] / "manifest.json").read_text())
    copy = tmp_path / "shards"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps({**manifest, "created": "1999-01-01T00:00:00+00:00"}))
    assert manifest_hash(copy) == manifest_hash(exported["shards"])
    first_shard = sorted(manifest["checksums"])[0]
    manifest["checksums"][first_shard] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_hash(copy) != manifest_hash(exported["shards"])
    assert manifest_hash(tmp_path / "nowhere") is None

    tags = version_tags(exported["model_dir"])
    assert tags["config_hash"] == original and tags["data_manifest_hash"] == manifest_hash(exported["shards"])
    assert float(tags["recon_mse"]) == pytest.approx(0.05) and tags["model_size"] == "tiny-32"


def test_mlproject_entry_points_call_existing_scripts_with_known_flags():
    """Every entry point's command names a script or module that exists and accepts each flag it passes."""
    assert not (ROOT / "mlflow" / "__init__.py").exists()  # would shadow the mlflow library
    project = yaml.safe_load((ROOT / "mlflow" / "MLproject").read_text())
    assert set(project["entry_points"]) == {"train", "encode", "sweep", "baseline", "report"}
    for name, entry in project["entry_points"].items():
        command = entry["command"].format(**{key: spec["default"] for key, spec in entry["parameters"].items()})
        assert command.startswith("cd .. && "), name  # jobs resolve paths from the repository root
        words = command.split()
        if "-m" in words:  # python -m package.module
            start = words.index("-m") + 2
            script = words[start - 1].replace(".", "/") + ".py"
        else:
            start = next(i for i, word in enumerate(words) if word.endswith(".py")) + 1
            script = words[start - 1]
        source = (ROOT / script).read_text()
        wrapped = re.search(r"^from (harness(?:\.\w+)+) import main$", source, re.M)
        if wrapped:  # a thin jobs/ script: the flags live in the module it runs
            source = (ROOT / (wrapped.group(1).replace(".", "/") + ".py")).read_text()
        for flag in (word for word in words[start:] if word.startswith("--")):
            assert f'"{flag}"' in source, f"{name}: {script} has no option {flag}"


# ---------------------------------------------------------------------------------------------------------
# Through the real server.
# ---------------------------------------------------------------------------------------------------------


def test_trained_models_are_registered_and_found_through_the_server(exported, server_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    name, track = "dae-registry-test", TrackConfig(tracking_uri=server_uri, experiment="registry-test")
    # A second model: the exported folder with one weight changed (so its weights checksum differs).
    retrained = exported["root"] / "retrained"
    shutil.copytree(exported["model_dir"], retrained)
    weights = load_state_dict(retrained / "ema.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    save_state_dict(weights, retrained / "ema.safetensors")
    write_model_spec(retrained, load_config(retrained / "config.yaml"))  # the spec names the new weights
    versions = []
    for index, (folder, recon) in enumerate(((exported["model_dir"], 0.05), (retrained, 0.04))):
        tracker = Tracker(track, exported["root"] / "run", run_name=f"train-{index}")
        tracker.log_params({"train.lr": 1e-4, "index": index})
        tracker.log_metrics({"val/recon_mse": recon, "train/loss": 0.5}, step=32)
        versions.append(tracker.register_model(folder, name, tags={"recon_mse": f"{recon:.6f}"}))
        tracker.end()
    assert versions == ["1", "2"]

    client = MlflowClient(server_uri)
    experiment = client.get_experiment_by_name("registry-test")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.data.metrics["val/recon_mse"] for run in runs] == [0.05, 0.04]
    assert [run.data.tags[f"registered.{name}"] for run in runs] == ["1", "2"]
    found = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [v.run_id for v in found] == [run.info.run_id for run in runs]
    for version in found:
        assert version.tags["config_hash"] == config_hash(exported["model_dir"] / "config.yaml")
        assert version.tags["data_manifest_hash"] == manifest_hash(exported["shards"])
    assert [float(v.tags["recon_mse"]) for v in found] == [0.05, 0.04]
    assert client.get_model_version_by_alias(name, "candidate").version == "2"  # the newest version

    # Registering identical weights again (a rerun of a finished run) reuses their version.
    tracker = Tracker(track, exported["root"] / "run", run_name="rerun")
    assert tracker.register_model(exported["model_dir"], name) == "1"
    tracker.end()
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    assert client.get_model_version_by_alias(name, "candidate").version == "2"

    # The registered files are the exported ones, served through the server's artifact proxy.
    ae = DiffusionAutoencoder.load(local_model_dir(f"models:/{name}/1"), device="cpu")
    expected = load_state_dict(exported["model_dir"] / "ema.safetensors")
    loaded = ae.dae.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_promote_command_moves_champion_only_when_not_worse(exported, server_uri, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server_uri)
    name = "dae-promotion-test"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("promotion-test"))  # versions only need a run's source
    for recon in ("0.05", "0.08", "0.05", "0.04"):
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                    tags={"recon_mse": recon})

    def promote(version: int) -> int:
        return registry.main(["--tracking-uri", server_uri, "promote", "--name", name, "--version", str(version)])

    def champion() -> str:
        return client.get_model_version_by_alias(name, "champion").version

    assert promote(1) == 0 and champion() == "1"
    assert "no current champion" in capsys.readouterr().out
    assert promote(2) == 1 and champion() == "1"  # reconstruction got worse
    assert "0.08 > 0.05" in capsys.readouterr().out
    assert registry.main(["--tracking-uri", server_uri, "tag", "--name", name, "--version", "3",
                          "fracture/svm/auc=0.9"]) == 0
    assert promote(3) == 0 and champion() == "3"  # equal MSE, plus an AUC the old champion lacked
    assert client.get_model_version(name, "3").tags["previous_champion"] == "1"
    assert promote(4) == 1 and champion() == "3"  # better MSE but no AUC: cannot show it is not worse
    assert "fracture/svm/auc: missing" in capsys.readouterr().out
    registry.add_benchmark_tags(client, name, 4, {"fracture/svm/auc": 0.85})
    assert promote(4) == 1 and champion() == "3"
    assert "0.85 < 0.9" in capsys.readouterr().out
    registry.add_benchmark_tags(client, name, 4, {"fracture/svm/auc": 0.9})
    assert promote(4) == 0 and champion() == "4"
    with pytest.raises(ValueError, match="not a benchmark metric"):
        registry.add_benchmark_tags(client, name, 4, {"size": 3.0})
    assert registry.main(["promote", "--tracking-uri", server_uri, "--name", name, "--version", "99"]) == 2
    assert "error:" in capsys.readouterr().err and champion() == "4"
    assert registry.main(["--tracking-uri", server_uri, "show", "--name", name]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["version"] == "4" and rows[0]["aliases"] == ["champion"]


def test_explainer_is_logged_and_registered_through_the_server(exported, server_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    images = phantom_images(4)
    write_heads(tmp_path / "heads.json", exported["model_dir"], images)
    built = serving.build_explainer(exported["model_dir"], tmp_path / "heads.json", "fracture", "svm",
                                    tmp_path / "explainer", invert_steps=2, decode_steps=2)
    version = serving.register_explainer(built, "dae-explainer-test", tracking_uri=server_uri)
    client = MlflowClient(server_uri)
    registered = client.get_model_version_by_alias("dae-explainer-test", "candidate")
    assert registered.version == version
    assert registered.tags["task"] == "fracture" and registered.tags["kind"] == "svm"
    assert registered.tags["dae_config_hash"] == config_hash(exported["model_dir"] / "config.yaml")
    listed = {Path(item.path).name for item in client.list_artifacts(registered.run_id, "explainer")}
    assert {"MLmodel", "explainer.py", "artifacts"} <= listed
    assert np.isfinite(float(registered.tags["dae_recon_mse"]))
