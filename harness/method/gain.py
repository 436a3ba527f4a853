"""The realisation gain of a counterfactual direction: how far to move z_sem so that the *image* moves as asked.

A DAE that is not fully trained realises only part of a latent move in the decoded image (decode, re-encode: the
signed distance moves a fraction of the way). :func:`calibrate_gain` measures, on *training* images, the gain per
side of the boundary that makes the re-encoded binary CE land where the reflection points (or cross with a
requested share); :class:`~harness.method.directions.Direction` carries it and every move of the engine
(:mod:`harness.method.counterfactual`) applies it. Test images are never used.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.method.counterfactual import Autoencoder, Encoded, reflect, render_counterfactuals, to_numpy
from harness.method.directions import Direction, signed_distance
from harness.method.probes import realised_fraction

if TYPE_CHECKING:
    from harness.method.heads import FittedHead

CROSSING_FRACTION = 0.55  # calibrate_gain's validity target: a CE crosses with margin (f = 1/2: on the boundary)


def check_gain_validity(validity: float | None) -> None:
    """``counterfactual.gain_validity``: a share in (0, 1), or None (aim at the mirror image)."""
    if validity is not None and not 0.0 < validity < 1.0:
        raise ValueError(f"counterfactual.gain_validity must lie in (0, 1) or be null, got {validity}")


@torch.no_grad()
def _reencoded_fractions(ae: Autoencoder, encoded: Encoded, head: FittedHead, direction: Direction,
                         gain: tuple[float, float], dist: np.ndarray) -> np.ndarray:
    """Realised fraction of every image's 1x reflection along ``direction`` with ``gain`` (per side). (B,)"""
    x_ce = render_counterfactuals(ae, encoded, reflect(encoded.z, head.hyperplane, replace(direction, gain=gain)))
    reached = to_numpy(signed_distance(ae.encode(x_ce).double(), head.hyperplane))  # (B,)
    return realised_fraction(dist, -dist, reached)


def _crossing_share(fraction: np.ndarray, rows: np.ndarray) -> float:
    """Share of ``rows`` whose CE crossed the boundary with margin (realised fraction >= CROSSING_FRACTION)."""
    return float(np.mean(fraction[rows] >= CROSSING_FRACTION)) if rows.any() else float("nan")


def _gain_onto_mirror(ae: Autoencoder, encoded: Encoded, head: FittedHead, direction: Direction, dist: np.ndarray,
                      sides: dict[int, np.ndarray], bounds: tuple[float, float], rounds: int) -> dict[str, Any]:
    """Per side, the gain that lands the median re-encoded CE on the mirror image: ``rounds`` times, divide the
    gain by the median realised fraction (the upper bound where the moves are not realised at all)."""
    gain, history = [1.0, 1.0], []
    for _ in range(rounds):
        fraction = _reencoded_fractions(ae, encoded, head, direction, (gain[0], gain[1]), dist)
        gain_in, medians = list(gain), []
        for side, rows in sides.items():
            defined = fraction[rows & np.isfinite(fraction)]
            median = float(np.median(defined)) if defined.size else float("nan")
            medians.append(median)
            gain[side] = bounds[1] if not median > 0 else float(np.clip(gain[side] / median, *bounds))
        history.append({"gain_in": gain_in, "realised_median": medians})
    return {"gain": gain, "rounds": history}


