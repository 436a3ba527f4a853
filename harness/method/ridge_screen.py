"""Closed-form ridge heads for every finding and every C at once: the screen that makes findings x C nearly free.

A ridge head on z_sem minimises ``||X_c w - y_c||^2 + alpha ||w||^2`` over the centred latents ``X_c`` (N, D) and
the centred 0/1 targets ``y_c``; the intercept is ``b = mean(y) - mean(X) . w`` (scikit-learn's ``Ridge`` with
``fit_intercept=True``). With the Gram matrix ``G = X_c^T X_c = V diag(s) V^T`` (one (D, D) eigendecomposition)

    w(alpha) = V diag(1 / (s + alpha)) V^T X_c^T y_c                                         (normal equations)

so every finding's ``X_c^T y_c`` (D,) and every alpha cost a (D, D) product, not a new fit. Findings whose labels
are missing on some rows use their own rows: their Gram matrix is the full one minus the missing rows' outer
products (re-centred), so the latents are multiplied out once and each distinct row mask costs only its missing
rows and one (D, D) eigendecomposition.

The screen ranks (finding, alpha) by validation AUC of the signed distance; the best few are then refitted with
the SVM / logistic heads (``harness.method.heads``). ``alpha`` is reported as ``C = 1 / (2 alpha)``, the C of a
squared-loss SVM with the same penalty, so the screen's grid reads like the heads' C grid.

numpy only. 14 findings x 20 penalties on 166k x 512 latents: see ``benchmarks/heads_screen.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from harness.method.metrics import detection_metrics


@dataclass(frozen=True, eq=False)
class RidgeSolutions:
    """Ridge heads of one finding for a grid of penalties: ``weights[k]`` (D,) and ``bias[k]`` for ``alphas[k]``."""

    finding: str
    alphas: np.ndarray  # (K,)
    weights: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    n_rows: int

    def decision(self, z: np.ndarray) -> np.ndarray:
        """(N, D) latents -> (K, N) signed distances ``(z . w + b - 0.5) / ||w||`` to each head's 0.5 level set."""
        raw = z @ self.weights.T + self.bias[None, :] - 0.5  # (N, K)
        norms = np.linalg.norm(self.weights, axis=1)  # (K,)
        return (raw / np.where(norms > 0, norms, 1.0)[None, :]).T


@dataclass(frozen=True, eq=False)
class _Factorisation:
    mean: np.ndarray  # (D,) mean of the rows' latents
    eigenvalues: np.ndarray  # (D,) of the centred Gram matrix
    eigenvectors: np.ndarray  # (D, D)


class _GramSums:
    """Sums over all rows, about a pivot (the overall mean, so that centring later loses no precision):
    ``S = sum (x - p)`` (D,) and ``Q = sum (x - p)(x - p)^T`` (D, D). A row subset's centred Gram matrix is
    ``Q_R - S_R S_R^T / n_R`` with ``Q_R = Q - Q_missing``: only the missing rows are read again."""

    def __init__(self, z: np.ndarray) -> None:
        self.z = z
        self.pivot = z.mean(axis=0, dtype=np.float64)  # (D,)
        shifted = z.astype(np.float64) - self.pivot  # (N, D)
        self.sum, self.outer, self.n = shifted.sum(axis=0), shifted.T @ shifted, len(z)

    def factorise(self, rows: np.ndarray) -> _Factorisation:
        missing = self.z[~rows].astype(np.float64) - self.pivot  # (N - n, D)
        n = self.n - len(missing)
        s = self.sum - missing.sum(axis=0)
        gram = self.outer - missing.T @ missing - np.outer(s, s) / n  # centred Gram of the rows, (D, D)
        eigenvalues, eigenvectors = np.linalg.eigh(gram)
        return _Factorisation(self.pivot + s / n, np.clip(eigenvalues, 0.0, None), eigenvectors)


def ridge_all(z: np.ndarray, targets: Mapping[str, np.ndarray], alphas: Sequence[float]) -> dict[str, RidgeSolutions]:
    """Ridge heads for every finding in ``targets`` (name -> (N,) 0/1 with NaN = not used) and every alpha.

    ``z`` is (N, D). Findings sharing a row mask share one factorisation of the Gram matrix.
    """
    z = np.asarray(z)
    alphas = np.asarray(alphas, dtype=np.float64)  # (K,)
    if z.ndim != 2 or not len(alphas) or (alphas <= 0).any() or not np.isfinite(alphas).all():
        raise ValueError("ridge_all needs (N, D) latents and a non-empty grid of finite alphas > 0")
    sums = _GramSums(z)  # one pass over every row; each row mask then costs only its missing rows
    factorisations: dict[bytes, _Factorisation] = {}
    out = {}
    for name, y in targets.items():
        y = np.asarray(y, dtype=np.float64).reshape(-1)  # (N,)
        if len(y) != len(z):
            raise ValueError(f"finding {name!r}: {len(y)} targets for {len(z)} latents")
        rows = np.isfinite(y)
        if rows.sum() < 2 or len(np.unique(y[rows])) < 2:
            raise ValueError(f"finding {name!r}: needs rows of both classes, has {np.unique(y[rows]).tolist()}")
        key = np.packbits(rows).tobytes()
        if key not in factorisations:
            factorisations[key] = sums.factorise(rows)
        f = factorisations[key]
        y_rows = y[rows]
        y_mean = y_rows.mean()
        xty = (z[rows].astype(np.float64) - f.mean).T @ (y_rows - y_mean)  # (D,) X_c^T y_c
        projected = f.eigenvectors.T @ xty  # (D,) V^T X_c^T y_c
        shrink = 1.0 / (f.eigenvalues[None, :] + alphas[:, None])  # (K, D)
        weights = (shrink * projected[None, :]) @ f.eigenvectors.T  # (K, D)
        bias = y_mean - weights @ f.mean  # (K,)
        out[name] = RidgeSolutions(name, alphas, weights, bias, int(rows.sum()))
    return out


def c_of_alpha(alpha: np.ndarray | float) -> np.ndarray | float:
    """The C of the squared-loss SVM with the same penalty as ridge's alpha: ``C = 1 / (2 alpha)``."""
    return 1.0 / (2.0 * np.asarray(alpha)) if isinstance(alpha, np.ndarray) else 1.0 / (2.0 * alpha)


def screen(z_train: np.ndarray, train_targets: Mapping[str, np.ndarray], z_val: np.ndarray,
           val_targets: Mapping[str, np.ndarray], alphas: Sequence[float], keep: int = 3) -> list[dict]:
    """Rank every (finding, alpha) by validation AUC; rows of the best ``keep`` per finding, best first.

    Each row: finding, alpha, C (``c_of_alpha``), val AUC, and the rank within its finding.
    """
    solutions = ridge_all(z_train, train_targets, alphas)
    rows = []
    for name, solution in solutions.items():
        y_val = np.asarray(val_targets[name], dtype=np.float64)
        used = np.isfinite(y_val)
        distances = solution.decision(np.asarray(z_val)[used])  # (K, n_val)
        scored = []
        for k, alpha in enumerate(solution.alphas):
            auc = detection_metrics(y_val[used].astype(np.int64), distances[k])["auc"]
            scored.append({"finding": name, "alpha": float(alpha), "C": float(c_of_alpha(float(alpha))),
                           "val_auc": float(auc), "train_rows": solution.n_rows})
        scored.sort(key=lambda row: (-np.nan_to_num(row["val_auc"], nan=-1.0), row["alpha"]))
        rows += [{**row, "rank": rank} for rank, row in enumerate(scored[:keep], start=1)]
    return rows
