"""The counterfactual engine: encode once, move z_sem across a linear head's hyperplane, render.

Atad et al., Sections 3.2-3.3. A Diffusion Autoencoder (DAE) encodes an image ``x`` to a semantic latent
``z_sem`` and, by deterministic DDIM inversion, to a stochastic code ``x_T`` that holds everything ``z_sem``
does not (texture, exact position). A linear head on ``z_sem`` is a hyperplane ``(n, b)`` with signed distance
``dist = (n.w + b) / ||n||``. A counterfactual keeps ``x_T`` and moves only ``z_sem`` to a target distance ``d*``
(:func:`move_to_distance`, ``w_ce = w + (d* - dist) * n / ||n||`` along the unit normal):

- binary, by reflection (Eq. 4): ``d* = -dist``, the other class (:func:`mirror_distance`; a move size m moves
  m times as far, ``d* = (1 - 2m) dist``);
- grade-targeted: the calibration maps distance -> grade; its inverse gives ``d*`` (:func:`distance_for_grade`);
- strips: one image at a list of distances, e.g. the calibrated distances of grades ``g_min - 1 .. g_max + 1``
  (the outer two grades are illustrative extrapolations, as in the paper's figures).

:class:`CounterfactualEngine` is the one way the project makes a CE: evaluation, the training probe, the
benchmarks and the served explainer all call it. ``engine.encode(x)`` encodes and inverts a batch once
(:class:`Encoded`); ``binary_move`` / ``grade_move`` / ``distance_move`` move its latents (a :class:`Move`, no
decoding yet); ``render`` decodes any number of moves of one encoding in one batch and returns a
:class:`CounterfactualBatch` per move. ``binary`` / ``to_grade`` / ``strip`` / ``progression`` do both.

Every move takes an optional :class:`~harness.method.directions.Direction` (``pattern``, ``normal_subspace``,
``mean_diff``; None = the paper's unit normal), which may carry a realisation gain (:mod:`harness.method.gain`).
Rendering is ``decode`` (the paper: decode ``(z_ce, x_T)``), ``residual`` (the input plus
``decode(z_ce, x_T) - decode(z, x_T)``, so reconstruction error does not count as change) or ``local`` (the
residual change kept only where it concentrates, :func:`local_change_mask`: a small DAE spreads faint edits over
the whole image besides the one that matters, and those make a CE farther from the truth).

The latent arithmetic works on numpy arrays and torch tensors alike; the engine takes any object satisfying
:class:`Autoencoder` and a fitted head from ``harness.method.heads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from harness.config import CE_RENDERS
from harness.method.directions import Direction, direction_name, move_along, signed_distance

if TYPE_CHECKING:  # only for annotations: the head module is not needed to move latents
    from harness.method.calibration import Calibration
    from harness.method.heads import FittedHead
    from harness.method.hyperplane import Hyperplane

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


def mirror_distance(dist: LatentT | float, move_size: float = 1.0) -> LatentT | float:
    """The binary CE's target distance, paper Eq. 4: ``-dist`` (m = 1); a move size m gives ``(1 - 2m) dist``."""
    return dist * (1.0 - 2.0 * float(move_size))


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
    """Binary counterfactual latents: each z moved to :func:`mirror_distance` of its own distance."""
    return move_to_distance(z, hyperplane, mirror_distance(signed_distance(z, hyperplane), move_size), direction)


