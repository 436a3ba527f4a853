"""Checkpoint folders: atomic writes, discovery of the latest complete one, safe loading.

Layout of a run folder::

    <out_dir>/checkpoints/samples_000000123456/   one complete training state (Accelerate's save_state:
        model.safetensors, optimizer.bin, random_states_<rank>.pkl) + ema.safetensors + trainer_state.json
        + config.yaml
    <out_dir>/final/                               the exported model: ema.safetensors + config.yaml + model.json

A checkpoint is first written under a ``.tmp-`` name and renamed when complete, so a crash (even SIGKILL)
leaves either the previous complete checkpoint or the new one, never a half-written folder with a valid name.
Everything is loaded with safetensors or ``torch.load(weights_only=True)``: nothing a user hands us is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "samples_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or unreadable; the message names the path."""


def checkpoint_name(samples_seen: int) -> str:
    return f"{PREFIX}{samples_seen:012d}"


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_root)
    return found[-1] if found else None


def temporary_path(final_path: Path) -> Path:
    return final_path.parent / f"{TMP_PREFIX}{final_path.name}"


def discard(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of sight first (atomic), so that a crash part-way through the
    deletion never leaves a half-deleted folder under a visible ``samples_`` name."""
    hidden = folder.parent / f"{TMP_PREFIX}deleting-{folder.name}"
    shutil.rmtree(hidden, ignore_errors=True)  # left over from an earlier crash
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def publish(tmp_path: Path, final_path: Path) -> None:
    """Make a fully written folder visible under its final name (atomic rename on one filesystem)."""
    if final_path.exists():  # the same sample count saved twice (e.g. resume then immediate stop)
        discard(final_path)
    os.replace(tmp_path, final_path)


def prune(checkpoint_root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftovers of interrupted saves."""
    root = Path(checkpoint_root)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        discard(old)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Kept for callers of this module; the one implementation is :func:`harness.fileio.atomic_write_text`."""
    from harness.fileio import atomic_write_text as write

    write(path, text)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> None:
    """safetensors, written to a temp file and renamed."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors, or from a .pt/.pth file with ``weights_only=True`` (pickles refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for truncated or foreign files
        raise CheckpointError(f"cannot read weights from {path}: {err}") from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return loaded


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def random_state_file(checkpoint: str | Path, rank: int, saved_world_size: int | None = None) -> Path | None:
    """The RNG-state file rank ``rank`` restores from ``checkpoint``, or None where that rank did not exist.

    A run may resume on more processes than wrote the checkpoint (trained on one GPU, continued on eight): ranks
    at or beyond the writer's process count have no saved state and start from a fresh seed. ``saved_world_size``
    comes from ``trainer_state.json``; checkpoints from before it was recorded are read by counting their
    ``random_states_<rank>.pkl`` files. A file missing for a rank the writer had is a damaged checkpoint.
    """
    checkpoint = Path(checkpoint)
    if saved_world_size is None:  # at least rank 0 wrote one: a checkpoint with none is damaged, not "new ranks"
        saved_world_size = max(1, len(list(checkpoint.glob("random_states_*.pkl"))))
    if rank >= saved_world_size:
        return None
    path = checkpoint / f"random_states_{rank}.pkl"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by {saved_world_size} process(es), "
                              "so every rank below that must have its random state; resume from an intact "
                              "checkpoint (delete this one to fall back to the previous)")
    return path

