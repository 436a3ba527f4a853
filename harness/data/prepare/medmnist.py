"""MedMNIST ``.npz`` files (PneumoniaMNIST, RetinaMNIST and the other 2D sets, any size 28/64/128/224) -> shards.

An npz holds ``{train,val,test}_images`` ((N, H, W) gray or (N, H, W, 3) RGB, uint8) and
``{train,val,test}_labels`` ((N, 1), or (N, K) for the multi-label ChestMNIST). The official splits are kept.
The file is checked as a whole before anything is written: a missing key, image/label counts that differ, or a
label outside the data set's classes stops the run with a message naming the key and the counts.

Each sample is ``{dataset}-{split}-{index:06d}`` with labels ``{column: class}`` plus ``source_file`` and
``source_index`` (the row in the npz). Images keep their size unless ``size`` is given (see
:func:`harness.data.prepare.imaging.fit_square`: ``pad`` keeps the original pixels on a black canvas,
``resize`` is PIL bicubic) and their channels unless ``channels`` is 1 (ITU-R 601-2 luma) or 3 (gray repeated).
"""

from __future__ import annotations

import argparse
import functools
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.prepare.common import Plan, PrepareError, PrepareResult, RunOptions, WorkItem, sha256_file
from harness.data.prepare.imaging import FIT_METHODS, fit_square, to_channels
from harness.data.prepare.runner import run_plan

SPLITS = ("train", "val", "test")
CHEST_FINDINGS = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                  "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia")


@dataclass(frozen=True)
class MedMNISTSpec:
    """Label columns of one MedMNIST set and its number of classes (per column)."""

    columns: tuple[str, ...]
    num_classes: int


# MedMNIST v2 2D sets. Class meanings follow the MedMNIST INFO table; e.g. BreastMNIST's 1 is "normal or
# benign" (0 malignant), hence the column name.
MEDMNIST_DATASETS: dict[str, MedMNISTSpec] = {
    "pneumoniamnist": MedMNISTSpec(("pneumonia",), 2),  # 0 normal, 1 pneumonia
    "retinamnist": MedMNISTSpec(("grade",), 5),  # diabetic retinopathy grade 0-4
    "breastmnist": MedMNISTSpec(("benign",), 2),
    "pathmnist": MedMNISTSpec(("tissue",), 9),
    "dermamnist": MedMNISTSpec(("lesion",), 7),
    "octmnist": MedMNISTSpec(("diagnosis",), 4),
    "bloodmnist": MedMNISTSpec(("cell_type",), 8),
    "tissuemnist": MedMNISTSpec(("tissue",), 8),
    "organamnist": MedMNISTSpec(("organ",), 11),
    "organcmnist": MedMNISTSpec(("organ",), 11),
    "organsmnist": MedMNISTSpec(("organ",), 11),
    "chestmnist": MedMNISTSpec(CHEST_FINDINGS, 2),  # 14 binary findings per image
}


def dataset_name(npz_path: str | Path) -> str:
    """``retinamnist_224.npz`` -> ``retinamnist``: the file stem, lower case, without a size suffix."""
    return re.sub(r"_\d+$", "", Path(npz_path).stem.lower())


def resolve_spec(dataset: str, label_columns: Sequence[str] | None, num_classes: int | None) -> MedMNISTSpec:
    """The registry entry for ``dataset``, with ``label_columns`` / ``num_classes`` overriding it."""
    known = MEDMNIST_DATASETS.get(dataset)
    if known is None and (not label_columns or num_classes is None):
        raise PrepareError(f"unknown MedMNIST data set {dataset!r} (known: {', '.join(sorted(MEDMNIST_DATASETS))}); "
                           "give label_columns and num_classes for another set (data.label_columns and "
                           "data.num_classes in a job file, --label-column and --num-classes on the command line)")
    return MedMNISTSpec(tuple(label_columns) if label_columns else known.columns,
                        int(num_classes) if num_classes is not None else known.num_classes)


