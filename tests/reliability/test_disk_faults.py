"""A full disk or an unwritable run folder while checkpointing: a clear error, the previous checkpoint intact.

Full disk: the writers of the save at 24 samples fail with ENOSPC after writing part of their file (the model
weights through Accelerate, the optimizer state, the EMA weights: one after the other, resuming in between).
Unwritable folder: ``checkpoints/`` loses write permission between two runs (``chmod``; as root, which ignores
permission bits, the immutable attribute). Each time the trainer must stop with a ``CheckpointError`` that names
the checkpoint, the cause and the intact previous checkpoint, leave no partial save behind, keep every published
checkpoint loadable, and, once the disk has room again, resume to the weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from reliability_support import TOTAL, assert_checkpoint_loadable, assert_same_weights, run_args

from harness import checkpoint as ckpt
from harness.train_dae import main as train_main

FAILING = ckpt.checkpoint_name(24)


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, suffix: str) -> None:
    """``owner.name`` writes half of a file, then fails as a full disk does (OSError ENOSPC, no file name)."""
    real = getattr(owner, name)

    def write(obj, target, *args, **kwargs):
        if FAILING in str(target) and str(target).endswith(suffix):
            Path(target).write_bytes(b"\x00" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, target, *args, **kwargs)

    monkeypatch.setattr(owner, name, write)


def _assert_clear_failure(error: ckpt.CheckpointError, root: Path, cause: str) -> None:
    message = str(error)
    assert str(root / FAILING) in message and cause in message, message
    assert "intact" in message and str(root / ckpt.checkpoint_name(16)) in message and "--resume" in message
    assert not (root / (ckpt.TMP_PREFIX + FAILING)).exists(), "the failed save was not cleaned up"
    assert [assert_checkpoint_loadable(f) for f in ckpt.list_checkpoints(root)] == [8, 16]


def test_full_disk_while_checkpointing(shards, reference_ema, tmp_path, monkeypatch):
    import accelerate.utils.other as accelerate_io

    out = tmp_path / "run"
    args = run_args(shards, out)
    writers = [(accelerate_io, "safe_save_file", "model.safetensors"), (torch, "save", "optimizer.bin"),
               (ckpt, "save_file", "ema.safetensors")]
    for attempt, (owner, name, suffix) in enumerate(writers):
        with monkeypatch.context() as patch:
            _disk_full_for(patch, owner, name, suffix)
            with pytest.raises(ckpt.CheckpointError) as caught:
                train_main(args + (["--resume"] if attempt else []))
        _assert_clear_failure(caught.value, out / "checkpoints", os.strerror(errno.ENOSPC))

    result = train_main(args + ["--resume"])  # space freed
    assert_same_weights(ckpt.load_state_dict(Path(result["model_dir"]) / "ema.safetensors"), reference_ema)


@contextmanager
def _unwritable(folder: Path, monkeypatch: pytest.MonkeyPatch):
    """No new entries can be made in ``folder`` while inside."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            folder.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield "Operation not permitted"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    real = os.makedirs  # root on a file system without the immutable attribute: refuse at the only way in

    def refuse(name, *args, **kwargs):
        if Path(name).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return real(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "makedirs", refuse)
        yield "Permission denied"


def test_unwritable_checkpoint_folder(shards, reference_ema, tmp_path, monkeypatch):
    out = tmp_path / "run"
    root = out / "checkpoints"
    train_main(run_args(shards, out, total=16))
    with _unwritable(root, monkeypatch) as cause:
        with pytest.raises(ckpt.CheckpointError) as caught:
            train_main(run_args(shards, out) + ["--resume"])
        _assert_clear_failure(caught.value, root, cause)
    result = train_main(run_args(shards, out) + ["--resume"])  # permission restored
    assert result["samples_seen"] == TOTAL
    assert_same_weights(ckpt.load_state_dict(Path(result["model_dir"]) / "ema.safetensors"), reference_ema)
