"""Seeded sagittal "vertebra" phantoms with an ordinal fracture grade and true counterfactuals.

A phantom is a short stack of vertebral bodies seen from the side: a central body whose height loss follows
a Genant-like grade, two neighbours above and two below (the outer ones cut by the image border), disc gaps
between them, and nuisance variation (position, size, rotation, intensities, trabecular texture, Gaussian
noise, an occasional bright artefact). Everything except the grade lives in :class:`PhantomParams`, so the
same phantom can be re-rendered at any other grade with identical nuisance and identical noise: that is a
true counterfactual against which a generated one can be scored.

Geometry is defined in continuous canvas coordinates ``x, y`` in [-1, 1] (``y`` grows downwards, like
image rows; anterior is to the left). Images are rendered on a fine grid of at least ``_MIN_RENDER_PIXELS``
and box-filtered down, so one phantom looks the same at 32 and at 96 pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# Genant-like semi-quantitative grades: fraction of vertebral height lost, (low, high).
# Grade 0 allows the small natural variation of a normal body; grade 3 is capped where bodies stay visible.
GRADE_HEIGHT_LOSS: dict[int, tuple[float, float]] = {
    0: (0.0, 0.10),
    1: (0.20, 0.25),
    2: (0.25, 0.40),
    3: (0.40, 0.60),
}
DEFORMITY_SHAPES: tuple[str, ...] = ("wedge", "biconcave", "crush")
ARTEFACT_KINDS: tuple[str, ...] = ("none", "streak", "blob")
ARTEFACT_PROBABILITY = 0.1
NEIGHBOUR_OFFSETS: tuple[int, ...] = (-2, -1, 1, 2)  # bodies above (<0) and below (>0) the central one

_MIN_RENDER_PIXELS = 128  # supersampled grid size; the output is its box-filtered average
_EDGE_WIDTH = 0.01  # width of the linear edge ramp, canvas units (about one supersampled pixel)
_TEXTURE_WAVES = 6


@dataclass(frozen=True)
class PhantomParams:
    """Every nuisance parameter of one phantom; the grade and height loss are chosen at render time.

    Lengths are in canvas units (the image spans [-1, 1]); intensities in [0, 1].
    """

    center_x: float  # central body centre
    center_y: float
    rotation_deg: float  # whole spine, about the central body centre
    body_width: float
    body_height: float  # of the central body before any height loss
    disc_gap: float
    caudal_growth: float  # relative size change per level (bodies grow downwards)
    neighbour_dx: tuple[float, ...]  # sideways offset of each neighbour, in NEIGHBOUR_OFFSETS order
    corner_radius: float
    rim_thickness: float
    background: float
    background_slope: float  # linear background gradient, intensity per canvas unit
    background_angle_deg: float
    disc_intensity: float
    core_intensity: float  # trabecular core
    rim_intensity: float  # cortical rim, brighter than the core
    texture_amplitude: float
    texture_seed: int
    noise_std: float
    noise_seed: int
    deformity: str  # one of DEFORMITY_SHAPES
    grade_quantile: float  # where the height loss sits inside a grade's interval, in [0, 1]
    artefact: str  # one of ARTEFACT_KINDS
    artefact_x: float
    artefact_y: float
    artefact_angle_deg: float
    artefact_size: float
    artefact_intensity: float

    def __post_init__(self) -> None:
        if self.deformity not in DEFORMITY_SHAPES:
            raise ValueError(f"PhantomParams.deformity={self.deformity!r}: expected one of {DEFORMITY_SHAPES}")
        if self.artefact not in ARTEFACT_KINDS:
            raise ValueError(f"PhantomParams.artefact={self.artefact!r}: expected one of {ARTEFACT_KINDS}")
        if len(self.neighbour_dx) != len(NEIGHBOUR_OFFSETS):
            raise ValueError(f"PhantomParams.neighbour_dx needs {len(NEIGHBOUR_OFFSETS)} values")
        if not 0.0 <= self.grade_quantile <= 1.0:
            raise ValueError(f"PhantomParams.grade_quantile={self.grade_quantile}: must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["neighbour_dx"] = list(self.neighbour_dx)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomParams:
        """Inverse of :meth:`to_dict`; unknown or missing fields raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(f"PhantomParams.from_dict: unknown fields {unknown}, missing fields {missing}")
        values = dict(d)
        values["neighbour_dx"] = tuple(float(v) for v in d["neighbour_dx"])
        return cls(**values)