def read_medmnist(npz_path: str | Path, spec: MedMNISTSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load and check an npz: split -> (images (N, H, W[, 3]) uint8, labels (N, K) int64). ``PrepareError``
    names the key and the counts on any inconsistency."""
    path = Path(npz_path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise PrepareError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    present = sorted(arrays)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        image_key, label_key = f"{split}_images", f"{split}_labels"
        for key in (image_key, label_key):
            if key not in arrays:
                raise PrepareError(f"{path}: missing key {key!r} (the file has {present}); a MedMNIST npz holds "
                                   "train_/val_/test_ images and labels")
        images, labels = arrays[image_key], arrays[label_key]
        if images.ndim == 4 and images.shape[3] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise PrepareError(f"{path}: {image_key!r} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3) "
                               "(the 3D MedMNIST sets are volumes, not 2D images)")
        if images.dtype != np.uint8:
            raise PrepareError(f"{path}: {image_key!r} has dtype {images.dtype}; MedMNIST images are uint8")
        labels = labels.reshape(len(labels), -1) if labels.ndim in (1, 2) else labels
        if images.shape[0] != labels.shape[0]:
            raise PrepareError(f"{path}: {image_key!r} has {images.shape[0]} images but {label_key!r} has "
                               f"{labels.shape[0]} labels")
        if labels.ndim != 2 or labels.shape[1] != len(spec.columns):
            raise PrepareError(f"{path}: {label_key!r} has shape {labels.shape}; expected ({labels.shape[0]}, "
                               f"{len(spec.columns)}) for label columns {list(spec.columns)}")
        if not np.issubdtype(labels.dtype, np.integer):
            if not (np.isfinite(labels).all() and np.all(labels == np.round(labels))):
                raise PrepareError(f"{path}: {label_key!r} holds non-integer labels (dtype {labels.dtype})")
        bad_rows = np.flatnonzero(((labels < 0) | (labels >= spec.num_classes)).any(axis=1))
        if len(bad_rows):
            first = int(bad_rows[0])
            raise PrepareError(f"{path}: {label_key!r} has {len(bad_rows)} of {labels.shape[0]} rows with labels "
                               f"outside 0..{spec.num_classes - 1} (first: row {first}, value "
                               f"{labels[first].tolist()})")
        out[split] = (images, labels.astype(np.int64))
    shapes = {split: images.shape[1:] for split, (images, _) in out.items()}
    if len(set(shapes.values())) != 1:
        raise PrepareError(f"{path}: splits have different image shapes {shapes}")
    return out


def _load_image(item: WorkItem, *, dataset: str, columns: tuple[str, ...], size: int | None, fit: str,
                channels: int | None, source_file: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """One npz row -> one sample (the payload carries the image, so workers never reopen the npz)."""
    split, index, image, label_row = item.payload
    image = fit_square(to_channels(image, channels), size, fit)  # (S, S) or (S, S, 3) uint8
    labels: dict[str, Any] = {column: int(value) for column, value in zip(columns, label_row, strict=True)}
    labels.update(source_file=source_file, source_index=int(index))
    yield f"{dataset}-{split}-{index:06d}", np.ascontiguousarray(image), labels


def medmnist_plan(npz_path: str | Path, *, dataset: str | None = None, label_columns: Sequence[str] | None = None,
                  num_classes: int | None = None, size: int | None = None, fit: str = "resize",
                  channels: int | None = None) -> Plan:
    """Check ``npz_path`` and describe its preparation (one work item per image, official splits)."""
    if fit not in FIT_METHODS or channels not in (None, 1, 3) or (size is not None and size < 8):
        raise ValueError(f"fit={fit!r} (one of {FIT_METHODS}), channels={channels} (None, 1, 3), size={size} "
                         "(None or >= 8)")
    path = Path(npz_path)
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    dataset = (dataset or dataset_name(path)).lower()
    spec = resolve_spec(dataset, label_columns, num_classes)
    arrays = read_medmnist(path, spec)
    splits = {split: [WorkItem(f"{path.name}:{split}[{i}]", "", (split, i, images[i], labels[i]))
                      for i in range(len(images))]
              for split, (images, labels) in arrays.items()}
    load = functools.partial(_load_image, dataset=dataset, columns=spec.columns, size=size, fit=fit,
                             channels=channels, source_file=path.name)
    config = {"dataset": dataset, "label_columns": list(spec.columns), "num_classes": spec.num_classes,
              "size": size, "fit": fit, "channels": channels}
    return Plan(f"medmnist:{dataset}", splits, load, spec.columns, config, inputs={path.name: sha256_file(path)})


def prepare_medmnist(npz_path: str | Path, out_dir: str | Path, *, dataset: str | None = None,
                     label_columns: Sequence[str] | None = None, num_classes: int | None = None,
                     size: int | None = None, fit: str = "resize", channels: int | None = None,
                     options: RunOptions = RunOptions()) -> PrepareResult:
    """MedMNIST npz -> shards in ``out_dir`` with the official train/val/test splits; see the module docstring."""
    plan = medmnist_plan(npz_path, dataset=dataset, label_columns=label_columns, num_classes=num_classes,
                         size=size, fit=fit, channels=channels)
    return run_plan(plan, out_dir, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m harness.data.prepare medmnist``."""
    parser.add_argument("npz", type=Path, help="a MedMNIST .npz (e.g. pneumoniamnist.npz, retinamnist_64.npz)")
    parser.add_argument("--dataset", help="registry name; default: from the file name")
    parser.add_argument("--label-column", action="append", dest="label_columns",
                        help="label column name (repeat for multi-label sets); default: the registry's")
    parser.add_argument("--num-classes", type=int, help="classes per label column; default: the registry's")
    parser.add_argument("--size", type=int, help="output size (default: keep the npz's size)")
    parser.add_argument("--fit", choices=FIT_METHODS, default="resize", help="how to reach --size")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 gray, 3 RGB (default: keep)")


def run_from_args(args: argparse.Namespace, options: RunOptions) -> PrepareResult:
    """Run the ``medmnist`` subcommand."""
    return prepare_medmnist(args.npz, args.out, dataset=args.dataset, label_columns=args.label_columns,
                            num_classes=args.num_classes, size=args.size, fit=args.fit, channels=args.channels,
                            options=options)
