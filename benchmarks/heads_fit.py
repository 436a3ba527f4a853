"""Fit time of each linear-head kind on a random latents table (default 12,000 x 512, the paper's z_sem size).

    python benchmarks/heads_fit.py            # 12,000 rows; sklearn, plus cuML when it is importable with a GPU
    python benchmarks/heads_fit.py --small    # 2,000 rows, sklearn only (a quick CPU run)

The latents are Gaussian with the label carried by a few directions plus label noise, so the solvers face a
realistic, not perfectly separable, problem. ``fit`` is the estimator's own fit; ``total`` adds standardization,
the mapping back to raw space and the Platt fit, i.e. everything ``harness.method.heads.fit_head`` does.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

from harness.method.heads import HEAD_KINDS, cuda_available, fit_head


def random_latents(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, dim) float32 latents and 0/1 labels (about 30 % positive, 5 % of labels flipped)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, dim)).astype(np.float32)  # (N, D)
    signal = z[:, :8] @ rng.normal(size=8)  # the label lives in 8 of the D directions
    y = (signal > np.quantile(signal, 0.7)).astype(np.int64)
    flip = rng.random(rows) < 0.05
    y[flip] = 1 - y[flip]
    return z, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--kinds", nargs="+", default=list(HEAD_KINDS), choices=HEAD_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="2,000 rows, sklearn only")
    args = parser.parse_args(argv)
    rows = 2_000 if args.small else args.rows
    backends = ["sklearn"]
    if not args.small and importlib.util.find_spec("cuml") is not None and cuda_available():
        backends.append("cuml")

    z, y = random_latents(rows, args.dim, args.seed)
    print(f"{rows} x {args.dim} latents, {int(y.sum())} positive; C={args.C}")
    print(f"{'backend':<8} {'kind':<9} {'fit s':>8} {'total s':>8} {'train AUC':>9}  notes")
    for backend in backends:
        for kind in args.kinds:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                head = fit_head(z, y, kind=kind, C=args.C, backend=backend, random_state=args.seed)
                total = time.perf_counter() - start
            auc = roc_auc_score(y, head.decision(z))
            notes = "; ".join(sorted({type(w.message).__name__ for w in caught}))
            print(f"{backend:<8} {kind:<9} {head.fit_seconds:>8.2f} {total:>8.2f} {auc:>9.3f}  {notes}")


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
