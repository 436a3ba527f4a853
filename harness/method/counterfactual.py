"""Counterfactual explanations by moving the semantic latent across a linear head's hyperplane.

Atad et al., Sections 3.2-3.3. A Diffusion Autoencoder (DAE) encodes an image ``x`` to a semantic latent
``z_sem`` and, by deterministic DDIM inversion, to a stochastic code ``x_T`` that holds everything ``z_sem``
does not (texture, exact position). A linear head on ``z_sem`` is a hyperplane ``(n, b)`` with signed distance
``dist = (n.w + b) / ||n||``. A counterfactual keeps ``x_T`` and moves only ``z_sem`` along ``n / ||n||``:

- binary, by reflection (Eq. 4): ``w_ce = w - 2 * dist * n / ||n||`` lands at ``-dist``, the other class;
- grade-targeted: the calibration maps distance -> grade; its inverse gives the target distance ``d*`` and
  ``w_ce = w + (d* - dist) * n / ||n||``;
- progression strips: latents at the distances of grades ``g_min - 1 .. g_max + 1`` decoded with the image's
  own ``x_T`` (the outer two grades are illustrative extrapolations, as in the paper's figures).

Every move takes an optional :class:`~harness.method.directions.Direction` (``pattern``, ``normal_subspace``,
``mean_diff``; None = the paper's unit normal) and lands exactly on the same target distance whatever the
direction. One batch is encoded and inverted once (:func:`encode_for_counterfactuals`) and shared by every
direction, move size and grade. Rendering is ``decode`` (the paper: decode ``(z_ce, x_T)``), ``residual``
(the input plus ``decode(z_ce, x_T) - decode(z, x_T)``, so reconstruction error does not count as change) or
``local`` (the residual change kept only where it concentrates, :func:`local_change_mask`: a small DAE spreads
faint edits over the whole image besides the one that matters, and those make a CE farther from the truth).

The latent arithmetic works on numpy arrays and torch tensors alike; the image-level functions take any object
satisfying :class:`Autoencoder` and a fitted head from ``harness.method.heads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from harness.method.directions import Direction, direction_name, move_along, signed_distance
from harness.method.metrics import l1_proximity, validity_rate
from harness.method.probes import realised_fraction, realised_fraction_summary, truth_errors

if TYPE_CHECKING:  # only for annotations: the head module is not needed to move latents
    from harness.method.heads import Calibration, FittedHead, Hyperplane

LatentT = TypeVar("LatentT", np.ndarray, Tensor)


class Autoencoder(Protocol):
    """What the counterfactual code needs from a Diffusion Autoencoder."""

    def encode(self, x: Tensor) -> Tensor:
        """Semantic latent: (B, C, H, W) in [-1, 1] -> (B, D)."""
        ...

    def invert(self, x: Tensor, z: Tensor, steps: int) -> Tensor:
        """Deterministic DDIM inversion to the stochastic code x_T, (B, C, H, W)."""
        ...

    def decode(self, z: Tensor, x_T: Tensor, steps: int) -> Tensor:
        """DDIM decoding of (z, x_T) to an image (B, C, H, W) in [-1, 1]."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Latent arithmetic (no autoencoder needed).
# ---------------------------------------------------------------------------------------------------------


def move_to_distance(z: LatentT, hyperplane: Hyperplane, target_distance: float | np.ndarray | Tensor,
                     direction: Direction | None = None) -> LatentT:
    """Move latents (..., D) so that their signed distance equals ``target_distance`` exactly.

    Along the unit normal (``direction=None``, the paper): ``w_ce = w + (d* - dist) * n / ||n||``, which leaves
    the component of ``w`` orthogonal to ``n`` untouched. Along another :class:`~harness.method.directions.Direction`
    ``v`` the step is rescaled by ``||n|| / (n . v)`` so the landing distance is the same.
    """
    return move_along(z, hyperplane, direction, target_distance)


def reflect(z: LatentT, hyperplane: Hyperplane, direction: Direction | None = None,
            move_size: float = 1.0) -> LatentT:
    """Binary counterfactual: dist -> -dist (paper Eq. 4); ``move_size`` m moves m times as far: (1 - 2m) dist."""
    dist = signed_distance(z, hyperplane)
    return move_to_distance(z, hyperplane, dist * (1.0 - 2.0 * float(move_size)), direction)


