"""Latents tables and sweep job files generated for the heads, latents and sweep tests (shared helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from harness.method.latents import LatentsTable, save_latents

KINDS, CS, CALIBRATIONS = ["svm", "logistic", "linear"], [0.01, 1.0], ["extremes", "poly2"]


def synthetic_latents(path: Path, seed: int = 0) -> Path:
    """Grades 0-3 carried (with noise) by one direction of a 12-d latent; train/val/test rows."""
    rng = np.random.default_rng(seed)
    counts = {"train": 120, "val": 60, "test": 60}
    n, dim = sum(counts.values()), 12
    grades = rng.choice(4, size=n, p=[0.4, 0.2, 0.2, 0.2])
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    z = rng.normal(size=(n, dim)) + np.outer(grades + rng.normal(0, 0.6, n), direction) * 1.5  # (N, D)
    splits = np.repeat(list(counts), list(counts.values()))
    table = LatentsTable(ids=[f"s{i:04d}" for i in range(n)], splits=splits, z_sem=z.astype(np.float32),
                         labels={"grade": grades.astype(np.int64)},
                         meta={"dae": "dae-test:v7", "model": "runs/dae-test/export"})
    return save_latents(table, path)


def write_job(path: Path, **changes) -> Path:
    job = {
        "out_dir": str(path.parent / "out"),
        "resources": {"cpu": 1, "gpu": 0},
        "search": {"kinds": KINDS, "C": CS, "calibration": CALIBRATIONS},
        "track": {"experiment": "sweep-test"},
        "tasks": [
            {"name": "fracture", "column": "grade", "positives": [1, 2, 3], "grade_range": [0, 3],
             "select": "macro_f1", "fit_rules": [{"positives": [1, 2, 3]}, {"positives": [2, 3], "negatives": [0]}]},
            {"name": "severe", "column": "grade", "positives": [2, 3], "select": "auc"},
        ],
    }
    job.update(changes)
    path.write_text(yaml.safe_dump(job))
    return path


def graded_table(n: int = 240, d: int = 12, seed: int = 0) -> LatentsTable:
    """Grades 0..3 shift the latents along a direction; features on very different scales (standardizing matters)."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(4, size=n, p=[0.45, 0.2, 0.2, 0.15])
    direction = rng.normal(size=d)
    z = rng.normal(size=(n, d)) + 0.6 * grades[:, None] * direction / np.linalg.norm(direction)
    z *= np.geomspace(0.1, 10.0, d)  # (N, D)
    splits = np.where(np.arange(n) % 4 == 0, "test", "train")
    return LatentsTable(ids=[f"r{i}" for i in range(n)], splits=splits, z_sem=z.astype(np.float32),
                        labels={"grade": grades})
