"""The latents table: one row per image with its id, split, labels, semantic latent and (optionally) x_T.

Everything downstream of the Diffusion Autoencoder (linear heads, calibration, counterfactual selection, the
report) reads this table, so latents produced by any DAE can be used as long as they follow this layout.

In memory (:class:`LatentsTable`)::

    ids     (N,)          str     unique image identifier
    splits  (N,)          str     "train" | "val" | "test" (a loaded file may hold no other names)
    labels  {column: (N,)}        one numeric array per label column, e.g. "grade" (0..3), "fracture" (0/1);
                                  NaN marks a missing label
    z_sem   (N, D)        float32 semantic latent (D = 512 in the paper)
    x_T     (N, C, H, W)  float32 optional stochastic code from DDIM inversion
    meta    dict                  free-form, JSON-able; "dae" identifies the encoder, "created" the time

On disk, chosen by the file suffix:

``.parquet`` (pyarrow)
    columns ``id`` (string), ``split`` (string), one numeric column per label, ``z_sem`` as
    ``fixed_size_list<float32>[D]`` and, optionally, ``x_T`` as ``fixed_size_list<float32>[C*H*W]`` (the
    flattened C, H, W order of numpy's ``reshape``). The file-level key-value metadata entry ``dae_cf`` holds
    JSON: ``{"format_version": 1, "z_dim": D, "x_T_shape": [C, H, W] or null, "dae": ..., "created": ...,
    "meta": {...}}``. A plain ``list<float>`` z_sem column (e.g. written by pandas) is accepted on loading as
    long as every row has the same length; an ``x_T`` column then needs ``x_T_shape`` in the metadata.
``.npz`` (numpy, loaded with ``allow_pickle=False``)
    arrays ``id`` (N,) str, ``split`` (N,) str, ``z_sem`` (N, D), optional ``x_T`` (N, C, H, W), one
    ``label_<column>`` (N,) per label column, and optionally ``meta_json`` (a 0-d string array of JSON).

Read only (``harness.method.latents_formats``): ``.safetensors``, ``.pt``/``.pth`` dicts of tensors and Hugging Face
``datasets`` folders. Loading refuses split names other than train/val/test and NaN/inf latents
(:class:`LatentsError`, naming the file, the column and the count); a parquet file may omit ``id``.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from harness.fileio import file_kind_problem
from harness.method import latents_formats
from harness.method.latents_table import (  # noqa: F401 (re-exported: the table is read from here)
    FORMAT_VERSION,
    METADATA_KEY,
    RESERVED_COLUMNS,
    SPLITS,
    LatentsError,
    LatentsTable,
    from_arrow,
)


def _header(table: LatentsTable) -> dict[str, Any]:
    meta = dict(table.meta)
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    return {
        "format_version": FORMAT_VERSION, "z_dim": table.z_dim,
        "x_T_shape": None if table.x_T is None else list(table.x_T.shape[1:]),
        "dae": meta.get("dae"), "created": meta["created"], "meta": meta,
    }


def _write_parquet(table: LatentsTable, header: dict[str, Any], target: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = table.z_sem.shape
    columns: dict[str, pa.Array] = {"id": pa.array(table.ids.tolist(), pa.string()),
                                    "split": pa.array(table.splits.tolist(), pa.string())}
    for column, values in table.labels.items():
        columns[column] = pa.array(values)
    columns["z_sem"] = pa.FixedSizeListArray.from_arrays(pa.array(table.z_sem.reshape(-1)), d)
    if table.x_T is not None:
        flat = table.x_T.reshape(n, -1)  # (N, C*H*W)
        columns["x_T"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    arrow = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(header).encode()})
    pq.write_table(arrow, target)


def _write_npz(table: LatentsTable, header: dict[str, Any], handle: Any) -> None:
    arrays: dict[str, np.ndarray] = {"id": table.ids, "split": table.splits, "z_sem": table.z_sem,
                                     "meta_json": np.array(json.dumps(header))}
    if table.x_T is not None:
        arrays["x_T"] = table.x_T
    for column, values in table.labels.items():
        arrays[f"label_{column}"] = values
    np.savez(handle, **arrays)


def save_latents(table: LatentsTable, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` (.parquet or .npz) atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".npz"):
        raise ValueError(f"{path}: latents files must end in .parquet or .npz, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(table)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if suffix == ".npz":
                _write_npz(table, header, handle)  # a file object: numpy adds no ".npz" to the temp name
        if suffix == ".parquet":
            _write_parquet(table, header, temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------


def _load_parquet(path: Path) -> LatentsTable:
    import pyarrow.parquet as pq

    arrow_table = pq.read_table(path)
    raw_meta = (arrow_table.schema.metadata or {}).get(METADATA_KEY)
    return from_arrow(path, arrow_table, json.loads(raw_meta) if raw_meta else {})


def _load_npz(path: Path) -> LatentsTable:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        for required in ("id", "split", "z_sem"):
            if required not in names:
                raise LatentsError(f"{path}: latents file lacks array {required!r} (arrays: {names})")
        z_sem = archive["z_sem"]
        if z_sem.ndim != 2:
            raise LatentsError(f"{path}: z_sem must have shape (N, D), found {z_sem.shape}")
        x_T = archive["x_T"] if "x_T" in names else None
        if x_T is not None and (x_T.ndim != 4 or x_T.shape[0] != z_sem.shape[0]):
            raise LatentsError(f"{path}: x_T must have shape (N={z_sem.shape[0]}, C, H, W), found {x_T.shape}")
        header = json.loads(str(archive["meta_json"])) if "meta_json" in names else {}
        labels = {name[len("label_"):]: archive[name] for name in names if name.startswith("label_")}
        ids, splits = archive["id"], archive["split"]
    for name, values in (("id", ids), ("split", splits), *((f"label_{c}", v) for c, v in labels.items())):
        if values.shape != (z_sem.shape[0],):
            raise LatentsError(f"{path}: array {name!r} has shape {values.shape}, expected ({z_sem.shape[0]},) "
                             "to match z_sem")
    return LatentsTable(ids=ids, splits=splits, z_sem=z_sem, labels=labels, x_T=x_T, meta=header.get("meta", {}))


def _object_arrays(path: Path) -> list[str]:
    """The arrays of an .npz that only load with pickle (ragged rows, None entries)."""
    names = []
    with np.load(path, allow_pickle=False) as archive:
        for name in archive.files:
            try:
                archive[name]
            except ValueError:
                names.append(name)
    return names


def check_loaded(path: Path | str, table: LatentsTable) -> LatentsTable:
    """Refuse split names other than train/val/test and non-finite latents, naming the file, column and count."""
    unknown = ~np.isin(table.splits, SPLITS)
    if unknown.any():
        values = sorted(set(table.splits[unknown].tolist()))
        raise LatentsError(f"{path}: column 'split' has {int(unknown.sum())} rows with split names other than "
                           f"{'/'.join(SPLITS)}: {values[:5]}")
    bad = ~np.isfinite(table.z_sem).all(axis=1)
    if bad.any():
        raise LatentsError(f"{path}: column 'z_sem' has {int(bad.sum())} rows with NaN/inf values "
                           f"(first: row {int(np.flatnonzero(bad)[0])})")
    return table


def load_latents(path: str | os.PathLike) -> LatentsTable:
    """Read a latents table from any supported layout (module docstring and ``harness.method.latents_formats``).

    ``.parquet`` and ``.npz`` as written by :func:`save_latents`; ``.safetensors``; ``.pt`` / ``.pth`` (a dict
    of tensors, loaded with ``torch.load(weights_only=True)``); a folder written by Hugging Face ``datasets``'
    ``save_to_disk``. Split names other than train/val/test and NaN/inf latents are refused."""
    path = Path(path)
    if path.is_dir():
        return check_loaded(path, latents_formats.load_hf_dataset(path))
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    suffix = path.suffix.lower()
    problem = file_kind_problem(path)  # e.g. a text file named .npz: say so, not "holds an object array"
    if problem:
        raise LatentsError(f"{path} is {problem}: write latents with harness.method.latents.save_latents (or see the "
                           "README's 'Bring your own latents' for the formats)")
    if suffix == ".parquet":
        return check_loaded(path, _load_parquet(path))
    if suffix in (".safetensors", ".pt", ".pth"):
        return check_loaded(path, latents_formats.load_tensor_file(path))
    if suffix == ".npz":
        try:
            return check_loaded(path, _load_npz(path))
        except ValueError as error:
            if "pickle" in str(error):  # an object array (e.g. ragged z_sem, ids with None) needs pickle: refused
                objects = _object_arrays(path)
                raise LatentsError(f"{path}: array(s) {objects} hold Python objects (ragged rows or None entries), "
                                   f"refused without pickle: {len(objects)} array(s); store ids, splits and labels "
                                   "as str or numeric arrays and z_sem as one (N, D) array") from error
            raise
    raise LatentsError(f"{path}: latents files must end in .parquet, .npz, .safetensors, .pt or .pth (or be a "
                       f"Hugging Face datasets folder), not {path.suffix!r}")