def _distance_for_grade(calibration: Calibration, grade: float) -> float:
    return float(np.asarray(calibration.distance_for_grade(grade), dtype=np.float64).reshape(-1)[0])


def to_grade(z: LatentT, hyperplane: Hyperplane, calibration: Calibration, grade: float,
             direction: Direction | None = None) -> LatentT:
    """Move latents to the distance the calibration assigns to ``grade`` (the inverse of distance -> grade)."""
    return move_to_distance(z, hyperplane, _distance_for_grade(calibration, grade), direction)


def default_grades(calibration: Calibration) -> list[int]:
    """Grades g_min - 1 .. g_max + 1: the observed range plus one illustrative grade beyond each end."""
    return list(range(int(calibration.grade_min) - 1, int(calibration.grade_max) + 2))


def progression_latents(z: LatentT, hyperplane: Hyperplane, calibration: Calibration,
                        grades: Sequence[float], direction: Direction | None = None) -> LatentT:
    """One latent (D,) moved to each grade's calibrated distance -> (G, D), in the order of ``grades``."""
    if z.ndim != 1:
        raise ValueError(f"progression_latents takes one latent of shape (D,), got shape {tuple(z.shape)}")
    targets = np.asarray(calibration.distance_for_grade(np.asarray(grades, dtype=np.float64)),
                         dtype=np.float64).reshape(-1)  # (G,)
    if targets.shape[0] != len(grades):
        raise ValueError(f"calibration returned {targets.shape[0]} distances for {len(grades)} grades")
    stacked = z[None].repeat(len(grades), 1) if isinstance(z, Tensor) else np.repeat(z[None], len(grades), 0)
    return move_to_distance(stacked, hyperplane, targets, direction)  # (G, D)


# ---------------------------------------------------------------------------------------------------------
# Image-level counterfactuals through the autoencoder.
# ---------------------------------------------------------------------------------------------------------


RENDERS = ("decode", "residual", "local")
LOCAL_THRESHOLD = 0.2  # benchmarks/RESULTS.md, "Localised rendering" (the threshold table) and "nano-32"


def _check_local_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"counterfactual.local_threshold must lie in (0, 1), got {threshold}")


CROSSING_FRACTION = 0.55  # calibrate_gain's validity target: a CE crosses with margin (f = 1/2: on the boundary)


def _check_gain_validity(validity: float | None) -> None:
    if validity is not None and not 0.0 < validity < 1.0:
        raise ValueError(f"counterfactual.gain_validity must lie in (0, 1) or be null, got {validity}")


def local_change_mask(change: Tensor, threshold: float = LOCAL_THRESHOLD) -> Tensor:
    """Where a decoded change concentrates: (B, C, H, W) -> soft mask (B, 1, H, W) in [0, 1].

    Per image, the change's size ``s = mean_c |change|`` relative to its largest value ``r = s / max(s)``; the
    mask is 0 below ``threshold``, rises linearly and is 1 from halfway between ``threshold`` and 1. Only the
    model's own change decides (no label, no truth), so the same rule serves any image. An image that does not
    change at all gets an all-zero mask.
    """
    _check_local_threshold(threshold)
    size = change.abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    peak = size.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)  # (B, 1, 1, 1)
    ramp = (1.0 - threshold) / 2.0
    return ((size / peak - threshold) / ramp).clamp(0.0, 1.0)


