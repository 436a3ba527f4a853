"""A MedMNIST-layout .npz made of phantoms, for the tests of the MedMNIST path (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def generated_npz(path: Path, counts: Sequence[int] = (64, 32, 32), seed: int = 10) -> Path:
    """(N, 28, 28) uint8 phantom images and (N, 1) labels (1 = fractured) per split, as PneumoniaMNIST lays them out."""
    from harness.data.phantoms import generate_phantoms

    arrays = {}
    for index, (split, n) in enumerate(zip(("train", "val", "test"), counts, strict=True)):
        samples = list(generate_phantoms(n, 28, seed=seed + index))
        arrays[f"{split}_images"] = np.stack([s.image for s in samples]).astype(np.uint8)
        arrays[f"{split}_labels"] = np.array([[int(s.labels["grade"] >= 1)] for s in samples], dtype=np.uint8)
    np.savez(path, **arrays)
    return path
