"""What made an artifact, and whether a folder on disk was made by the settings now asked for.

A *fingerprint* is a plain JSON dict of the fields that change an artifact's content (and the checksums of its
inputs). Shard folders, run folders, latents tables and model folders store theirs; reusing one whose fingerprint
differs stops with :class:`StaleArtifactError`, naming every differing field and the ways out, instead of
silently continuing with an artifact made from other inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from harness.config import ConfigError, RunConfig, load_config, to_dict
from harness.errors import UserError
from harness.fileio import canonical_sha256

# Train-section fields that do not change what a training run computes: where it writes, how often it logs,
# and how long it runs (a longer total_samples extends a run with --resume, it does not change the run).
_RUN_NEUTRAL_TRAIN = {"out_dir", "total_samples", "checkpoint_every", "preview_every", "log_every",
                      "keep_checkpoints", "preview_images", "probe_images", "probe_counterfactuals", "record_keys",
                      "readiness",  # when to stop early within total_samples: like total_samples itself
                      "compile", "channels_last"}  # the last two change speed and memory layout, not the arithmetic
# Diffusion fields that only matter when encoding and decoding, never during training.
_RUN_NEUTRAL_DIFFUSION = {"invert_steps", "decode_steps", "clip_x0", "invert_to", "inversion", "fixed_point_iters",
                          "fixed_point_anderson"}
_RUN_NEUTRAL_DATA = {"num_workers", "on_error", "shard_dir", "raw_path"}


class StaleArtifactError(UserError, RuntimeError):
    """A folder holds an artifact made from other settings or inputs; the message names the fields."""


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples so they compare by value."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        tree = tuple(flat(v) if isinstance(v, dict) else v for v in tree)
    return {prefix[:-1]: tree}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every field whose value differs, as ``"key: old -> new"`` (``<absent>`` for a missing field)."""
    a, b = flat(old), flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def mismatch_message(artifact: str, where: str | Path, diffs: list[str], remedies: str, limit: int = 6) -> str:
    """One line: what is stale, where, which fields differ (the first ``limit``) and what to do."""
    shown = "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")
    return f"error: {where} holds {artifact} made with other settings ({shown}): {remedies}"


def run_fingerprint(config: RunConfig, data_manifest_hash: str | None = None) -> dict[str, Any]:
    """The settings that change what a training run computes (model, diffusion objective, data, optimiser).

    ``data_manifest_hash`` (the shard folder's manifest checksum) stands for the data itself.
    """
    tree = to_dict(config)
    fingerprint = {
        "model": tree["model"],
        "diffusion": {k: v for k, v in tree["diffusion"].items() if k not in _RUN_NEUTRAL_DIFFUSION},
        "data": {k: v for k, v in tree["data"].items() if k not in _RUN_NEUTRAL_DATA},
        "train": {k: v for k, v in tree["train"].items() if k not in _RUN_NEUTRAL_TRAIN},
    }
    if data_manifest_hash is not None:
        fingerprint["data"]["manifest_sha256"] = data_manifest_hash
    return fingerprint


def manifest_hash(shard_dir: str | Path) -> str | None:
    """Checksum of a shard folder's ``manifest.json`` (splits, counts, shard checksums), or None when absent.

    The ``created`` timestamp is left out, so re-writing identical shards gives the same hash.
    """
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    manifest.pop("created", None)
    return canonical_sha256(manifest)


RUN_RECORD = "run.json"  # {"fingerprint": ...} of the run a run folder holds
_RUN_CONTENT = ("checkpoints", "final")


def _stored_run_fingerprint(out_dir: Path) -> dict[str, Any] | None:
    """The fingerprint a run folder was made with: ``run.json``, else derived from an older folder's config.yaml."""
    record = out_dir / RUN_RECORD
    if record.is_file():
        return json.loads(record.read_text()).get("fingerprint")
    if (out_dir / "config.yaml").is_file():
        try:
            old = load_config(out_dir / "config.yaml")
        except ConfigError:
            return None
        return run_fingerprint(old, None)
    return None


def check_run_folder(out_dir: str | Path, fingerprint: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``out_dir``: ``"fresh"``, ``"resume"`` or ``"overwrite"``; refuse a stale reuse.

    Read-only (every process of a launch may call it). A folder that already holds checkpoints or a final model
    is continued only with ``resume`` and a matching fingerprint, replaced only with ``overwrite``.
    """
    out_dir = Path(out_dir)
    holds_run = any((out_dir / name).exists() and any((out_dir / name).iterdir()) for name in _RUN_CONTENT)
    if not holds_run:
        return "fresh"
    if overwrite:
        return "overwrite"
    if not resume:
        raise StaleArtifactError(
            f"error: {out_dir} already holds a training run: pass --resume to continue it, --overwrite to start "
            "it over (its checkpoints and final model are deleted), or choose another train.out_dir")
    stored = _stored_run_fingerprint(out_dir)
    if stored is None:
        raise StaleArtifactError(
            f"error: {out_dir} holds a run whose settings cannot be read (no {RUN_RECORD}, config.yaml from "
            "another version): pass --overwrite to start it over, or choose another train.out_dir")
    if "manifest_sha256" not in stored.get("data", {}):  # a folder from before data checksums were recorded
        fingerprint = {**fingerprint, "data": {k: v for k, v in fingerprint["data"].items() if k != "manifest_sha256"}}
    diffs = differences(stored, fingerprint)
    if diffs:
        raise StaleArtifactError(mismatch_message(
            "a training run", out_dir, diffs,
            "choose another train.out_dir for the new settings, or pass --overwrite to start this folder over "
            "(--resume continues a run only with the settings it was started with)"))
    return "resume"


def clear_run_folder(out_dir: str | Path) -> None:
    """Delete what a run folder's training wrote (checkpoints, final model, previews, run record); nothing else."""
    out_dir = Path(out_dir)
    for name in (*_RUN_CONTENT, "previews"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (RUN_RECORD, "config.yaml"):
        (out_dir / name).unlink(missing_ok=True)


def weights_sha256(module: Any) -> str:
    """SHA-256 over a network's state dict (names, dtypes, shapes, bytes): identifies the weights that made an
    artifact (e.g. a latents table) whether or not they came from a file."""
    import torch  # only here: the rest of this module stays importable without torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype, bf16 included
    return digest.hexdigest()