@dataclass
class CounterfactualBatch:
    """Inputs, codes and counterfactuals of one batch.

    ``kind`` is ``"binary"`` (``target`` = the class the head should now predict) or ``"grade"`` (``target`` =
    the requested grade). ``target_distance`` is the signed distance ``z_ce`` was moved to; ``direction`` the
    name of the direction it moved along, ``move_size`` the multiple of the reflection's move (binary only).
    """

    kind: str
    x: Tensor  # (B, C, H, W) inputs in [-1, 1]
    z: Tensor  # (B, D) semantic latents
    x_T: Tensor  # (B, C, H, W) stochastic codes from DDIM inversion
    dist: np.ndarray  # (B,) signed distance of z
    z_ce: Tensor  # (B, D) moved latents
    x_ce: Tensor  # (B, C, H, W) counterfactuals
    target: np.ndarray  # (B,) target class (binary) or grade (grade)
    target_distance: np.ndarray  # (B,) signed distance of z_ce
    direction: str = "normal"
    move_size: float = 1.0

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_numpy(t: Tensor) -> np.ndarray:
    """numpy copy on the CPU; half precisions widened to float32 (numpy has no bfloat16)."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.cpu().numpy()


def _as_batch(x: Tensor) -> Tensor:
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x


@dataclass
class Encoded:
    """A batch encoded once and shared by every counterfactual made from it (all directions, sizes, grades).

    ``recon`` is the decode of the unchanged latent, needed by the ``residual`` and ``local`` renderings;
    ``local_threshold`` is the ``local`` rendering's :func:`local_change_mask` threshold.
    """

    x: Tensor  # (B, C, H, W)
    z: Tensor  # (B, D)
    x_T: Tensor  # (B, C, H, W)
    decode_steps: int
    render: str = "decode"
    recon: Tensor | None = None  # (B, C, H, W)
    local_threshold: float = LOCAL_THRESHOLD

    def select(self, rows: Tensor | slice) -> Encoded:
        """The same encoding for rows ``rows`` (a boolean mask, indices or a slice) only."""
        return Encoded(self.x[rows], self.z[rows], self.x_T[rows], self.decode_steps, self.render,
                       None if self.recon is None else self.recon[rows], self.local_threshold)


@torch.no_grad()
def encode_for_counterfactuals(ae: Autoencoder, x: Tensor, invert_steps: int = 250, decode_steps: int = 100,
                               render: str = "decode", local_threshold: float = LOCAL_THRESHOLD) -> Encoded:
    """Encode, invert (and unless ``decode``, reconstruct) a batch once: (B, C, H, W) -> :class:`Encoded`."""
    if render not in RENDERS:
        raise ValueError(f"counterfactual.render: unknown rendering {render!r}; known: {list(RENDERS)}")
    _check_local_threshold(local_threshold)  # before the costly inversion, not at the first render
    x = _as_batch(x)
    z = ae.encode(x)  # (B, D)
    x_T = ae.invert(x, z, steps=invert_steps)  # (B, C, H, W)
    recon = None if render == "decode" else ae.decode(z, x_T.clone(), steps=decode_steps)
    return Encoded(x, z, x_T, decode_steps, render, recon, local_threshold)


@torch.no_grad()
def render_counterfactuals(ae: Autoencoder, encoded: Encoded, z_ce: Tensor, index: Tensor | None = None) -> Tensor:
    """Decode moved latents (M, D) with the x_T of rows ``index`` (default: all rows, M = B) -> (M, C, H, W).

    ``decode`` returns the decode itself (the paper). ``residual`` adds the decoded change to the input,
    ``x + decode(z_ce, x_T) - decode(z, x_T)``: the reconstruction error, identical in both decodes, cancels,
    and what remains is the change the latent move causes. ``local`` keeps that change only where it concentrates,
    ``x + m * change`` with ``m`` = :func:`local_change_mask`. Clipped to [-1, 1].
    """
    index = torch.arange(encoded.x.shape[0]) if index is None else index
    x_T = encoded.x_T[index].clone()  # (M, C, H, W); a real copy, safe for in-place samplers
    decoded = ae.decode(z_ce, x_T, steps=encoded.decode_steps)
    if encoded.render == "decode":
        return decoded
    change = decoded - encoded.recon[index]  # (M, C, H, W)
    if encoded.render == "local":
        change = change * local_change_mask(change, encoded.local_threshold)
    return (encoded.x[index] + change).clamp(-1.0, 1.0)


def _reuse_or_encode(ae: Autoencoder, x: Tensor, encoded: Encoded | None, invert_steps: int, decode_steps: int,
                     render: str) -> Encoded:
    if encoded is not None:
        return encoded
    return encode_for_counterfactuals(ae, x, invert_steps, decode_steps, render)


@torch.no_grad()
def binary_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, invert_steps: int = 250,
                           decode_steps: int = 100, *, direction: Direction | None = None, move_size: float = 1.0,
                           render: str = "decode", encoded: Encoded | None = None) -> CounterfactualBatch:
    """Move each latent across the hyperplane to ``(1 - 2 m) dist`` (m = 1: the reflection of Eq. 4) along
    ``direction`` (None: the unit normal) and render it with the image's own x_T.

    Pass ``encoded`` (from :func:`encode_for_counterfactuals`) to reuse one inversion for many moves.
    """
    enc = _reuse_or_encode(ae, x, encoded, invert_steps, decode_steps, render)
    z_np = _to_numpy(enc.z)
    dist = np.asarray(head.hyperplane.distance(z_np), dtype=np.float64)  # (B,)
    target_distance = dist * (1.0 - 2.0 * float(move_size))
    z_ce = move_to_distance(enc.z, head.hyperplane, torch.as_tensor(target_distance, dtype=enc.z.dtype),
                            direction)  # (B, D)
    x_ce = render_counterfactuals(ae, enc, z_ce)  # (B, C, H, W)
    target = 1 - np.asarray(head.predict(z_np)).astype(np.int64)  # the class the input is not
    return CounterfactualBatch("binary", enc.x, enc.z, enc.x_T, dist, z_ce, x_ce, target, target_distance,
                               direction_name(direction), float(move_size))


@torch.no_grad()
def grade_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, calibration: Calibration,
                          target_grade: float, invert_steps: int = 250, decode_steps: int = 100, *,
                          direction: Direction | None = None, render: str = "decode",
                          encoded: Encoded | None = None) -> CounterfactualBatch:
    """Move each latent to the calibrated distance of ``target_grade`` and render it with the image's own x_T."""
    enc = _reuse_or_encode(ae, x, encoded, invert_steps, decode_steps, render)
    target_distance = _distance_for_grade(calibration, target_grade)  # d*, the inverse calibration
    z_ce = move_to_distance(enc.z, head.hyperplane, target_distance, direction)  # (B, D)
    x_ce = render_counterfactuals(ae, enc, z_ce)  # (B, C, H, W)
    dist = np.asarray(head.hyperplane.distance(_to_numpy(enc.z)), dtype=np.float64)
    target = np.full(enc.x.shape[0], target_grade, dtype=np.float64)
    return CounterfactualBatch("grade", enc.x, enc.z, enc.x_T, dist, z_ce, x_ce, target,
                               np.full(enc.x.shape[0], target_distance), direction_name(direction))


