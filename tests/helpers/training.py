"""Helpers of the training tests (also used by tests/reliability): the trainer's tiny arguments, a subprocess run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_args(shards: Path, out_dir: Path, total: int = 96, **extra: str) -> list[str]:
    """Trainer arguments for a tiny-32 run of ``total`` samples on ``shards``; ``extra`` overrides any key."""
    args = {
        "data.source": "shards", "data.shard_dir": str(shards), "train.out_dir": str(out_dir),
        "train.total_samples": str(total), "train.batch_size": "16", "train.log_every": "32",
        "train.checkpoint_every": "32", "train.preview_every": "100000", "train.preview_images": "4",
        "train.keep_checkpoints": "10", "diffusion.invert_steps": "3", "diffusion.decode_steps": "3",
        "eval.batch_size": "4", "track.enabled": "false", **extra,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def run_training(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """``harness/train_dae.py args`` in a subprocess (one thread, unbuffered), stdout and stderr merged."""
    command = (launcher or [sys.executable]) + [str(REPO / "harness" / "train_dae.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