class PhantomSample(NamedTuple):
    """One generated phantom; unpacks as ``(key, image, labels)``, the shard writer's sample layout."""

    key: str
    image: np.ndarray  # (H, W) uint8
    labels: dict[str, Any]  # grade, fracture, height_loss, phantom (PhantomParams.to_dict())


def sample_params(rng: np.random.Generator) -> PhantomParams:
    """Draw one phantom's nuisance parameters (and deformity shape) from ``rng``."""
    scale = rng.uniform(0.88, 1.12)
    core = rng.uniform(0.35, 0.55)
    background = rng.uniform(0.04, 0.16)
    has_artefact = rng.random() < ARTEFACT_PROBABILITY
    artefact_kind = str(rng.choice(ARTEFACT_KINDS[1:])) if has_artefact else "none"
    return PhantomParams(
        center_x=float(rng.uniform(-0.08, 0.08)),
        center_y=float(rng.uniform(-0.08, 0.08)),
        rotation_deg=float(rng.uniform(-8.0, 8.0)),
        body_width=float(scale * rng.uniform(0.64, 0.76)),
        body_height=float(scale * rng.uniform(0.48, 0.54)),
        disc_gap=float(scale * rng.uniform(0.08, 0.11)),
        caudal_growth=float(rng.uniform(0.0, 0.05)),
        neighbour_dx=tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=len(NEIGHBOUR_OFFSETS))),
        corner_radius=float(rng.uniform(0.04, 0.08)),
        rim_thickness=float(rng.uniform(0.035, 0.06)),
        background=float(background),
        background_slope=float(rng.uniform(0.0, 0.04)),
        background_angle_deg=float(rng.uniform(0.0, 360.0)),
        disc_intensity=float(background + rng.uniform(0.06, 0.14)),
        core_intensity=float(core),
        rim_intensity=float(min(core + rng.uniform(0.2, 0.35), 0.95)),
        texture_amplitude=float(rng.uniform(0.02, 0.06)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        noise_std=float(rng.uniform(0.01, 0.04)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        deformity=str(rng.choice(DEFORMITY_SHAPES)),
        grade_quantile=float(rng.uniform(0.0, 1.0)),
        artefact=artefact_kind,
        artefact_x=float(rng.uniform(-0.8, 0.8)),
        artefact_y=float(rng.uniform(-0.8, 0.8)),
        artefact_angle_deg=float(rng.uniform(0.0, 180.0)),
        artefact_size=float(rng.uniform(0.02, 0.06)),
        artefact_intensity=float(rng.uniform(0.25, 0.45)),
    )


def height_loss_for(params: PhantomParams, grade: int) -> float:
    """The height loss a phantom has at ``grade``: its ``grade_quantile`` placed inside the grade's interval."""
    low, high = _grade_interval(grade)
    return low + params.grade_quantile * (high - low)


def render(params: PhantomParams, grade: int, size: int, height_loss: float | None = None) -> np.ndarray:
    """Render a phantom at ``grade`` as a ``(size, size)`` float32 image in [0, 1].

    ``height_loss`` (fraction of the central body's height) defaults to :func:`height_loss_for`; pass it to
    place the body anywhere, e.g. between grades. Noise depends only on ``params.noise_seed`` and ``size``,
    so renders of one phantom at two grades differ only around the central body.
    """
    loss = _resolve_height_loss(params, grade, height_loss)
    image, _ = _render_fine_and_pool(params, loss, size)
    noise = np.random.default_rng(params.noise_seed).normal(0.0, params.noise_std, size=(size, size))
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)  # (size, size)