def _search_gain_for_validity(ae: Autoencoder, encoded: Encoded, head: FittedHead, direction: Direction,
                              dist: np.ndarray, sides: dict[int, np.ndarray], validity: float,
                              bounds: tuple[float, float], ratio: float, refine: int) -> dict[str, Any]:
    """Per side, the smallest gain at which a share ``validity`` of the CEs crosses: a geometric grid over
    ``bounds`` (step ``ratio``), then ``refine`` bisections (in log gain) below the first grid gain that passes.
    A side that no grid gain brings to the share gets the gain of its best share, and ``reached`` says so."""
    steps = int(np.floor(np.log(bounds[1] / bounds[0]) / np.log(ratio) + 1e-9))
    grid = [bounds[0] * ratio**k for k in range(steps + 1)]
    grid += [bounds[1]] if grid[-1] < bounds[1] * (1 - 1e-9) else []
    shares: dict[int, list[float]] = {0: [], 1: []}
    passed: dict[int, int] = {}  # side -> index of its first passing grid gain
    for index, g in enumerate(grid):  # walk up until every side with images has passed
        fraction = _reencoded_fractions(ae, encoded, head, direction, (g, g), dist)
        for side, rows in sides.items():
            shares[side].append(_crossing_share(fraction, rows))
            if side not in passed and shares[side][-1] >= validity:
                passed[side] = index
        if all(side in passed or not rows.any() for side, rows in sides.items()):
            break
    gain, low = [bounds[1], bounds[1]], [bounds[0], bounds[0]]
    for side, rows in sides.items():
        if side in passed:
            gain[side] = grid[passed[side]]
            low[side] = grid[passed[side] - 1] if passed[side] > 0 else gain[side]
        elif rows.any():  # unreachable share: the grid gain of the best share (the first, if tied)
            gain[side] = grid[int(np.nanargmax(shares[side]))]
    for _ in range(refine if passed else 0):  # bisect [failing, passing] of both sides in one render
        middle = [float(np.sqrt(low[s] * gain[s])) if s in passed and low[s] < gain[s] else gain[s] for s in (0, 1)]
        fraction = _reencoded_fractions(ae, encoded, head, direction, (middle[0], middle[1]), dist)
        for side in passed:
            if _crossing_share(fraction, sides[side]) >= validity:
                gain[side] = middle[side]
            else:
                low[side] = middle[side]
    return {"gain": [float(g) for g in gain], "grid": [float(g) for g in grid[: len(shares[0])]],
            "crossing_share": [shares[0], shares[1]], "reached": [side in passed for side in (0, 1)]}


@torch.no_grad()
def calibrate_gain(ae: Autoencoder, encoded: Encoded, head: FittedHead, direction: Direction, *, rounds: int = 2,
                   bounds: tuple[float, float] = (0.25, 16.0), validity: float | None = None,
                   ratio: float = 2.0**0.5, refine: int = 2) -> tuple[Direction, dict[str, Any]]:
    """Measure the realisation gain of ``direction`` on a batch of *training* images (see
    :mod:`harness.method.directions`): ``direction`` with ``gain`` set, and what was measured.

    Default (``validity`` None), aimed at the mirror image: each of ``rounds`` renders the binary CE (reflection,
    1x) of every image with the current gain, re-encodes it and divides each side's gain by the median realised
    fraction of the images starting on that side, so that the re-encoded CE lands on ``-dist``; two rounds absorb
    most of the decoder's non-linearity. A side whose moves are not realised at all (median <= 0, or no image on
    it) gets the upper bound: the returned info says so, and CEs from that side stay invalid however far they move.

    ``validity`` = q in (0, 1) asks for less: per side, the smallest gain at which a share q of the CEs crosses
    the boundary with margin (realised fraction >= ``CROSSING_FRACTION``: a move realised to a fraction f lands at
    ``dist (1 - 2 f)``, past the boundary by a tenth of the distance at 0.55). It is *searched*, not extrapolated
    from one render: a geometric grid of gains (step ``ratio``) over ``bounds``, then ``refine`` bisections. A
    decoder's response is not linear in the move and need not be monotonic (moves far enough leave the images'
    manifold and re-encode on the side they started from; measured on PneumoniaMNIST, ``benchmarks/RESULTS.md``),
    so a side that reaches the share at no gain gets the gain of its best share and ``info["reached"]`` says so.
    Such CEs stop short of the mirror image and change the input less. Test images are never used.
    """
    if rounds < 1:
        raise ValueError(f"calibrate_gain: rounds must be >= 1, got {rounds}")
    if not ratio > 1.0 or refine < 0:
        raise ValueError(f"calibrate_gain: needs ratio > 1 and refine >= 0, got ratio={ratio}, refine={refine}")
    check_gain_validity(validity)
    dist = to_numpy(signed_distance(encoded.z.double(), head.hyperplane))  # (B,)
    sides = {0: dist < 0, 1: dist >= 0}
    if validity is None:
        found = _gain_onto_mirror(ae, encoded, head, direction, dist, sides, bounds, rounds)
        target = "the mirror image (-dist)"
    else:
        found = _search_gain_for_validity(ae, encoded, head, direction, dist, sides, validity, bounds, ratio, refine)
        target = f"{validity:.0%} of CEs crossing"
    gain = found["gain"]
    info = {**found, "n_images": [int(rows.sum()) for rows in sides.values()],
            "at_bound": [g in bounds for g in gain], "target": target}
    return replace(direction, gain=(gain[0], gain[1]), info={**direction.info, "gain_target": target}), info
