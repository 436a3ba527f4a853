"""The latents table type: one row per image with its id, split, labels, z_sem and (optionally) x_T.

The in-memory layout and the on-disk formats are described in :mod:`harness.method.latents`, which reads and writes
them; the readers of other formats live in :mod:`harness.method.latents_formats`. Both build tables with the types
here, so neither imports the other's loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import ConfigError

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