@torch.no_grad()
def distance_strip(ae: Autoencoder, x: Tensor, head: FittedHead, distances: Sequence[float],
                   invert_steps: int = 250, decode_steps: int = 100, *, direction: Direction | None = None,
                   render: str = "decode", encoded: Encoded | None = None) -> Tensor:
    """Render one image with its latent moved to each signed distance of ``distances`` -> (G, C, H, W).

    All frames share the image's own x_T, so only what the direction encodes changes along the strip. The G
    latents go to the autoencoder as one batch.
    """
    enc = _reuse_or_encode(ae, x, encoded, invert_steps, decode_steps, render)
    if enc.x.shape[0] != 1:
        raise ValueError(f"a strip takes one image, got a batch of {enc.x.shape[0]}")
    targets = np.asarray(distances, dtype=np.float64).reshape(-1)  # (G,)
    z_strip = move_to_distance(enc.z.repeat(len(targets), 1), head.hyperplane,
                               torch.as_tensor(targets, dtype=enc.z.dtype), direction)  # (G, D)
    return render_counterfactuals(ae, enc, z_strip, torch.zeros(len(targets), dtype=torch.long))


def progression_strip(ae: Autoencoder, x: Tensor, head: FittedHead, calibration: Calibration,
                      grades: Sequence[float] | None = None, invert_steps: int = 250,
                      decode_steps: int = 100, *, direction: Direction | None = None, render: str = "decode",
                      encoded: Encoded | None = None) -> Tensor:
    """Render one image at every grade of ``grades`` (default g_min-1 .. g_max+1) -> (G, C, H, W), each grade
    at its calibrated distance (the paper's progression strips)."""
    grades = default_grades(calibration) if grades is None else list(grades)
    distances = np.asarray(calibration.distance_for_grade(np.asarray(grades, dtype=np.float64))).reshape(-1)
    return distance_strip(ae, x, head, distances, invert_steps, decode_steps, direction=direction, render=render,
                          encoded=encoded)


