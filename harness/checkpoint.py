"""Checkpoint folders: atomic writes, discovery of the latest complete one, safe loading.

Layout of a run folder::

    <out_dir>/checkpoints/samples_000000123456/   one complete training state (Accelerate's save_state:
        model.safetensors, optimizer.bin, random_states_<rank>.pkl) + ema.safetensors + trainer_state.json
        + config.yaml + dae_spec.json + checksums.json (size and SHA-256 of every other file, written last)
    <out_dir>/final/                               the exported model: ema.safetensors + config.yaml + model.json

A checkpoint is first written under a ``.tmp-`` name and renamed when complete, so a crash (even SIGKILL)
leaves either the previous complete checkpoint or the new one, never a half-written folder with a valid name.
Everything is loaded with safetensors or ``torch.load(weights_only=True)``: nothing a user hands us is unpickled.

A checkpoint can still be damaged after it was published (a disk error, a copy cut short, a file overwritten by
hand). Before resuming, :func:`resume_checkpoint` verifies every file against ``checksums.json`` (older folders
without one: each file's format is checked whole, without unpickling) and names the damaged file and the
previous complete checkpoint; ``--resume=previous`` continues from the newest checkpoint that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from harness import fileio
from harness.errors import UserError
from harness.fileio import sha256_file, write_json_atomic

PREFIX = "samples_"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside by --resume=previous: kept for a look, never listed
CHECKSUMS = "checksums.json"
# What a resume reads; an older folder without checksums must at least hold these.
RESUME_FILES = ("model.safetensors", "optimizer.bin", "ema.safetensors", "trainer_state.json", "random_states_0.pkl")


class CheckpointError(UserError, RuntimeError):
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
    fileio.atomic_write_text(path, text)


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



def write_checksums(folder: str | Path) -> Path:
    """Record the size and SHA-256 of every file in ``folder`` (a checkpoint about to be published)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS
                   and not p.name.startswith(TMP_PREFIX))
    record = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    return write_json_atomic(folder / CHECKSUMS, {"files": record})


def _safetensors_problem(path: Path) -> str | None:
    # Header: 8-byte little-endian length, then JSON with each tensor's [start, end) in the data that follows.
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors file"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"cut short or not safetensors (header of {header_len:,} bytes in a {size:,}-byte file)"
        try:
            header = json.loads(handle.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "not a safetensors file (unreadable header)"
    if size != 8 + header_len + end:
        return f"{size:,} bytes where its header promises {8 + header_len + end:,} (cut short or overwritten)"
    return None


def _file_problem(path: Path) -> str | None:
    """What is wrong with one file of a checkpoint without checksums, judged by its format alone."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".bin", ".pkl"):  # torch.save's zip container: every member's CRC is checked, nothing unpickled
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            return f"not a complete torch.save archive ({err})"
        return f"member {bad} fails its CRC check" if bad else None
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            return f"not valid JSON ({err})"
    return None


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when every file of ``folder`` is whole; otherwise ``"<file>: <what is wrong>"`` for the first damaged
    file. Checked against ``checksums.json`` (size, then SHA-256); an older folder without one by format."""
    folder = Path(folder)
    record_path = folder / CHECKSUMS
    if record_path.is_file():
        try:
            files = json.loads(record_path.read_text())["files"]
            expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            return f"{CHECKSUMS}: unreadable ({type(err).__name__}), so no file can be verified"
        for name, (size, digest) in sorted(expected.items()):
            path = folder / name
            if not path.is_file():
                return f"{name}: missing"
            if path.stat().st_size != size:
                return f"{name}: {path.stat().st_size:,} bytes, {size:,} when saved (cut short or overwritten)"
            if sha256_file(path) != digest:
                return f"{name}: its SHA-256 differs from the one recorded when saved (overwritten or corrupted)"
        return None
    for name in RESUME_FILES:
        if not (folder / name).is_file():
            return f"{name}: missing"
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        problem = _file_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def _samples(folder: Path) -> str:
    return f"{int(folder.name[len(PREFIX):]):,} samples"


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the list (kept for inspection, never pruned or resumed from)."""
    target = folder.parent / f"{DAMAGED_PREFIX}{folder.name}"
    if target.exists():
        shutil.rmtree(target)
    os.replace(folder, target)
    return target


def resume_checkpoint(checkpoint_root: str | Path, which: Literal["latest", "previous"] = "latest"
                      ) -> tuple[Path | None, list[Path]]:
    """The checkpoint a resume loads, after verifying it, and the newer damaged ones it skips.

    ``"latest"``: the newest checkpoint, which must verify; when it does not, a :class:`CheckpointError` names
    the damaged file and the previous complete checkpoint, and how to continue from it. ``"previous"``: the
    newest checkpoint that verifies (the damaged newer ones are returned, for :func:`set_aside`). ``(None, [])``
    when there is no checkpoint at all. Read-only: every process of a launch may call it.
    """
    found = list_checkpoints(checkpoint_root)
    damaged: list[Path] = []
    problems: list[str] = []
    for folder in reversed(found):
        problem = verify_checkpoint(folder)
        if problem is None:
            if damaged and which == "latest":
                raise CheckpointError(
                    f"error: the latest checkpoint {damaged[0]} is damaged ({problems[0]}); the previous complete "
                    f"checkpoint is {folder} ({_samples(folder)}): rerun with --resume=previous to continue from it "
                    f"(the damaged one is set aside as {DAMAGED_PREFIX}{damaged[0].name}), or with --overwrite "
                    "to start over")
            return folder, damaged
        damaged.append(folder)
        problems.append(problem)
    if not damaged:
        return None, []
    raise CheckpointError(
        f"error: no checkpoint in {checkpoint_root} is complete (the latest, {damaged[0].name}: {problems[0]}"
        f"{f'; and {len(damaged) - 1} older' if len(damaged) > 1 else ''}): rerun with --overwrite to start over")
