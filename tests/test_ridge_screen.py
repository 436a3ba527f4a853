"""The closed-form ridge screen: every finding and every penalty from one factorisation, equal to scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from harness.method.ridge_screen import c_of_alpha, ridge_all, screen

ALPHAS = (0.01, 1.0, 100.0, 1e4)


def _latents(n: int = 600, d: int = 48, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, size=d) + rng.normal(size=d)  # (N, D), uneven scales
    targets = {}
    for k, name in enumerate(("edema", "effusion", "cardiomegaly")):
        score = z[:, k] / z[:, k].std() + 0.8 * rng.normal(size=n)
        y = (score > np.quantile(score, 0.7 - 0.1 * k)).astype(np.float64)
        if name == "effusion":  # uncertain labels left out of fitting: this finding uses its own rows
            y[rng.random(n) < 0.15] = np.nan
        targets[name] = y
    return z, targets


def test_every_finding_and_alpha_equals_scikit_learn_ridge():
    z, targets = _latents()
    solutions = ridge_all(z, targets, ALPHAS)
    for name, y in targets.items():
        rows = np.isfinite(y)
        for k, alpha in enumerate(ALPHAS):
            reference = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(z[rows], y[rows])
            np.testing.assert_allclose(solutions[name].weights[k], reference.coef_, rtol=0, atol=1e-6,
                                       err_msg=f"{name} alpha={alpha}")
            assert abs(solutions[name].bias[k] - reference.intercept_) < 1e-6
        assert solutions[name].n_rows == int(rows.sum())


def test_decision_is_the_signed_distance_to_the_half_level_set():
    z, targets = _latents(n=200, d=8)
    solution = ridge_all(z, {"edema": targets["edema"]}, (1.0,))["edema"]
    w, b = solution.weights[0], solution.bias[0]
    moved = z[:5] + 0.3 * w / np.linalg.norm(w)  # a step of 0.3 along the unit normal
    np.testing.assert_allclose(solution.decision(moved)[0] - solution.decision(z[:5])[0], 0.3, atol=1e-9)
    np.testing.assert_allclose(solution.decision(z[:5])[0], (z[:5] @ w + b - 0.5) / np.linalg.norm(w), atol=1e-12)


def test_screen_ranks_by_validation_auc_and_keeps_the_best_few():
    z, targets = _latents(n=900)
    train, val = slice(0, 600), slice(600, 900)
    rows = screen(z[train], {k: v[train] for k, v in targets.items()}, z[val], {k: v[val] for k, v in targets.items()},
                  ALPHAS, keep=2)
    assert [r["finding"] for r in rows] == ["edema", "edema", "effusion", "effusion", "cardiomegaly", "cardiomegaly"]
    for finding in targets:
        mine = [r for r in rows if r["finding"] == finding]
        assert mine[0]["val_auc"] >= mine[1]["val_auc"] and [r["rank"] for r in mine] == [1, 2]
        assert mine[0]["val_auc"] > 0.8  # the finding is linearly readable from its coordinate
        assert mine[0]["C"] == pytest.approx(c_of_alpha(mine[0]["alpha"]))


def test_bad_input_is_refused_with_the_finding_named():
    z, targets = _latents(n=50, d=4)
    with pytest.raises(ValueError, match="'edema'.*both classes"):
        ridge_all(z, {"edema": np.zeros(50)}, (1.0,))
    with pytest.raises(ValueError, match="alphas"):
        ridge_all(z, targets, (0.0,))
    with pytest.raises(ValueError, match="'edema': 49 targets"):
        ridge_all(z, {"edema": targets["edema"][:49]}, (1.0,))
