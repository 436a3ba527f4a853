"""Self-describing model folders (dae_spec.json) and artifacts that are never silently stale (run folders, shards)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from harness.checkpoint import CheckpointError, list_checkpoints
from harness.cli import run_main
from harness.config import load_config
from harness.data import write_phantom_shards
from harness.data.shards import ShardError
from harness.data.sources import check_shards_match, ensure_shards
from harness.fingerprint import StaleArtifactError, differences, run_fingerprint
from harness.method.autoencoder import DiffusionAutoencoder, load_dae
from harness.model_spec import SPEC_NAME, ModelSpec, read_model_spec
from harness.train_dae import main as train_main

FIXTURE = Path(__file__).parent / "fixtures" / "model_v1"


# --- model folders --------------------------------------------------------------------------------------------------

def test_the_version_1_fixture_folder_still_loads_and_computes_what_it_did():
    assert not (FIXTURE / "config.yaml").exists()  # loading must need only dae_spec.json and the weights
    ae = DiffusionAutoencoder.load(FIXTURE, device="cpu")
    assert (ae.invert_steps, ae.decode_steps, ae.prediction) == (10, 10, "eps")
    z = ae.encode(torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16))  # (1, 16)
    # Recorded when the fixture was written: a change in how the architecture is built or loaded shows here.
    expected = torch.tensor([-0.15309017896652222, 0.3034899830818176, 0.06524788588285446, 0.28102976083755493])
    torch.testing.assert_close(z[0, :4], expected, atol=1e-4, rtol=0)
    assert z.norm().item() == pytest.approx(0.70016, abs=1e-3)


def _copy_fixture(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURE, folder)
    return folder, json.loads((folder / SPEC_NAME).read_text())


def _write(folder: Path, data: dict) -> None:
    (folder / SPEC_NAME).write_text(json.dumps(data))


def test_a_spec_from_a_newer_or_broken_version_is_refused_naming_the_field(tmp_path):
    folder, data = _copy_fixture(tmp_path)
    _write(folder, {**data, "architecture": {**data["architecture"], "mystery_width": 3}})
    with pytest.raises(CheckpointError, match=r"architecture field\(s\) \['mystery_width'\]"):
        load_dae(folder)
    _write(folder, {k: v for k, v in data.items() if k != "in_channels"})
    with pytest.raises(CheckpointError, match="missing field 'in_channels'"):
        load_dae(folder)
    _write(folder, {**data, "diffusion": {k: v for k, v in data["diffusion"].items() if k != "beta_end"}})
    with pytest.raises(CheckpointError, match=r"diffusion lacks \['beta_end'\]"):
        load_dae(folder)
    _write(folder, {**data, "format_version": 99})
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_dae(folder)


def test_an_unknown_inference_setting_is_ignored_with_a_warning_and_the_model_loads(tmp_path):
    folder, data = _copy_fixture(tmp_path)
    _write(folder, {**data, "diffusion": {**data["diffusion"], "future_solver": "x"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, spec = load_dae(folder)
    assert any("future_solver" in str(w.message) for w in caught)
    assert spec.diffusion.invert_steps == 10


def test_weights_that_are_not_the_ones_the_spec_describes_are_refused(tmp_path):
    folder, _ = _copy_fixture(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    raw = bytearray((folder / "ema.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the last tensor
    (folder / "ema.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum differs"):
        load_dae(folder)
    assert read_model_spec(other).weights_sha256  # the intact copy still names its weights


# --- run folders ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spec") / "shards"
    return write_phantom_shards(out, size=32, n_train=32, n_val=8, n_test=8, seed=0, samples_per_shard=16)


def _args(shards: Path, out: Path, **extra: str) -> list[str]:
    settings = {"data.source": "shards", "data.shard_dir": str(shards), "train.out_dir": str(out),
                "train.total_samples": "8", "train.batch_size": "8", "train.checkpoint_every": "8",
                "train.preview_every": "100000", "train.preview_images": "2", "train.probe_images": "0",
                "diffusion.invert_steps": "2", "diffusion.decode_steps": "2", "track.enabled": "false", **extra}
    return [f"--{k}={v}" for k, v in settings.items()]


def _snapshot(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_exported_model_and_checkpoints_load_from_their_spec_alone(shards, tmp_path):
    result = train_main(_args(shards, tmp_path / "run"))
    final = Path(result["model_dir"])
    (final / "config.yaml").unlink()  # the spec is enough
    ae = DiffusionAutoencoder.load(final, device="cpu")
    assert (ae.invert_steps, ae.decode_steps) == (2, 2)
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    spec = read_model_spec(checkpoint)
    assert dataclasses.replace(spec, weights_sha256="") == ModelSpec.from_config(
        load_config(None, _args(shards, tmp_path / "run")))
    assert not list((tmp_path / "run").glob(".tmp-*"))  # the final folder was written beside and renamed


def test_resuming_a_run_with_another_model_stops_naming_the_fields_and_writes_nothing(shards, tmp_path, capsys):
    out = tmp_path / "run"
    train_main(_args(shards, out))
    before = _snapshot(out)
    capsys.readouterr()  # the first run's progress bar
    status = run_main(train_main, _args(shards, out, **{"model.z_dim": "64", "diffusion.prediction": "v",
                                                        "train.total_samples": "16"}) + ["--resume"])
    message = capsys.readouterr().err.strip()
    assert status == 2 and len(message.splitlines()) == 1, message
    assert "model.z_dim: None -> 64" in message and "diffusion.prediction: 'eps' -> 'v'" in message
    assert "--overwrite" in message and "train.out_dir" in message
    assert _snapshot(out) == before
    # Without --resume a folder holding a run is not trained over either.
    with pytest.raises(StaleArtifactError, match="already holds a training run: pass --resume"):
        train_main(_args(shards, out))
    assert _snapshot(out) == before
    # A longer budget with the same settings is an extension, not a new run.
    result = train_main(_args(shards, out, **{"train.total_samples": "16"}) + ["--resume"])
    assert result["samples_seen"] == 16
    # --overwrite starts the folder over with the new settings.
    result = train_main(_args(shards, out, **{"model.z_dim": "64"}) + ["--overwrite"])
    assert result["samples_seen"] == 8 and load_dae(result["model_dir"])[1].architecture.z_dim == 64


def test_the_run_fingerprint_ignores_budget_and_logging_but_not_the_objective():
    base = load_config(None, [])
    longer = load_config(None, ["--train.total_samples=99999", "--train.log_every=7", "--diffusion.decode_steps=5"])
    assert differences(run_fingerprint(base, "m"), run_fingerprint(longer, "m")) == []
    other = load_config(None, ["--diffusion.loss_weighting=min_snr", "--train.lr=0.001"])
    assert differences(run_fingerprint(base, "m"), run_fingerprint(other, "n")) == [
        "data.manifest_sha256: 'm' -> 'n'", "diffusion.loss_weighting: 'none' -> 'min_snr'",
        "train.lr: 0.0002 -> 0.001"]


# --- shards ---------------------------------------------------------------------------------------------------------

def test_a_job_whose_channels_or_size_contradict_the_shards_stops_before_training(shards, tmp_path, capsys):
    out = tmp_path / "run"
    status = run_main(train_main, _args(shards, out, **{"data.channels": "3"}))
    message = capsys.readouterr().err.strip()
    assert status == 2 and message.startswith("error: data.channels is 3 but") and "1-channel" in message
    status = run_main(train_main, _args(shards, out, **{"data.image_size": "16"}))
    message = capsys.readouterr().err.strip()
    assert status == 2 and "data.image_size is 16" in message and "32x32" in message
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    assert check_shards_match(load_config(None, _args(shards, out)).data)["channels"] == 1


def test_phantom_shards_made_with_other_settings_are_not_reused(tmp_path):
    config = load_config(None, [f"--data.shard_dir={tmp_path / 'ph'}", "--data.phantom_counts=[16, 4, 4]",
                                "--data.samples_per_shard=8"])
    ensure_shards(config.data, progress=False)
    manifest = (tmp_path / "ph" / "manifest.json").read_bytes()
    changed = load_config(None, [f"--data.shard_dir={tmp_path / 'ph'}", "--data.phantom_counts=[16, 4, 4]",
                                 "--data.seed=3"])
    with pytest.raises(ShardError, match=r"holds other shards \(seed: 0 -> 3\).*another data.shard_dir"):
        ensure_shards(changed.data, progress=False)
    assert (tmp_path / "ph" / "manifest.json").read_bytes() == manifest
    assert ensure_shards(config.data, progress=False) == tmp_path / "ph"  # its own settings: reused as is


def test_a_latents_file_of_another_type_ends_with_one_line_and_writes_nothing(tmp_path, capsys):
    from harness.ops.fit_heads_job import main as fit_heads_main

    fake = tmp_path / "latents.npz"
    fake.write_text("not an archive\n")
    status = run_main(fit_heads_main, ["--latents", str(fake), "--out", str(tmp_path / "heads")])
    message = capsys.readouterr().err.strip()
    assert status == 2 and message.splitlines() == [message]
    assert "is a text file starting b'not an a', not a .npz file" in message
    assert not (tmp_path / "heads").exists()


def test_stale_phantom_shards_end_training_with_one_line_and_write_nothing(tmp_path, capsys):
    shard_dir = tmp_path / "ph"
    base = [f"--data.shard_dir={shard_dir}", "--data.phantom_counts=[16, 4, 4]", "--data.samples_per_shard=8",
            f"--train.out_dir={tmp_path / 'run'}", "--track.enabled=false"]
    ensure_shards(load_config(None, base).data, progress=False)
    manifest = (shard_dir / "manifest.json").read_bytes()
    status = run_main(train_main, [*base, "--data.seed=5"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and message.startswith("error: ") and "seed: 0 -> 5" in message
    assert (shard_dir / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_rendering_and_its_threshold_travel_with_the_model_and_old_specs_default_them():
    config = load_config(None, ["--counterfactual.render=local", "--counterfactual.local_threshold=0.45"])
    spec = ModelSpec.from_config(config)
    back = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "dae_spec.json")
    assert (back.render, back.local_threshold) == ("local", 0.45)
    assert back.run_config().counterfactual.local_threshold == 0.45  # what the served explainer renders with
    old = {k: v for k, v in spec.to_dict().items() if k not in ("render", "local_threshold")}
    assert (ModelSpec.from_dict(old, "old").render, ModelSpec.from_dict(old, "old").local_threshold) == ("decode", 0.2)
