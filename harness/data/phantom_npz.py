"""The vertebra phantoms written as a MedMNIST-layout ``.npz``, in grey or in colour: a stand-in for your own
graded data set, so that the README's "your own data set" walk-through needs no download.

    python -m harness.data.phantom_npz runs/data/colour_phantoms.npz --rgb [--size 32] [--counts 1024 128 128]
        [--grades 5]

The file holds ``{train,val,test}_images`` (N, H, W) or (N, H, W, 3) uint8 and ``{split}_labels`` (N, 1) int64
with the grade 0-3 (or 0-4 with ``--grades 5``), exactly the layout of a MedMNIST file such as ``retinamnist.npz``
(whose diabetic-retinopathy grade has five levels too).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.data.phantoms import generate_phantoms
from harness.fileio import atomic_write_bytes

SPLITS = ("train", "val", "test")
# Tissue shades from dark to bright, as (R, G, B) in [0, 1]: bone bright and warm, background dark and cool, so
# the colour carries no information the grey levels do not (a pure colour map of the phantom's intensity).
_COLOUR_STOPS = np.array([[0.05, 0.07, 0.20], [0.45, 0.25, 0.35], [0.95, 0.80, 0.60]], dtype=np.float32)
# Five grades: the height loss binned at these edges (the four-grade intervals with grade 2 and grade 3 each cut in
# two), so a label is still a function of the rendered geometry and neighbouring grades differ by a few pixels.
FIVE_GRADE_EDGES = (0.20, 0.25, 0.325, 0.45)
GRADE_CHOICES = (4, 5)


def colourise(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8 through a three-stop colour map (piecewise linear in intensity)."""
    t = gray.astype(np.float32) / 255.0 * (len(_COLOUR_STOPS) - 1)  # (H, W) in [0, 2]
    low = np.clip(np.floor(t).astype(int), 0, len(_COLOUR_STOPS) - 2)
    frac = (t - low)[..., None]
    rgb = _COLOUR_STOPS[low] * (1 - frac) + _COLOUR_STOPS[low + 1] * frac  # (H, W, 3)
    return np.round(rgb * 255).astype(np.uint8)


def grade_of(labels: dict, grades: int) -> int:
    """A phantom's label on a ``grades``-level scale: its own grade (4) or its height loss binned (5)."""
    if grades == 4:
        return int(labels["grade"])
    return int(np.digitize(labels["height_loss"], FIVE_GRADE_EDGES))


def write_phantom_npz(path: str | Path, size: int = 32, counts: Sequence[int] = (1024, 128, 128), seed: int = 0,
                      rgb: bool = True, grades: int = 4) -> Path:
    """Write phantoms with their grade (0-3, or 0-4 with ``grades=5``) as a MedMNIST-layout npz (atomically);
    returns the path."""
    if len(counts) != 3 or min(counts) < 1:
        raise ValueError(f"counts={list(counts)}: need three positive numbers (train, val, test)")
    if grades not in GRADE_CHOICES:
        raise ValueError(f"grades={grades}: choose one of {list(GRADE_CHOICES)}")
    arrays: dict[str, np.ndarray] = {}
    for index, (split, n) in enumerate(zip(SPLITS, counts, strict=True)):
        split_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        samples = list(generate_phantoms(n, size, split_seed, key_prefix=f"npz-{split}"))
        images = np.stack([colourise(s.image) if rgb else s.image for s in samples])  # (N, H, W[, 3])
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.array([[grade_of(s.labels, grades)] for s in samples], dtype=np.int64)  # (N, 1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--counts", type=int, nargs=3, default=[1024, 128, 128], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rgb", action="store_true", help="colour images (N, H, W, 3) instead of grey")
    parser.add_argument("--grades", type=int, choices=GRADE_CHOICES, default=4,
                        help="levels of the 'grade' label: 4 (the phantoms' own) or 5 (height loss binned finer)")
    args = parser.parse_args(argv)
    path = write_phantom_npz(args.out, args.size, args.counts, args.seed, args.rgb, args.grades)
    print(f"{path}: {sum(args.counts)} phantoms, {'RGB' if args.rgb else 'grey'} {args.size} px, label 'grade' "
          f"0-{args.grades - 1}")
    return path


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
