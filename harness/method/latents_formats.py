"""Latents brought from elsewhere: tensor files and Hugging Face ``datasets`` folders -> :class:`LatentsTable`.

``harness.method.latents.load_latents`` dispatches here; nothing executes code from the file (no pickle).

``.safetensors``
    tensors ``z_sem`` (N, D), optional ``x_T`` (N, C, H, W), one ``label_<column>`` (N,) per label column and
    ``split`` (N,) as integer codes into the JSON list ``split_names`` of the file's metadata (default
    ``["train", "val", "test"]``: 0 = train, 1 = val, 2 = test). Optional ``id`` (N,) integer tensor, else the
    row number. Safetensors holds only tensors, hence the codes.
``.pt`` / ``.pth``
    a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: ``z_sem`` tensor, ``split``
    as a list of str (or integer codes with ``split_names``), optional ``id`` (list of str or tensor), labels as
    ``label_<column>`` entries or one ``labels`` dict {column: tensor or list}, optional ``x_T``.
A folder written by ``datasets`` (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``)
    a ``z_sem`` list column; every other column except ``id``/``split`` is a label. A ``DatasetDict``'s keys
    are the splits (``validation``/``valid`` read as ``val``); a single ``Dataset`` needs a ``split`` column.
    Needs ``pip install datasets`` (not a dependency of this project).

String labels are kept as strings here; ``harness.method.head_tasks.numeric_labels`` maps them to integers and says how.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from harness.method.latents_table import LatentsError, LatentsTable, from_arrow

DEFAULT_SPLIT_NAMES = ("train", "val", "test")
HF_SPLIT_ALIASES = {"validation": "val", "valid": "val", "validate": "val"}


def _numpy(value: Any) -> np.ndarray:
    """A tensor, list or array -> numpy (strings stay strings)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _decode_splits(path: Path, codes: np.ndarray, names: list[str]) -> np.ndarray:
    if codes.dtype.kind in "US":
        return codes.astype(str)
    if codes.dtype.kind not in "iu":
        raise LatentsError(f"{path}: 'split' must be integer codes or strings, found dtype {codes.dtype}")
    bad = (codes < 0) | (codes >= len(names))
    if bad.any():
        raise LatentsError(f"{path}: column 'split' has {int(bad.sum())} codes outside 0..{len(names) - 1} "
                           f"(split_names {names})")
    return np.asarray(names, dtype=str)[codes]


def _table_from_arrays(path: Path, arrays: dict[str, Any], split_names: list[str],
                       meta: dict[str, Any]) -> LatentsTable:
    if "z_sem" not in arrays:
        raise LatentsError(f"{path}: latents file lacks tensor 'z_sem' (entries: {sorted(arrays)})")
    if "split" not in arrays:
        raise LatentsError(f"{path}: latents file lacks 'split' (entries: {sorted(arrays)})")
    z_sem = _numpy(arrays["z_sem"])
    if z_sem.ndim != 2:
        raise LatentsError(f"{path}: z_sem must have shape (N, D), found {tuple(z_sem.shape)}")
    n = z_sem.shape[0]
    labels: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.startswith("label_"):
            labels[name[len("label_"):]] = _numpy(value)
    for column, value in (arrays.get("labels") or {}).items():
        labels[str(column)] = _numpy(value)
    columns = {"split": _numpy(arrays["split"]), **{f"label_{c}": v for c, v in labels.items()}}
    if "id" in arrays:
        columns["id"] = _numpy(arrays["id"])
    for name, values in columns.items():
        if values.shape != (n,):
            raise LatentsError(f"{path}: {name!r} has shape {tuple(values.shape)}, expected ({n},) to match z_sem")
    ids = columns["id"].astype(str) if "id" in columns else np.arange(n).astype(str)
    x_T = _numpy(arrays["x_T"]) if "x_T" in arrays else None
    if x_T is not None and (x_T.ndim != 4 or x_T.shape[0] != n):
        raise LatentsError(f"{path}: x_T must have shape (N={n}, C, H, W), found {tuple(x_T.shape)}")
    return LatentsTable(ids=ids, splits=_decode_splits(path, columns["split"], split_names), z_sem=z_sem,
                        labels=labels, x_T=x_T, meta=meta)


def load_tensor_file(path: Path) -> LatentsTable:
    """A ``.safetensors`` file or a ``.pt``/``.pth`` dict of tensors (see the module docstring)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
            arrays: dict[str, Any] = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for a corrupt header
            raise LatentsError(f"{path}: not a readable safetensors file ({error})") from None
        split_names = json.loads(metadata.get("split_names", "null")) or list(DEFAULT_SPLIT_NAMES)
        meta = json.loads(metadata.get("meta", "{}"))
        return _table_from_arrays(path, arrays, split_names, meta)
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # refuses anything but plain data
    except pickle.UnpicklingError as error:
        raise LatentsError(f"{path}: refused by torch.load(weights_only=True): save a dict of tensors, lists of "
                           f"str and numbers only ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise LatentsError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    split_names = list(loaded.get("split_names") or DEFAULT_SPLIT_NAMES)
    meta = loaded.get("meta") if isinstance(loaded.get("meta"), dict) else {}
    arrays = {k: v for k, v in loaded.items() if k not in ("split_names", "meta")}
    return _table_from_arrays(path, arrays, split_names, meta)


def load_hf_dataset(path: Path) -> LatentsTable:
    """A folder saved by Hugging Face ``datasets`` (one Dataset with a split column, or a DatasetDict)."""
    if importlib.util.find_spec("datasets") is None:
        raise LatentsError(f"{path}: is a folder; reading a Hugging Face datasets folder needs the 'datasets' "
                           "package: pip install datasets")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise LatentsError(f"{path}: is a folder but not one written by datasets' save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        parts = [from_arrow(path, dataset.data.table, {}, split=HF_SPLIT_ALIASES.get(name, name))
                 for name, dataset in loaded.items()]
        return LatentsTable.concat(parts)
    return from_arrow(path, loaded.data.table, {})
