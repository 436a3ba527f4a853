"""The field's measures of CEs on images with several findings (the chest X-ray phantoms): pure functions.

An oracle that scores every finding gives, per image, probabilities (B, K) on the input and on its CE. From
those and the renderer's true CEs (``harness.data.cxr_render.render_counterfactual``: the same patient, exposure
and noise with one finding at a new grade):

- :func:`changed_other_findings` (MNAC-like): how many findings other than the target the oracle sees change;
- :func:`target_confidence_gain` (COUT-like): how much the oracle's confidence moves towards the target;
- :func:`truth_errors_by_finding`: the CE's error against the true CE, per target finding, beside the input's;
- :func:`finding_rows`: all of them per target finding, with 95 % bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from harness.method.metrics import bootstrap_interval, interval_below, median_difference


def _probabilities(p_input: Any, p_ce: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(p_input, dtype=np.float64), np.asarray(p_ce, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"oracle probabilities must both be (B, K), got {a.shape} and {b.shape}")
    if not (np.all((a >= 0) & (a <= 1)) and np.all((b >= 0) & (b <= 1))):
        raise ValueError("oracle probabilities must lie in [0, 1]")
    return a, b


def _targets(target: Any, n: int, k: int) -> np.ndarray:
    index = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,))
    if index.size and (index.min() < 0 or index.max() >= k):
        raise ValueError(f"target finding indices must lie in [0, {k}), got {sorted(set(index.tolist()))[:5]}")
    return index


def changed_other_findings(p_input: Any, p_ce: Any, target: Any, threshold: float = 0.5) -> np.ndarray:
    """Per image (B,): the number of non-target findings whose oracle decision (probability > ``threshold``)
    differs between the input and its CE. ``p_input``, ``p_ce``: (B, K); ``target``: finding index, (B,) or one."""
    a, b = _probabilities(p_input, p_ce)
    index = _targets(target, *a.shape)
    changed = (a > threshold) != (b > threshold)  # (B, K)
    changed[np.arange(a.shape[0]), index] = False
    return changed.sum(axis=1)


def target_confidence_gain(p_input: Any, p_ce: Any, target: Any, present: Any) -> np.ndarray:
    """Per image (B,): the oracle's confidence gain for the CE's aim on the target finding: P(finding) of the CE
    minus the input's where the CE should show it (``present`` 1), the reverse where it should remove it (0)."""
    a, b = _probabilities(p_input, p_ce)
    index = _targets(target, *a.shape)
    rows = np.arange(a.shape[0])
    sign = np.where(np.broadcast_to(np.asarray(present), (a.shape[0],)).astype(bool), 1.0, -1.0)
    return sign * (b[rows, index] - a[rows, index])


def _l1_per_image(a: Tensor, b: Tensor) -> np.ndarray:
    return (a.double() - b.double()).abs().flatten(1).mean(dim=1).cpu().numpy()  # (B,)


def truth_errors_by_finding(x: Tensor, x_ce: Tensor, true_ce: Tensor, findings: Sequence[str]) -> dict[str, dict]:
    """Per target finding: mean |CE - true CE| and mean |input - true CE| of each of its images (numpy (n,)).
    ``x``, ``x_ce``, ``true_ce``: (B, C, H, W) in one range; ``findings``: the target finding of each image."""
    if not x.shape == x_ce.shape == true_ce.shape or len(findings) != x.shape[0]:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, x_ce {tuple(x_ce.shape)}, true_ce "
                         f"{tuple(true_ce.shape)}, {len(findings)} findings")
    ce_error, input_error = _l1_per_image(x_ce, true_ce), _l1_per_image(x, true_ce)
    names = np.asarray(findings)
    return {name: {"ce_error": ce_error[names == name], "input_error": input_error[names == name]}
            for name in dict.fromkeys(findings)}


def finding_rows(x: Tensor, x_ce: Tensor, true_ce: Tensor, findings: Sequence[str], finding_names: Sequence[str],
                 p_input: Any, p_ce: Any, present: Any, threshold: float = 0.5) -> list[dict[str, Any]]:
    """One report row per target finding: the oracle's flip rate for the target (MNAC's partner), the number of
    other findings it sees change (MNAC-like, mean), the confidence gain for the target (COUT-like, mean), the
    median error against the true CE beside the input's; each with a 95 % bootstrap interval over images and
    ``closer_than_input_holds`` only where the paired interval of the error difference lies below 0.

    ``finding_names``: the oracle's K outputs in order; ``findings``: each image's target finding (one of them);
    ``present`` (B,): 1 where the CE should show the finding, 0 where it should remove it."""
    names = list(finding_names)
    unknown = sorted(set(findings) - set(names))
    if unknown:
        raise ValueError(f"target findings {unknown} are not among the oracle's outputs {names}")
    index = np.asarray([names.index(f) for f in findings], dtype=np.int64)
    a, b = _probabilities(p_input, p_ce)
    present = np.asarray(present).reshape(-1).astype(bool)
    flipped = (b[np.arange(len(index)), index] > threshold) == present
    others = changed_other_findings(a, b, index, threshold)
    gain = target_confidence_gain(a, b, index, present)
    errors = truth_errors_by_finding(x, x_ce, true_ce, findings)
    rows = []
    for name in dict.fromkeys(findings):
        keep = np.asarray(findings) == name
        ce_error, input_error = errors[name]["ce_error"], errors[name]["input_error"]
        gap = bootstrap_interval(ce_error, input_error, statistic=median_difference)
        rows.append({
            "finding": name, "n": int(keep.sum()),
            "oracle_flip": float(flipped[keep].mean()), "oracle_flip_ci": list(bootstrap_interval(flipped[keep])),
            "other_findings_changed": float(others[keep].mean()),
            "other_findings_changed_ci": list(bootstrap_interval(others[keep])),
            "target_confidence_gain": float(gain[keep].mean()),
            "target_confidence_gain_ci": list(bootstrap_interval(gain[keep])),
            "median_error_true": float(np.median(ce_error)), "median_input_error_true": float(np.median(input_error)),
            "error_minus_input_ci": list(gap), "closer_than_input_holds": interval_below(gap, 0.0),
        })
    return rows

