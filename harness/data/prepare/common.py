"""Shared vocabulary of the preparers: plans and work items, bad-input reports, options, patient-level splits.

A preparer reads a source's tables and file lists (cheap) and returns a :class:`Plan`: ordered
:class:`WorkItem` lists per split and a picklable ``load`` function that turns one item (an image file, a
volume, a row of an npz) into zero or more samples ``(key, image, labels)``, or into :class:`Skip` records for
inputs that are bad. :func:`harness.data.prepare.runner.run_plan` turns a plan into shards.

Bad inputs never become samples: with ``on_bad="skip"`` they are listed (input, kind, reason) in the manifest
and in the returned result; with ``on_bad="stop"`` the first one ends the run with a :class:`PrepareError`
that names it.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import fileio
from harness.errors import UserError
from harness.fileio import sha256_file  # noqa: F401  (re-exported to the preparers)

STATE_DIR = ".prepare"  # finished-chunk records of an unfinished run; removed once the manifest is written
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Kinds of bad input, so reports can be grouped; the free-text reason says the rest.
SKIP_KINDS = ("unreadable", "dimensionality", "shape_mismatch", "empty_mask", "label_out_of_range", "non_finite",
              "missing_label", "outside_volume")


class PrepareError(UserError, RuntimeError):
    """The preparation cannot go on: a bad source file or table, or a bad input under ``on_bad="stop"``."""


class BadInput(ValueError):
    """Raised by a ``load`` function: this input (named in the message) is bad and yields no samples."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown bad-input kind {kind!r}; expected one of {SKIP_KINDS}")
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Skip:
    """One input (or one part of an input, such as a vertebra) left out, and why."""

    input: str
    kind: str
    reason: str


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: ``name`` is how reports refer to it (a path, ``file.npz:train[12]``), ``patient`` the
    patient it belongs to ("" when the source has none), ``payload`` whatever the plan's ``load`` needs."""

    name: str
    patient: str
    payload: Any = None


Sample = tuple[str, np.ndarray, dict[str, Any]]  # key, image (H, W) or (H, W, 3) uint8, labels + metadata
LoadFn = Callable[[WorkItem], Iterable[Sample | Skip]]


