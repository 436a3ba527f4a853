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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import ConfigError
from harness.fileio import file_kind_problem

RESERVED_COLUMNS = ("id", "split", "z_sem", "x_T")
SPLITS = ("train", "val", "test")  # the split names a loaded latents file may use
METADATA_KEY = b"dae_cf"
FORMAT_VERSION = 1


class LatentsError(ConfigError):
    """A latents file cannot be used as handed in; the message names the file, the column and the count.

    A ConfigError (hence a ValueError): entry points end it with one line and exit status 2."""


@dataclass
class LatentsTable:
    """Rows of (id, split, labels, z_sem, optional x_T); see the module docstring for the layout."""

    ids: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str
    z_sem: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (N,)
    x_T: np.ndarray | None = None  # (N, C, H, W) float32
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=str).reshape(-1)
        self.splits = np.asarray(self.splits, dtype=str).reshape(-1)
        self.z_sem = np.asarray(self.z_sem, dtype=np.float32)
        n = self.ids.shape[0]
        if self.z_sem.ndim != 2:
            raise ValueError(f"z_sem must have shape (N, D), got {self.z_sem.shape}")
        if self.splits.shape[0] != n or self.z_sem.shape[0] != n:
            raise ValueError(f"row counts disagree: {n} ids, {self.splits.shape[0]} splits, "
                             f"{self.z_sem.shape[0]} z_sem rows")
        labels = {}
        for column, values in self.labels.items():
            if column in RESERVED_COLUMNS:
                raise ValueError(f"label column name {column!r} is reserved ({', '.join(RESERVED_COLUMNS)})")
            values = np.asarray(values).reshape(-1)
            if values.shape[0] != n:
                raise ValueError(f"label column {column!r} has {values.shape[0]} rows, the table has {n}")
            if values.dtype == object:
                raise ValueError(f"label column {column!r} has object dtype; labels must be numeric or str")
            labels[column] = values
        self.labels = labels
        if self.x_T is not None:
            self.x_T = np.asarray(self.x_T, dtype=np.float32)
            if self.x_T.ndim != 4 or self.x_T.shape[0] != n:
                raise ValueError(f"x_T must have shape (N={n}, C, H, W), got {self.x_T.shape}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def z_dim(self) -> int:
        return int(self.z_sem.shape[1])

    @property
    def label_columns(self) -> list[str]:
        return list(self.labels)

    def split_counts(self) -> dict[str, int]:
        """Number of rows per split, e.g. ``{"test": 256, "train": 2048}``."""
        names, counts = np.unique(self.splits, return_counts=True)
        return {str(name): int(count) for name, count in zip(names, counts, strict=True)}

    def rows(self, mask: np.ndarray) -> LatentsTable:
        """A new table holding the rows selected by a boolean mask or an index array."""
        return LatentsTable(
            ids=self.ids[mask], splits=self.splits[mask], z_sem=self.z_sem[mask],
            labels={column: values[mask] for column, values in self.labels.items()},
            x_T=None if self.x_T is None else self.x_T[mask], meta=dict(self.meta),
        )

    def select(self, split: str) -> LatentsTable:
        """The rows of one split; a split that is absent is an error naming the splits present."""
        mask = self.splits == split
        if not mask.any():
            raise ValueError(f"split {split!r} has no rows (splits present: {self.split_counts()})")
        return self.rows(mask)

    @classmethod
    def concat(cls, tables: Sequence[LatentsTable]) -> LatentsTable:
        """Stack tables row-wise; they must share z_dim, label columns and the presence/shape of x_T."""
        if not tables:
            raise ValueError("concat needs at least one table")
        first = tables[0]
        for index, table in enumerate(tables[1:], start=1):
            if table.z_dim != first.z_dim:
                raise ValueError(f"table {index} has z_dim {table.z_dim}, table 0 has {first.z_dim}")
            if set(table.labels) != set(first.labels):
                raise ValueError(f"table {index} has label columns {sorted(table.labels)}, "
                                 f"table 0 has {sorted(first.labels)}")
            if (table.x_T is None) != (first.x_T is None):
                raise ValueError(f"table {index} and table 0 disagree on whether x_T is present")
            if table.x_T is not None and table.x_T.shape[1:] != first.x_T.shape[1:]:
                raise ValueError(f"table {index} has x_T shape {table.x_T.shape[1:]}, table 0 has "
                                 f"{first.x_T.shape[1:]}")
        return cls(
            ids=np.concatenate([t.ids for t in tables]), splits=np.concatenate([t.splits for t in tables]),
            z_sem=np.concatenate([t.z_sem for t in tables]),
            labels={column: np.concatenate([t.labels[column] for t in tables]) for column in first.labels},
            x_T=None if first.x_T is None else np.concatenate([t.x_T for t in tables]), meta=dict(first.meta),
        )


# ---------------------------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------------------------


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


def _list_column_to_matrix(path: Path, arrow_table: Any, name: str) -> np.ndarray:
    """A (fixed-size or equal-length) list column -> (N, width) float32, with errors naming the file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = arrow_table.column(name).combine_chunks()
    n = len(column)
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise LatentsError(f"{path}: column {name!r} has {column.null_count} null rows (first: row {first})")
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        ragged = np.flatnonzero(lengths != width)
        if ragged.size:
            raise LatentsError(f"{path}: column {name!r}: {ragged.size} rows differ in length from row 0's {width} "
                               f"(first: row {int(ragged[0])} has {int(lengths[ragged[0]])})")
    else:
        raise LatentsError(f"{path}: column {name!r} must be a list of floats, found type {column.type}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, width)


def _load_parquet(path: Path) -> LatentsTable:
    import pyarrow.parquet as pq

    arrow_table = pq.read_table(path)
    raw_meta = (arrow_table.schema.metadata or {}).get(METADATA_KEY)
    return from_arrow(path, arrow_table, json.loads(raw_meta) if raw_meta else {})


def from_arrow(path: Path | str, arrow_table: Any, header: dict[str, Any] | None = None,
               split: str | None = None) -> LatentsTable:
    """A pyarrow table in the parquet layout -> LatentsTable; ``split`` stands in for an absent split column and
    an absent ``id`` column becomes ``<split>/<row>`` or the row number (a Hugging Face table may hold neither)."""
    header = header or {}
    names = arrow_table.column_names
    for required in ("z_sem", *(() if split else ("split",))):
        if required not in names:
            raise LatentsError(f"{path}: latents file lacks column {required!r} (columns: {names})")
    z_sem = _list_column_to_matrix(path, arrow_table, "z_sem")  # (N, D)
    if header.get("z_dim") is not None and z_sem.shape[1] != header["z_dim"]:
        raise LatentsError(f"{path}: z_sem rows have {z_sem.shape[1]} values, metadata says z_dim={header['z_dim']}")
    n = z_sem.shape[0]
    splits = np.asarray(arrow_table.column("split").to_pylist() if "split" in names else [split] * n, dtype=str)
    if "id" in names:
        ids = np.asarray(arrow_table.column("id").to_pylist(), dtype=str)
    else:  # ids only need to be unique within the table
        ids = np.asarray([f"{split}/{row}" if split else str(row) for row in range(n)], dtype=str)
    x_T = None
    if "x_T" in names:
        shape = header.get("x_T_shape")
        if not shape:
            raise LatentsError(f"{path}: column 'x_T' is present but the metadata lacks x_T_shape [C, H, W]")
        flat = _list_column_to_matrix(path, arrow_table, "x_T")  # (N, C*H*W)
        if flat.shape[1] != int(np.prod(shape)):
            raise LatentsError(f"{path}: x_T rows have {flat.shape[1]} values, x_T_shape {shape} needs "
                             f"{int(np.prod(shape))}")
        x_T = flat.reshape(len(flat), *shape)
    labels = {}
    for name in names:
        if name not in RESERVED_COLUMNS:
            values = arrow_table.column(name).to_numpy()
            # string labels come back as objects; numeric ones with nulls as float with NaN
            labels[name] = np.asarray(values.tolist(), dtype=str) if values.dtype == object else values
    return LatentsTable(ids=ids, splits=splits, z_sem=z_sem, labels=labels, x_T=x_T, meta=header.get("meta", {}))


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
    from harness.method import latents_formats

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
