"""A crash at each step of writing a checkpoint: the visible checkpoints stay loadable, resuming loses nothing.

One run is crashed five times in a row, each time during the save at 24 samples and at a different step of it:
half-way through the model weights, the optimizer state, the EMA weights, just before the folder is renamed into
place, and half-way through pruning the oldest checkpoint after the new one was published. A crash is an
exception nothing catches (as after SIGKILL, no cleanup code runs) and the partly written file is left behind.
After each crash every visible checkpoint must load and the newest must be the last one published; each resume
continues from it, and the run must end with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import TOTAL, assert_checkpoint_loadable, assert_same_weights, run_args

from harness import checkpoint as ckpt
from harness.train_dae import main as train_main

CRASH_AT = ckpt.checkpoint_name(24)
OLDEST = ckpt.checkpoint_name(8)  # what the save at 24 prunes
POINTS = ("model_weights", "optimizer_state", "ema_weights", "before_rename", "while_pruning")


class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` on the way up handles it."""


def _die_half_written(path: object) -> None:
    with open(path, "wb") as handle:  # what a killed writer leaves: a file cut short
        handle.write(b"\x93NUMPY" * 300)
    raise Killed(f"killed while writing {path}")


def _crash_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the next save at 24 samples die at ``point``."""
    import accelerate.utils.other as accelerate_io

    def wrap(owner: object, name: str, dies: callable) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            dies(*args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)

    def writing(suffix: str):
        def dies(_obj, target, *rest):
            if CRASH_AT in str(target) and str(target).endswith(suffix):
                _die_half_written(target)
        return dies

    if point == "model_weights":
        wrap(accelerate_io, "safe_save_file", writing("model.safetensors"))
    elif point == "optimizer_state":
        wrap(torch, "save", writing("optimizer.bin"))
    elif point == "ema_weights":
        wrap(ckpt, "save_file", writing("ema.safetensors"))
    elif point == "before_rename":
        def dies(src, *rest):
            if Path(src).name == ckpt.TMP_PREFIX + CRASH_AT:
                raise Killed(f"killed before renaming {src}")
        wrap(os, "replace", dies)
    elif point == "while_pruning":
        def dies(path, *rest):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if OLDEST in str(path) and files:
                files[0].unlink()  # one file is gone, then the process dies
                raise Killed(f"killed while deleting {path}")
        wrap(shutil, "rmtree", dies)


def test_a_crash_at_every_step_of_a_save_loses_nothing(shards, reference_ema, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = run_args(shards, out)
    for attempt, point in enumerate(POINTS):
        with monkeypatch.context() as patch:
            _crash_at(patch, point)
            with pytest.raises(Killed):
                train_main(args + (["--resume"] if attempt else []))
        visible = [assert_checkpoint_loadable(folder) for folder in ckpt.list_checkpoints(out / "checkpoints")]
        published = point == "while_pruning"  # the new checkpoint was complete before pruning began
        assert visible == ([16, 24] if published else [8, 16]), f"after a crash at {point}: {visible}"

    result = train_main(args + ["--resume"])
    assert result["samples_seen"] == TOTAL
    assert [assert_checkpoint_loadable(f) for f in ckpt.list_checkpoints(out / "checkpoints")] == [24, 32]
    assert_same_weights(ckpt.load_state_dict(Path(result["model_dir"]) / "ema.safetensors"), reference_ema)