@dataclass
class Plan:
    """Everything :func:`run_plan` needs; ``config`` (JSON values) and the item names define the output."""

    source: str  # e.g. "medmnist:pneumoniamnist"
    splits: dict[str, list[WorkItem]]
    load: LoadFn  # must pickle (a module-level function or a functools.partial of one)
    label_columns: tuple[str, ...]
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # label tables and other small inputs: path -> sha256
    skipped: list[Skip] = field(default_factory=list)  # bad inputs already found while planning
    filtered: dict[str, int] = field(default_factory=dict)  # inputs left out by a rule (not errors): reason -> n


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan (none of these change the samples, except ``items_per_shard`` the shard cut)."""

    workers: int = 0  # 0: in this process; n >= 1: a pool of n processes
    items_per_shard: int = 1000  # work items per shard (a volume yields several samples)
    image_format: str = "png"  # "png" | "npy"; images are uint8 in both
    on_bad: str = "skip"  # "skip": report and leave out bad inputs | "stop": the first one ends the run
    overwrite: bool = False  # replace a folder holding other shards (or restart instead of resuming)
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.workers < 0 or self.items_per_shard < 1:
            raise ValueError(f"workers={self.workers} must be >= 0, items_per_shard={self.items_per_shard} >= 1")
        if self.on_bad not in ("skip", "stop") or self.image_format not in ("png", "npy"):
            raise ValueError(f"on_bad={self.on_bad!r} must be 'skip' or 'stop', image_format="
                             f"{self.image_format!r} 'png' or 'npy'")


@dataclass
class PrepareResult:
    """What a run produced: the manifest, the skipped inputs, and how much was reused."""

    out_dir: Path
    manifest: dict[str, Any]
    skipped: list[Skip]
    shards_written: int = 0
    shards_resumed: int = 0  # finished shards of an interrupted run, kept
    already_done: bool = False  # the folder already held these shards; nothing was written

    def summary(self) -> str:
        """A few human-readable lines: counts per split and skipped inputs grouped by kind."""
        splits = self.manifest["splits"]
        lines = [f"{self.out_dir}: " + ", ".join(f"{s} {e['count']}" for s, e in splits.items())
                 + f" samples ({self.shards_written} shards written, {self.shards_resumed} resumed"
                 + (", already complete" if self.already_done else "") + ")"]
        lines += summarise_skips(self.skipped)
        filtered = self.manifest.get("prepare", {}).get("filtered", {})
        lines += [f"  filtered out: {n} ({reason})" for reason, n in filtered.items()]
        return "\n".join(lines)


def summarise_skips(skips: Sequence[Skip], examples: int = 3) -> list[str]:
    """Lines counting skipped inputs by kind, with the first few of each as examples."""
    if not skips:
        return ["  skipped inputs: none"]
    by_kind: dict[str, list[Skip]] = {}
    for skip in skips:
        by_kind.setdefault(skip.kind, []).append(skip)
    lines = [f"  skipped inputs: {len(skips)}"]
    for kind, group in sorted(by_kind.items()):
        lines.append(f"    {kind}: {len(group)}")
        lines += [f"      {s.reason if s.reason.startswith(s.input) else f'{s.input}: {s.reason}'}"
                  for s in group[:examples]]
    return lines


def write_json_atomic(path: Path, payload: Any) -> None:
    """Sorted-key JSON written atomically (one implementation: :func:`harness.fileio.write_json_atomic`)."""
    fileio.write_json_atomic(path, payload, sort_keys=True)


# --- Splits ---------------------------------------------------------------------------------------------------


def assign_patient_splits(patients: Iterable[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                          seed: int = 0) -> dict[str, str]:
    """Patient id -> split, deterministic and independent of input order.

    Patients are ordered by a seeded SHA-256 of their id (a stable pseudo-random order that does not depend on
    how files were listed), then cut into consecutive groups whose sizes follow ``fractions`` by the
    largest-remainder rule; every split with a positive fraction gets at least one patient when there are
    enough patients. All images of a patient therefore land in one split.
    """
    unique = sorted(set(patients))
    names = [name for name, fraction in fractions.items() if fraction > 0]
    total = sum(fractions[name] for name in names)
    if not names or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions {dict(fractions)}: need at least one positive and none negative")
    exact = [len(unique) * fractions[name] / total for name in names]
    sizes = [int(x) for x in exact]
    for index in sorted(range(len(names)), key=lambda i: exact[i] - sizes[i], reverse=True)[:len(unique) - sum(sizes)]:
        sizes[index] += 1
    for index in range(len(names)):  # give empty splits one patient, taken from the largest
        if sizes[index] == 0 and len(unique) >= len(names):
            sizes[sizes.index(max(sizes))] -= 1
            sizes[index] = 1
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    assignment, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        assignment.update({patient: name for patient in order[start:start + size]})
        start += size
    return assignment


def split_items_by_patient(items: Sequence[WorkItem], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                           seed: int = 0) -> dict[str, list[WorkItem]]:
    """Group items into splits by :func:`assign_patient_splits` (item order kept within a split)."""
    assignment = assign_patient_splits((item.patient for item in items), fractions, seed)
    splits: dict[str, list[WorkItem]] = {name: [] for name, fraction in fractions.items() if fraction > 0}
    for item in items:
        splits[assignment[item.patient]].append(item)
    return {name: chosen for name, chosen in splits.items() if chosen}


def check_patients_disjoint(splits: Mapping[str, Sequence[WorkItem]]) -> None:
    """``PrepareError`` naming a patient found in two splits (items without a patient id are not checked)."""
    seen: dict[str, str] = {}
    for split, items in splits.items():
        for item in items:
            if item.patient and seen.setdefault(item.patient, split) != split:
                raise PrepareError(f"patient {item.patient!r} is in splits {seen[item.patient]!r} and {split!r} "
                                   f"(e.g. {item.name}); a patient's images must share one split")


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency on first use, or fail with a message naming the ``prepare`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]  # nibabel, SimpleITK, pydicom, openpyxl
        raise PrepareError(f"{purpose} needs the Python package {package!r}, which is not installed; install the "
                           f"'prepare' extra (pip install -e '.[prepare]') or pip install {package}") from exc


def parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, "val": 0.1, "test": 0.1}``."""
    try:
        pairs = [part.split("=") for part in text.split(",") if part.strip()]
        fractions = {name.strip(): float(value) for name, value in pairs}
    except ValueError as exc:
        raise ValueError(f"split fractions {text!r}: expected name=fraction pairs such as "
                         "'train=0.8,val=0.1,test=0.1'") from exc
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions {text!r}: need non-negative fractions with a positive sum")
    return fractions


def add_split_arguments(parser: Any) -> None:
    """``--split-fractions`` and ``--split-seed`` for sources without official splits."""
    parser.add_argument("--split-fractions", type=parse_fractions, default=dict(DEFAULT_FRACTIONS),
                        help="patient-level split sizes (default: train=0.8,val=0.1,test=0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")


def read_table(path: str | Path, **read_kw: Any) -> Any:
    """A CSV (optionally gzipped) or XLSX label table as a pandas DataFrame; ``PrepareError`` names the file."""
    import pandas as pd  # noqa: PLC0415 - pandas is a core dependency but only the preparers need it

    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: table not found")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            require("openpyxl", "reading .xlsx tables")
            return pd.read_excel(path, **read_kw)
        return pd.read_csv(path, **read_kw)
    except PrepareError:
        raise
    except Exception as exc:  # parser errors, bad encodings, unknown columns in usecols
        raise PrepareError(f"{path}: cannot read as a table ({type(exc).__name__}: {exc})") from exc


def require_columns(table: Any, columns: Iterable[str], path: str | Path) -> None:
    """``PrepareError`` naming the columns ``table`` lacks and the ones it has."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; the table has {list(table.columns)}")


def safe_key(text: str) -> str:
    """A sample key from free text: characters other than letters, digits, '_' and '-' become '_'."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return key