def distance_for_grade(calibration: Calibration, grades: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """The inverse calibration: the signed distance of each grade, float64 with the shape of ``grades``."""
    wanted = np.asarray(grades, dtype=np.float64)
    distances = np.asarray(calibration.distance_for_grade(wanted), dtype=np.float64).reshape(wanted.shape)
    return distances


def to_grade(z: LatentT, hyperplane: Hyperplane, calibration: Calibration, grade: float,
             direction: Direction | None = None) -> LatentT:
    """Move latents to the distance the calibration assigns to ``grade`` (the inverse of distance -> grade)."""
    return move_to_distance(z, hyperplane, float(distance_for_grade(calibration, grade)), direction)


def default_grades(calibration: Calibration) -> list[int]:
    """Grades g_min - 1 .. g_max + 1: the observed range plus one illustrative grade beyond each end."""
    return list(range(int(calibration.grade_min) - 1, int(calibration.grade_max) + 2))


def progression_latents(z: LatentT, hyperplane: Hyperplane, calibration: Calibration,
                        grades: Sequence[float], direction: Direction | None = None) -> LatentT:
    """One latent (D,) moved to each grade's calibrated distance -> (G, D), in the order of ``grades``."""
    if z.ndim != 1:
        raise ValueError(f"progression_latents takes one latent of shape (D,), got shape {tuple(z.shape)}")
    targets = distance_for_grade(calibration, list(grades)).reshape(-1)  # (G,)
    stacked = z[None].repeat(len(grades), 1) if isinstance(z, Tensor) else np.repeat(z[None], len(grades), 0)
    return move_to_distance(stacked, hyperplane, targets, direction)  # (G, D)


# ---------------------------------------------------------------------------------------------------------
# Encoding once, rendering.
# ---------------------------------------------------------------------------------------------------------


RENDERS = CE_RENDERS  # the names live in the config layer, which checks them at load
LOCAL_THRESHOLD = 0.2  # benchmarks/RESULTS.md, "Localised rendering" (the threshold table) and "nano-32"


def _check_render(render: str, threshold: float) -> None:
    if render not in RENDERS:
        raise ValueError(f"counterfactual.render: unknown rendering {render!r}; known: {list(RENDERS)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"counterfactual.local_threshold must lie in (0, 1), got {threshold}")


def local_change_mask(change: Tensor, threshold: float = LOCAL_THRESHOLD) -> Tensor:
    """Where a decoded change concentrates: (B, C, H, W) -> soft mask (B, 1, H, W) in [0, 1].

    Per image, the change's size ``s = mean_c |change|`` relative to its largest value ``r = s / max(s)``; the
    mask is 0 below ``threshold``, rises linearly and is 1 from halfway between ``threshold`` and 1. Only the
    model's own change decides (no label, no truth), so the same rule serves any image. An image that does not
    change at all gets an all-zero mask.
    """
    _check_render("local", threshold)
    size = change.abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    peak = size.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)  # (B, 1, 1, 1)
    ramp = (1.0 - threshold) / 2.0
    return ((size / peak - threshold) / ramp).clamp(0.0, 1.0)


def to_numpy(t: Tensor) -> np.ndarray:
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
    _check_render(render, local_threshold)  # before the costly inversion, not at the first render
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


# ---------------------------------------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CounterfactualBatch:
    """Inputs, codes and counterfactuals of one batch.

    ``kind`` is ``"binary"`` (``target`` = the class the head should now predict), ``"grade"`` (``target`` =
    the requested grade) or ``"distance"`` (``target`` = the requested distance, strips). ``source_class`` is
    the head's class of each input; ``target_distance`` the signed distance ``z_ce`` was moved to; ``direction``
    the name of the direction it moved along, ``move_size`` the multiple of the reflection's move (binary only).
    """

    kind: str
    x: Tensor  # (B, C, H, W) inputs in [-1, 1]
    z: Tensor  # (B, D) semantic latents
    x_T: Tensor  # (B, C, H, W) stochastic codes from DDIM inversion
    dist: np.ndarray  # (B,) signed distance of z
    z_ce: Tensor  # (B, D) moved latents
    x_ce: Tensor  # (B, C, H, W) counterfactuals
    target: np.ndarray  # (B,) target class (binary), grade (grade) or distance (distance)
    target_distance: np.ndarray  # (B,) signed distance of z_ce
    direction: str = "normal"
    move_size: float = 1.0
    source_class: np.ndarray | None = None  # (B,) the head's class of x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, keep: Tensor) -> CounterfactualBatch:
        """The rows ``keep`` (a boolean mask or indices) of every per-row field."""
        def rows(value):
            if isinstance(value, Tensor):
                return value[keep]
            if isinstance(value, np.ndarray) and value.ndim > 0:
                return value[keep.cpu().numpy()]
            return value

        return CounterfactualBatch(**{f.name: rows(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Move:
    """Latents of one encoding moved to their targets, not rendered yet: rows ``rows`` of the :class:`Encoded`."""

    kind: str
    rows: Tensor  # (M,) long: the encoded row each moved latent belongs to (its x_T)
    z_ce: Tensor  # (M, D)
    dist: np.ndarray  # (M,) signed distance of the unmoved latents
    target: np.ndarray  # (M,)
    target_distance: np.ndarray  # (M,)
    source_class: np.ndarray  # (M,)
    direction: str
    move_size: float = 1.0


@dataclass(frozen=True)
class CounterfactualEngine:
    """One head's counterfactuals with one autoencoder: how to encode, which direction, how to render.

    ``calibration`` is needed for grade targets only; ``direction`` None moves along the unit normal (the paper).
    Change one setting for a run of moves with :meth:`with_direction` or ``dataclasses.replace``.
    """

    ae: Autoencoder
    head: FittedHead
    calibration: Calibration | None = None
    direction: Direction | None = None
    invert_steps: int = 250
    decode_steps: int = 100
    render: str = "decode"
    local_threshold: float = LOCAL_THRESHOLD

    def __post_init__(self) -> None:
        _check_render(self.render, self.local_threshold)  # a bad rendering fails here, before any inversion

    def with_direction(self, direction: Direction | None) -> CounterfactualEngine:
        return replace(self, direction=direction)

    def encode(self, x: Tensor | Encoded) -> Encoded:
        """Encode and invert images (B, C, H, W) or one image (C, H, W) once; an :class:`Encoded` passes through."""
        if isinstance(x, Encoded):
            return x
        return encode_for_counterfactuals(self.ae, x, self.invert_steps, self.decode_steps, self.render,
                                          self.local_threshold)

    def _moved(self, kind: str, encoded: Encoded, rows: Tensor, target: np.ndarray, target_distance: np.ndarray,
               move_size: float = 1.0) -> Move:
        z = encoded.z[rows]  # (M, D)
        z_np = to_numpy(z)
        dist = np.asarray(self.head.hyperplane.distance(z_np), dtype=np.float64)  # (M,)
        z_ce = move_to_distance(z, self.head.hyperplane, torch.as_tensor(target_distance, dtype=z.dtype),
                                self.direction)  # (M, D)
        source = np.asarray(self.head.predict(z_np)).astype(np.int64)
        return Move(kind, rows, z_ce, dist, target, np.asarray(target_distance, dtype=np.float64), source,
                    direction_name(self.direction), float(move_size))

    def binary_move(self, encoded: Encoded, move_size: float = 1.0) -> Move:
        """Every latent to :func:`mirror_distance` (the reflection of Eq. 4 at m = 1), target: the other class."""
        rows = torch.arange(encoded.z.shape[0])
        dist = np.asarray(self.head.hyperplane.distance(to_numpy(encoded.z)), dtype=np.float64)  # (B,)
        target = 1 - np.asarray(self.head.predict(to_numpy(encoded.z))).astype(np.int64)  # the class x is not
        return self._moved("binary", encoded, rows, target, mirror_distance(dist, move_size), move_size)

    def grade_move(self, encoded: Encoded, grades: float | Sequence[float],
                   rows: Sequence[int] | Tensor | None = None) -> Move:
        """Latents of ``rows`` (default: all) to the calibrated distance of ``grades`` (one, or one per row)."""
        if self.calibration is None:
            raise ValueError("grade counterfactuals need the head's calibration (distance -> grade)")
        rows = torch.arange(encoded.z.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        wanted = np.broadcast_to(np.asarray(grades, dtype=np.float64), (len(rows),))
        if np.ndim(grades) == 0:  # one grade: one inverse calibration, shared by every row
            target_distance = np.full(len(rows), float(distance_for_grade(self.calibration, float(grades))))
        else:
            target_distance = distance_for_grade(self.calibration, wanted)
        return self._moved("grade", encoded, rows, wanted.copy(), target_distance)

    def distance_move(self, encoded: Encoded, distances: Sequence[float] | np.ndarray, row: int = 0) -> Move:
        """One image (row ``row``) moved to every signed distance of ``distances`` (G,): a strip's latents."""
        targets = np.asarray(distances, dtype=np.float64).reshape(-1)  # (G,)
        rows = torch.full((len(targets),), int(row), dtype=torch.long)
        return self._moved("distance", encoded, rows, targets, targets)

    @torch.no_grad()
    def render_moves(self, encoded: Encoded, *moves: Move) -> list[CounterfactualBatch]:
        """Decode every move of ``encoded`` in one autoencoder batch; one :class:`CounterfactualBatch` per move."""
        if not moves:
            return []
        rows = torch.cat([move.rows for move in moves])
        x_ce = render_counterfactuals(self.ae, encoded, torch.cat([move.z_ce for move in moves]), rows)
        out, start = [], 0
        for move in moves:
            end = start + len(move.rows)
            out.append(CounterfactualBatch(move.kind, encoded.x[move.rows], encoded.z[move.rows],
                                           encoded.x_T[move.rows], move.dist, move.z_ce, x_ce[start:end],
                                           move.target, move.target_distance, move.direction, move.move_size,
                                           move.source_class))
            start = end
        return out

    def binary(self, x: Tensor | Encoded, move_size: float = 1.0) -> CounterfactualBatch:
        """Binary CEs of every image: encode (unless given an :class:`Encoded`), reflect, render."""
        encoded = self.encode(x)
        return self.render_moves(encoded, self.binary_move(encoded, move_size))[0]

    def to_grade(self, x: Tensor | Encoded, grade: float | Sequence[float]) -> CounterfactualBatch:
        """Grade-targeted CEs of every image: encode, move to the inverse calibration of ``grade``, render."""
        encoded = self.encode(x)
        return self.render_moves(encoded, self.grade_move(encoded, grade))[0]

    def strip(self, x: Tensor | Encoded, distances: Sequence[float] | np.ndarray) -> Tensor:
        """One image rendered at each signed distance of ``distances`` -> (G, C, H, W), all with its own x_T
        (only what the direction encodes changes along the strip), decoded as one batch."""
        encoded = self.encode(x)
        if encoded.x.shape[0] != 1:
            raise ValueError(f"a strip takes one image, got a batch of {encoded.x.shape[0]}")
        return self.render_moves(encoded, self.distance_move(encoded, distances))[0].x_ce

    def progression(self, x: Tensor | Encoded, grades: Sequence[float] | None = None) -> Tensor:
        """One image at every grade of ``grades`` (default g_min-1 .. g_max+1), each at its calibrated distance
        (the paper's progression strips) -> (G, C, H, W)."""
        if self.calibration is None:
            raise ValueError("a progression strip needs the head's calibration (distance -> grade)")
        grades = default_grades(self.calibration) if grades is None else list(grades)
        return self.strip(x, distance_for_grade(self.calibration, grades).reshape(-1))


def binary_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, invert_steps: int = 250,
                           decode_steps: int = 100, *, direction: Direction | None = None, move_size: float = 1.0,
                           render: str = "decode") -> CounterfactualBatch:
    """Shorthand for ``CounterfactualEngine(ae, head, ...).binary(x, move_size)``."""
    engine = CounterfactualEngine(ae, head, None, direction, invert_steps, decode_steps, render)
    return engine.binary(x, move_size)


def grade_counterfactuals(ae: Autoencoder, x: Tensor, head: FittedHead, calibration: Calibration,
                          target_grade: float, invert_steps: int = 250, decode_steps: int = 100, *,
                          direction: Direction | None = None, render: str = "decode") -> CounterfactualBatch:
    """Shorthand for ``CounterfactualEngine(ae, head, calibration, ...).to_grade(x, target_grade)``."""
    engine = CounterfactualEngine(ae, head, calibration, direction, invert_steps, decode_steps, render)
    return engine.to_grade(x, target_grade)
