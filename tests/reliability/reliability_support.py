"""Helpers of the reliability tests: the trainer's test arguments and checks that checkpoints are whole."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.training import run_training, tiny_args  # noqa: F401  (re-exported for the tests here)

from harness import checkpoint as ckpt
from harness.config import load_config

# Every in-process run here: 32 samples in batches of 8, a checkpoint after every step, two kept (so each save
# also prunes one): saves at 8, 16, 24 and 32 samples.
TOTAL = 32
CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors",
                    "trainer_state.json", "config.yaml", "checksums.json")


def run_args(shards: Path, out_dir: Path, total: int = TOTAL) -> list[str]:
    """Trainer arguments: tiny_args with batch 8, a checkpoint every step and pruning to two."""
    return tiny_args(shards, out_dir, total=total, **{"train.batch_size": "8", "train.checkpoint_every": "8",
                                                      "train.keep_checkpoints": "2", "train.log_every": "32"})


def assert_checkpoint_loadable(folder: Path) -> int:
    """Every file of a visible checkpoint is complete and loads; returns its sample count."""
    from accelerate.utils.other import load as accelerate_load  # what Accelerator.load_state uses (weights only)

    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    assert not missing, f"visible checkpoint {folder} lacks {missing}"
    assert ckpt.verify_checkpoint(folder) is None, f"visible checkpoint {folder}: {ckpt.verify_checkpoint(folder)}"
    for weights in ("model.safetensors", "ema.safetensors"):
        assert ckpt.load_state_dict(folder / weights), f"{folder / weights} is empty"
    for pickled in ("optimizer.bin", "random_states_0.pkl"):
        accelerate_load(folder / pickled, map_location="cpu")
    load_config(folder / "config.yaml")
    state = ckpt.read_json(folder / "trainer_state.json")
    assert folder.name == ckpt.checkpoint_name(state["samples_seen"])
    return state["samples_seen"]


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