def render_central_mask(params: PhantomParams, grade: int, size: int, height_loss: float | None = None) -> np.ndarray:
    """``(size, size)`` bool mask of the central vertebral body (pixels at least half covered)."""
    loss = _resolve_height_loss(params, grade, height_loss)
    _, coverage = _render_fine_and_pool(params, loss, size)
    return coverage >= 0.5


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (round to nearest)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def generate_phantoms(
    n: int,
    size: int,
    seed: int,
    grade_probs: tuple[float, float, float, float] = (0.55, 0.15, 0.15, 0.15),
    key_prefix: str = "phantom",
) -> Iterator[PhantomSample]:
    """Yield ``n`` phantoms deterministically from ``seed``; sample ``i`` never depends on ``n``.

    Keys are ``f"{key_prefix}-s{seed}-{i:06d}"`` (no dots, as WebDataset keys require).
    """
    probs = np.asarray(grade_probs, dtype=np.float64)
    if probs.shape != (len(GRADE_HEIGHT_LOSS),) or np.any(probs < 0) or not math.isclose(probs.sum(), 1.0):
        raise ValueError(f"grade_probs={grade_probs}: need {len(GRADE_HEIGHT_LOSS)} non-negative values summing to 1")
    if "." in key_prefix or "/" in key_prefix:
        raise ValueError(f"key_prefix={key_prefix!r}: must not contain '.' or '/'")
    rng = np.random.default_rng(seed)
    for index in range(n):
        grade = int(rng.choice(len(probs), p=probs))
        params = sample_params(rng)
        loss = height_loss_for(params, grade)
        labels = {
            "grade": grade,
            "fracture": int(grade >= 1),
            "height_loss": float(loss),
            "phantom": params.to_dict(),
        }
        image = to_uint8(render(params, grade, size, height_loss=loss))  # (size, size)
        yield PhantomSample(key=f"{key_prefix}-s{seed}-{index:06d}", image=image, labels=labels)


# --- Rendering internals --------------------------------------------------------------------------------------


def _grade_interval(grade: int) -> tuple[float, float]:
    if grade not in GRADE_HEIGHT_LOSS:
        raise ValueError(f"grade={grade!r}: expected one of {sorted(GRADE_HEIGHT_LOSS)}")
    return GRADE_HEIGHT_LOSS[grade]


def _resolve_height_loss(params: PhantomParams, grade: int, height_loss: float | None) -> float:
    if height_loss is None:
        return height_loss_for(params, grade)
    _grade_interval(grade)  # validates the grade even when the loss is given
    if not 0.0 <= height_loss < 1.0:
        raise ValueError(f"height_loss={height_loss}: must lie in [0, 1)")
    return float(height_loss)


def _endplate_offsets(u: np.ndarray, half_width: float, height: float, loss: float, shape: str):
    """How far the superior and inferior endplates move inwards at body-local abscissa ``u``.

    The largest total inward shift is ``loss * height``: anteriorly for a wedge, mid-body for a biconcave
    deformity, everywhere for a crush (Genant's three patterns).
    """
    u = np.clip(u, -half_width, half_width)
    total = loss * height
    if shape == "wedge":  # anterior (u = -half_width) collapses, posterior wall keeps its height
        top = total * (half_width - u) / (2.0 * half_width)
        return top, np.zeros_like(u)
    if shape == "biconcave":  # both endplates bow inwards, most at the middle
        bow = 0.5 * total * (1.0 - (u / half_width) ** 2)
        return bow, bow
    return np.full_like(u, 0.5 * total), np.full_like(u, 0.5 * total)  # crush: uniform


def _body_coverage(u: np.ndarray, v: np.ndarray, width: float, height: float, loss: float, shape: str,
                   corner: float, rim: float) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, rim coverage) in [0, 1] of one body in its local frame (centre at 0, ``v`` downwards).

    Uses a rounded-box signed distance whose vertical half-extent follows the deformed endplates.
    """
    half_width = 0.5 * width
    top_shift, bottom_shift = _endplate_offsets(u, half_width, height, loss, shape)
    local_half_height = 0.5 * (height - top_shift - bottom_shift)
    local_mid = 0.5 * (top_shift - bottom_shift)  # top endplate moves down (+v), bottom moves up
    radius = min(corner, 0.9 * half_width, 0.9 * float(local_half_height.min()))
    qx = np.abs(u) - half_width + radius
    qy = np.abs(v - local_mid) - local_half_height + radius
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    sdf = outside + np.minimum(np.maximum(qx, qy), 0.0) - radius  # < 0 inside
    coverage = np.clip(0.5 - sdf / _EDGE_WIDTH, 0.0, 1.0)
    rim_coverage = coverage * np.clip(0.5 + (sdf + rim) / _EDGE_WIDTH, 0.0, 1.0)
    return coverage, rim_coverage


def _body_centres(params: PhantomParams) -> list[tuple[int, float, float, float]]:
    """(level, spine-frame y centre, width, height) of every body, central level 0, growing caudally."""
    sizes = {level: 1.0 + params.caudal_growth * level for level in (0, *NEIGHBOUR_OFFSETS)}
    centres = {0: 0.0}
    for direction in (-1, 1):
        y = 0.0
        for level in (direction, 2 * direction):
            previous = level - direction
            y += direction * (0.5 * params.body_height * (sizes[previous] + sizes[level]) + params.disc_gap)
            centres[level] = y
    return [(lv, centres[lv], params.body_width * sizes[lv], params.body_height * sizes[lv]) for lv in sorted(centres)]


def _texture(params: PhantomParams, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth trabecular-like texture in [-1, 1]: a few plane waves, continuous in canvas coordinates."""
    rng = np.random.default_rng(params.texture_seed)
    angles = rng.uniform(0.0, np.pi, _TEXTURE_WAVES)
    frequencies = rng.uniform(6.0, 14.0, _TEXTURE_WAVES)  # cycles per canvas unit
    phases = rng.uniform(0.0, 2 * np.pi, _TEXTURE_WAVES)
    total = np.zeros_like(x)
    for angle, freq, phase in zip(angles, frequencies, phases, strict=True):
        total += np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    return total / math.sqrt(_TEXTURE_WAVES)