@torch.no_grad()
def _reencoded_fractions(ae: Autoencoder, encoded: Encoded, head: FittedHead, direction: Direction,
                         gain: tuple[float, float], dist: np.ndarray) -> np.ndarray:
    """Realised fraction of every image's 1x reflection along ``direction`` with ``gain`` (per side). (B,)"""
    x_ce = render_counterfactuals(ae, encoded, reflect(encoded.z, head.hyperplane, replace(direction, gain=gain)))
    reached = _to_numpy(signed_distance(ae.encode(x_ce).double(), head.hyperplane))  # (B,)
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
    _check_gain_validity(validity)
    dist = _to_numpy(signed_distance(encoded.z.double(), head.hyperplane))  # (B,)
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


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------


def _mean(values: Any) -> float:
    return float(np.mean(_to_numpy(values) if isinstance(values, Tensor) else np.asarray(values)))


@torch.no_grad()
def evaluate_counterfactuals(ae: Autoencoder, batch: CounterfactualBatch, head: FittedHead,
                             calibration: Calibration | None = None, lpips: Any | None = None,
                             true_ce: Tensor | None = None) -> dict[str, float]:
    """Validity, proximity and (when the truth is known) accuracy of a batch of counterfactuals.

    - validity: ``x_ce`` is re-encoded and scored; it is valid when the head now gives the target class
      (binary) or the calibration gives the target grade (grade). ``latent_validity`` scores ``z_ce`` itself,
      so a gap between the two is the autoencoder's, not the head's.
    - proximity: mean L1 (and LPIPS when a metric object is given) between ``x_ce`` and ``x``.
    - ``realised_fraction``: median of (re-encoded distance change) / (intended change); near 0 means the
      decoder ignored the move, whatever the latent validity says.
    - ``true_ce`` (B, C, H, W), e.g. phantoms re-rendered at the target grade with the same nuisance: MAE/MSE
      of ``x_ce`` against it next to those of the unchanged input (the trivial baseline a useful CE must beat),
      the per-CE medians of both, and ``closer_than_input``: the fraction of CEs closer to the truth than
      their input is.
    """
    if batch.kind == "grade" and calibration is None:
        raise ValueError("evaluating grade counterfactuals needs the calibration that chose their targets")
    z_re = _to_numpy(ae.encode(batch.x_ce))  # (B, D)
    z_ce = _to_numpy(batch.z_ce)
    dist_re = np.asarray(head.decision(z_re), dtype=np.float64)  # (B,)
    if batch.kind == "binary":
        pred_re, pred_latent = head.predict(z_re), head.predict(z_ce)
    else:
        pred_re, pred_latent = calibration.grade(dist_re), calibration.grade(head.decision(z_ce))
    out: dict[str, float] = {
        "n": float(len(batch)),
        "validity": float(validity_rate(np.asarray(pred_re), batch.target)),
        "latent_validity": float(validity_rate(np.asarray(pred_latent), batch.target)),
        "dist_input_mean": float(np.mean(batch.dist)),
        "dist_target_mean": float(np.mean(batch.target_distance)),
        "dist_reencoded_mean": float(np.mean(dist_re)),
        "dist_reencoded_error": float(np.mean(np.abs(dist_re - batch.target_distance))),
        # How much of the intended move survives decoding and re-encoding (1 = all of it, 0 = none).
        "realised_fraction": realised_fraction_summary(
            realised_fraction(batch.dist, batch.target_distance, dist_re))["median"],
        "l1": _mean(l1_proximity(batch.x_ce, batch.x)),
    }
    if lpips is not None:
        out["lpips"] = _mean(lpips(batch.x_ce, batch.x))
    if true_ce is not None:
        true_ce = true_ce.to(device=batch.x_ce.device, dtype=batch.x_ce.dtype)
        if true_ce.shape != batch.x_ce.shape:
            raise ValueError(f"true_ce has shape {tuple(true_ce.shape)}, counterfactuals {tuple(batch.x_ce.shape)}")
        errors = truth_errors(batch.x, batch.x_ce, true_ce)
        out["mae_true"] = float((batch.x_ce - true_ce).abs().mean())
        out["mse_true"] = float((batch.x_ce - true_ce).pow(2).mean())
        out["mae_input_vs_true"] = float((batch.x - true_ce).abs().mean())
        out["mse_input_vs_true"] = float((batch.x - true_ce).pow(2).mean())
        out["median_error_true"] = errors["ce_error_median"]
        out["median_input_error_true"] = errors["input_error_median"]
        out["closer_than_input"] = float(errors["closer_than_input"])
    return out
