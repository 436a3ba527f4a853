"""Fixtures of the reliability tests: tiny phantom shards and the weights of an uninterrupted training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_support import run_args, run_training

from harness import checkpoint as ckpt
from harness.data import write_phantom_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability-phantoms")
    return write_phantom_shards(out, size=32, n_train=96, n_val=8, n_test=8, seed=0, samples_per_shard=32)


@pytest.fixture(autouse=True)
def single_thread():
    """Train in-process on one thread, like the subprocess runs (OMP_NUM_THREADS=1): the same arithmetic order,
    so weights can be compared exactly across both kinds of run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_ema(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """EMA weights of an uninterrupted run: what every interrupted-and-resumed run must end with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_training(run_args(shards, out))
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, output
    proc.stdout.close()
    return ckpt.load_state_dict(out / "final" / "ema.safetensors")
