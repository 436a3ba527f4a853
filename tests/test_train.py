"""End-to-end training: one process in-process, SIGKILL + resume, two CPU processes (disjoint data, one gradient)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import run_training, tiny_args

from harness import checkpoint as ckpt
from harness.data import write_phantom_shards
from harness.train_dae import main as train_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=128, n_val=16, n_test=16, seed=0, samples_per_shard=32)
    return out


def test_train_exports_checkpoints_previews_and_registers(shards, tmp_path):
    result = train_main(tiny_args(shards, tmp_path / "run", total=64, **{"track.enabled": "true",
                                                                        "track.registered_model": "tiny-test"}))
    final = Path(result["model_dir"])
    assert (final / "ema.safetensors").is_file() and (final / "config.yaml").is_file()
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == ckpt.checkpoint_name(64)
    assert list((tmp_path / "run" / "previews").glob("*.png"))
    assert result["final_loss"] == result["final_loss"] and result["final_loss"] < 2.0
    # What decides the last bits of the weights on a CPU is recorded with the model (runs on machines with another
    # instruction set or thread count differ in the last bits, and training amplifies that).
    arithmetic = json.loads((final / "model.json").read_text())["arithmetic"]
    assert arithmetic["torch_threads"] == torch.get_num_threads() and arithmetic["torch"] == torch.__version__
    assert arithmetic["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["mlflow_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["train.batch_size"] == "16"
    assert "train/loss" in run.data.metrics and "val/recon_mse" in run.data.metrics
    versions = client.search_model_versions("name='tiny-test'")
    assert [str(v.version) for v in versions] == [str(result["registered_version"])]


def test_sigkill_then_resume_equals_uninterrupted_run(shards, tmp_path):
    reference = run_training(tiny_args(shards, tmp_path / "reference"))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    # Kill at a random moment after the first checkpoint exists, then resume (possibly several times).
    rng = random.Random(0)
    interrupted = tmp_path / "interrupted"
    kills = 0
    for _ in range(2):
        proc = run_training(tiny_args(shards, interrupted) + ["--resume"])
        deadline = time.time() + 240
        while ckpt.latest_checkpoint(interrupted / "checkpoints") is None and time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        for folder in ckpt.list_checkpoints(interrupted / "checkpoints"):  # never a corrupt visible checkpoint
            ckpt.load_state_dict(folder / "ema.safetensors")
            ckpt.load_state_dict(folder / "model.safetensors")
            ckpt.read_json(folder / "trainer_state.json")
    assert kills >= 1
    resumed = run_training(tiny_args(shards, interrupted) + ["--resume"])
    output = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, output

    expected = ckpt.load_state_dict(tmp_path / "reference" / "final" / "ema.safetensors")
    actual = ckpt.load_state_dict(interrupted / "final" / "ema.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_two_cpu_processes_see_disjoint_data_and_resume_a_one_process_run(shards, tmp_path):
    # Half the budget on one process, the rest on two (trained on one GPU, continued on eight): rank 1 has no saved
    # random state and must start from a fresh seed instead of failing; the two ranks then read disjoint samples.
    run_dir = tmp_path / "ddp"
    first = run_training(tiny_args(shards, run_dir, total=32))
    output = first.stdout.read()
    assert first.wait(timeout=400) == 0, output
    port = str(29500 + random.Random(os.getpid()).randrange(1000))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", port]
    proc = run_training(tiny_args(shards, run_dir, total=64, **{"train.record_keys": "true"}) + ["--resume"],
                        launcher)
    output = proc.stdout.read()
    assert proc.wait(timeout=400) == 0, output
    assert "resumed from" in output and "rank 1: " in output and "starts from a fresh seed" in output
    assert "rank 0: " not in output  # rank 0's state was saved and is restored
    keys = [set((run_dir / f"keys_rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1]
    assert not keys[0] & keys[1], "ranks trained on the same samples"
    assert (run_dir / "final" / "ema.safetensors").is_file()
    assert "2 process(es) x batch 8" in output
    state = json.loads((ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 64


def test_two_processes_hold_the_gradient_of_the_whole_batch(tmp_path):
    # Two ranks that each backpropagate half of a batch must end the backward pass with the one-process gradient
    # of the whole batch: a sum instead of a mean (x2), a loss scaled by the world size or an unsynchronised
    # encoder would each train a multi-GPU run differently from a one-GPU run of the same batch size.
    from helpers.serving import free_port
    from safetensors.torch import load_file

    helper = REPO / "tests" / "helpers" / "ddp_gradient.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    runs = {1: [sys.executable, str(helper)],
            2: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", port, str(helper)]}
    grads = {}
    for world, command in runs.items():
        out = tmp_path / f"grad_{world}.safetensors"
        proc = subprocess.run([*command, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        grads[world] = load_file(out)
        assert int(grads[world].pop("world_size")) == world
    one, two = (torch.cat([g[name].flatten() for name in sorted(g)]) for g in (grads[1], grads[2]))
    assert one.abs().max() > 0 and bool(torch.all(torch.isfinite(two)))
    assert float((two - one).norm() / one.norm()) < 1e-4  # float summation order only (measured: ~1e-6)
    scale = float(one.abs().max())
    for name in grads[1]:
        torch.testing.assert_close(grads[2][name], grads[1][name], rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_random_state_file_tells_a_new_rank_from_a_damaged_checkpoint(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"random_states_{rank}.pkl").write_bytes(b"state")
    assert ckpt.random_state_file(tmp_path, 1) == tmp_path / "random_states_1.pkl"
    assert ckpt.random_state_file(tmp_path, 2) is None  # written by two processes: rank 2 is new
    assert ckpt.random_state_file(tmp_path, 1, saved_world_size=1) is None  # the recorded count wins
    (tmp_path / "random_states_1.pkl").unlink()
    with pytest.raises(ckpt.CheckpointError, match="random_states_1.pkl is missing: the checkpoint was written by 2"):
        ckpt.random_state_file(tmp_path, 1, saved_world_size=2)


def test_one_step_with_v_prediction_min_snr_jitter_clipping_and_partial_depth(shards, tmp_path):
    # Every new objective / decoding knob at once, one optimizer step: the wiring runs end to end.
    options = {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr", "diffusion.snr_gamma": "5",
               "diffusion.clip_x0": "true", "diffusion.invert_to": "600", "train.encoder_jitter": "0.2"}
    result = train_main(tiny_args(shards, tmp_path / "run", total=16, **options))
    assert result["final_loss"] == result["final_loss"] and result["final_loss"] < 10.0
    assert result["recon_mse"] == result["recon_mse"]
    from harness.config import load_config

    saved = load_config(Path(result["model_dir"]) / "config.yaml")
    assert (saved.diffusion.prediction, saved.diffusion.invert_to, saved.train.encoder_jitter) == ("v", 600, 0.2)