def _artefact(params: PhantomParams, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Additive bright artefact: a thin streak (e.g. a wire) or a small blob (e.g. a calcification)."""
    if params.artefact == "none":
        return np.zeros_like(x)
    dx, dy = x - params.artefact_x, y - params.artefact_y
    if params.artefact == "streak":
        angle = math.radians(params.artefact_angle_deg)
        distance = np.abs(-math.sin(angle) * dx + math.cos(angle) * dy)  # to the line through the point
        width = 0.3 * params.artefact_size
    else:
        distance = np.hypot(dx, dy)
        width = params.artefact_size
    return params.artefact_intensity * np.clip(0.5 - (distance - width) / _EDGE_WIDTH, 0.0, 1.0)


def _render_fine_and_pool(params: PhantomParams, loss: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image and central-body coverage at ``(size, size)``, box-filtered from a fine grid."""
    if not 8 <= size <= 1024:
        raise ValueError(f"size={size}: expected 8..1024 pixels")
    factor = max(1, math.ceil(_MIN_RENDER_PIXELS / size))
    fine = size * factor
    axis = (np.arange(fine) + 0.5) / fine * 2.0 - 1.0  # pixel centres in canvas units
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (fine, fine)

    # Spine frame: undo the jitter and rotation so bodies are axis-aligned.
    angle = math.radians(params.rotation_deg)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    sx, sy = x - params.center_x, y - params.center_y
    spine_x = cos_a * sx + sin_a * sy
    spine_y = -sin_a * sx + cos_a * sy

    gradient_angle = math.radians(params.background_angle_deg)
    image = params.background + params.background_slope * (math.cos(gradient_angle) * x + math.sin(gradient_angle) * y)
    bodies = _body_centres(params)
    for (_, y_a, w_a, h_a), (_, y_b, w_b, h_b) in zip(bodies[:-1], bodies[1:], strict=False):
        # Disc: an ellipse filling the gap between two neighbouring bodies (drawn first, bodies cover it).
        disc_y = 0.5 * (y_a + 0.5 * h_a + y_b - 0.5 * h_b)
        r = np.hypot(spine_x / (0.45 * (w_a + w_b) / 2), (spine_y - disc_y) / params.disc_gap)
        disc = np.clip(0.5 - (r - 1.0) * params.disc_gap / _EDGE_WIDTH, 0.0, 1.0)
        image = image * (1.0 - disc) + params.disc_intensity * disc

    texture = params.texture_amplitude * _texture(params, x, y)
    central_coverage = np.zeros_like(x)
    for level, body_y, width, height in bodies:
        dx = params.neighbour_dx[NEIGHBOUR_OFFSETS.index(level)] if level else 0.0
        body_loss = loss if level == 0 else 0.0
        coverage, rim = _body_coverage(spine_x - dx, spine_y - body_y, width, height, body_loss,
                                       params.deformity, params.corner_radius, params.rim_thickness)
        intensity = params.core_intensity + texture + (params.rim_intensity - params.core_intensity) * rim
        image = image * (1.0 - coverage) + intensity * coverage
        if level == 0:
            central_coverage = coverage

    image = image + _artefact(params, x, y)

    def pool(a: np.ndarray) -> np.ndarray:  # (fine, fine) -> (size, size) box filter
        return a.reshape(size, factor, size, factor).mean(axis=(1, 3))

    return pool(image), pool(central_coverage)
