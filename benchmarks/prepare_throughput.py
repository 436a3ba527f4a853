"""Preparation throughput: images/s and images/s per core of the dataset preparers, on generated inputs.

    python benchmarks/prepare_throughput.py --small                  # seconds: CPU smoke run
    python benchmarks/prepare_throughput.py --workers 0 1 2 4 8      # full: larger inputs, several pool sizes
    python benchmarks/prepare_throughput.py --json runs/bench/prepare.json

Two sources, generated in a temporary folder (nothing is downloaded):

* ``medmnist``: a MedMNIST-layout npz of 28x28 gray images, resized to 64 (bicubic) and PNG-encoded; the
  lightest per-image work, so it measures the runner's own overhead (chunking, pickling, shard writing).
* ``mimic-cxr``: a MIMIC-CXR-JPG tree of gray JPGs (default 2048x1664, like the released images) with its
  metadata/label/split CSVs, decoded at reduced JPEG scale, padded and resized to 256; the heavy case.

``workers=0`` runs in the calling process (one core); ``n >= 1`` uses a pool of n processes, so images/s per
core = images/s / max(1, n). Planning (reading the tables) is timed separately from writing the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from harness.data.prepare import RunOptions, medmnist_plan, mimic_plan, run_plan
from harness.data.prepare.mimic_cxr import image_path


def make_medmnist(folder: Path, n_train: int) -> Path:
    """A PneumoniaMNIST-layout npz with smooth random 28x28 images."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_train // 8), ("test", n_train // 8)):
        base = rng.integers(0, 256, (n, 7, 7), dtype=np.uint8).repeat(4, axis=1).repeat(4, axis=2)  # (N, 28, 28)
        arrays[f"{split}_images"] = base
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    path = folder / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    return path


def make_mimic(folder: Path, n_images: int, height: int, width: int) -> dict[str, Path]:
    """A MIMIC-CXR-JPG tree: gray JPGs (a smooth body-like blob plus noise) and the three CSVs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = 200 * np.exp(-(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2))
    rows, labels, splits = [], [], []
    for i in range(n_images):
        subject, study, dicom = 10000000 + i // 2, 50000000 + i, f"img{i:06d}"
        path = image_path(folder, subject, study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(blob + rng.normal(0, 12, blob.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
        rows.append((dicom, subject, study, "AP"))
        labels.append((subject, study, *rng.choice([1.0, 0.0, -1.0, np.nan], 4)))
        splits.append((dicom, study, subject, {0: "validate", 1: "test"}.get(subject % 10, "train")))
    tables = {"metadata": pd.DataFrame(rows, columns=["dicom_id", "subject_id", "study_id", "ViewPosition"]),
              "labels": pd.DataFrame(labels, columns=["subject_id", "study_id", "Lung Opacity", "Pneumonia",
                                                      "Cardiomegaly", "Edema"]),
              "split": pd.DataFrame(splits, columns=["dicom_id", "study_id", "subject_id", "split"])}
    paths = {"root": folder}
    for name, table in tables.items():
        paths[name] = folder / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    return paths


def measure(name: str, build_plan, workers: list[int], out_root: Path, items_per_shard: int) -> list[dict]:
    """Time planning once and a full run per worker count (each into a fresh folder)."""
    start = time.perf_counter()
    plan = build_plan()
    plan_s = time.perf_counter() - start
    results = []
    for count in workers:
        options = RunOptions(workers=count, items_per_shard=items_per_shard, progress=False, overwrite=True)
        start = time.perf_counter()
        result = run_plan(plan, out_root / f"{name}-w{count}", options)
        seconds = time.perf_counter() - start
        images = sum(entry["count"] for entry in result.manifest["splits"].values())
        rate = images / seconds
        results.append({"source": name, "workers": count, "images": images, "plan_s": round(plan_s, 3),
                        "run_s": round(seconds, 3), "images_per_s": round(rate, 1),
                        "images_per_s_per_core": round(rate / max(1, count), 1)})
        print(f"{name:10s} workers={count:<3d} {images:7d} images  {seconds:7.2f} s  {rate:9.1f} img/s  "
              f"{rate / max(1, count):9.1f} img/s/core  (planning {plan_s:.2f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny inputs, workers 0 and 2 (a smoke run)")
    parser.add_argument("--workers", type=int, nargs="+", help="pool sizes to time (0 = in-process)")
    parser.add_argument("--sources", nargs="+", default=["medmnist", "mimic-cxr"], choices=["medmnist", "mimic-cxr"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if args.small:
        n_medmnist, n_mimic, size, workers, per_shard = 2000, 24, (512, 416), args.workers or [0, 2], 250
    else:
        n_medmnist, n_mimic, size = 40000, 400, (2048, 1664)
        workers = args.workers or sorted({0, 1, 2, *([cores // 2] if cores > 4 else []), cores})
        per_shard = 1000
    print(f"{platform.processor() or platform.machine()}, {cores} usable cores")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if "medmnist" in args.sources:
            npz = make_medmnist(tmp_path, n_medmnist)
            results += measure("medmnist", lambda: medmnist_plan(npz, size=64), workers, tmp_path / "out",
                               per_shard)
        if "mimic-cxr" in args.sources:
            mimic = make_mimic(tmp_path / "mimic", n_mimic, *size)
            results += measure("mimic-cxr", lambda: mimic_plan(mimic["root"], mimic["metadata"], mimic["labels"],
                                                               mimic["split"], size=256),
                               workers, tmp_path / "out", max(1, min(per_shard, n_mimic // (2 * max(workers) or 1))))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cores": cores, "results": results}, indent=2))


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
