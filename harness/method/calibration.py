"""The distance -> grade calibration of a linear head (Atad et al., Section 3.3) and its inverse.

A calibration maps the signed distance of a latent to a task's hyperplane to the clinical grade; its inverse
gives the distance of a requested grade (grade-targeted counterfactuals). numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harness.config import parse_calibration

# ---------------------------------------------------------------------------------------------------------
# Calibration: distance -> grade (paper Section 3.3).
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """``grade = polyval(coefficients, distance)``; coefficients highest degree first.

    ``mode`` is the calibration's name (``extremes``, ``lstsq`` or ``poly<N>``, harness.config.parse_calibration).

    ``distance_range`` (the calibration data's min/max distance) picks the monotonic branch of a polynomial
    when inverting it.
    """

    mode: str
    coefficients: tuple[float, ...]
    grade_min: int
    grade_max: int
    distance_range: tuple[float, float] | None = None

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def grade_continuous(self, dist: np.ndarray) -> np.ndarray:
        return np.polyval(np.asarray(self.coefficients, dtype=np.float64), np.asarray(dist, dtype=np.float64))

    def grade(self, dist: np.ndarray) -> np.ndarray:
        """Integer grade: rounded and clipped to [grade_min, grade_max]."""
        rounded = np.rint(self.grade_continuous(dist))
        return np.clip(rounded, self.grade_min, self.grade_max).astype(np.int64)

    def _monotonic_branch(self) -> tuple[float, float]:
        """The distance interval on which the polynomial is monotonic and covers [g_min - 1, g_max + 1]."""
        poly = np.poly1d(self.coefficients)
        slope = poly.deriv()
        turning = sorted({float(r.real) for r in slope.roots if abs(r.imag) < 1e-9})
        known = [abs(x) for x in (*turning, *(self.distance_range or ()))]
        far = 1e6 * (1.0 + max(known, default=0.0))  # stands in for +-infinity: beyond every turning point
        edges = [-far, *turning, far]
        branches: list[list[float]] = []
        previous_sign = 0.0
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sign = float(np.sign(slope(0.5 * (lo + hi))))
            if branches and sign == previous_sign:  # the slope keeps its sign (e.g. the flat point of x**3)
                branches[-1][1] = hi
            else:
                branches.append([lo, hi])
            previous_sign = sign
        needed = (self.grade_min - 1.0, self.grade_max + 1.0)
        covering = [(lo, hi) for lo, hi in branches
                    if min(poly(lo), poly(hi)) <= needed[0] and max(poly(lo), poly(hi)) >= needed[1]]
        if self.distance_range is not None:  # the branch the calibration data lies on
            anchor = 0.5 * (self.distance_range[0] + self.distance_range[1])
            covering = [branch for branch in covering if branch[0] <= anchor <= branch[1]]
        if len(covering) != 1:
            raise ValueError(
                f"calibration polynomial {tuple(round(c, 6) for c in self.coefficients)} is not strictly monotonic "
                f"over the distances of grades {needed[0]:g}..{needed[1]:g}, so distance_for_grade has no unique "
                "answer; use calibration lstsq or extremes (a line) or a lower polyN")
        return covering[0]

    def distance_for_grade(self, grade: float | np.ndarray) -> np.ndarray:
        """Inverse calibration: the distance whose calibrated grade is ``grade`` (same shape as ``grade``)."""
        grades = np.asarray(grade, dtype=np.float64)
        coefficients = np.asarray(self.coefficients, dtype=np.float64)
        if self.degree == 1:
            slope, intercept = coefficients
            if slope == 0:
                raise ValueError("calibration slope is 0: every distance maps to the same grade")
            return (grades - intercept) / slope
        lo, hi = self._monotonic_branch()
        out = np.empty(grades.size)
        for index, target in enumerate(grades.reshape(-1)):
            shifted = coefficients.copy()
            shifted[-1] -= target
            roots = [r.real for r in np.roots(shifted) if abs(r.imag) < 1e-7 * max(1.0, abs(r.real))]
            inside = [r for r in roots if lo - 1e-9 <= r <= hi + 1e-9]
            if not inside:
                raise ValueError(f"grade {target:g} is outside what the calibration's monotonic branch reaches")
            out[index] = min(inside, key=lambda r: abs(np.polyval(shifted, r)))
        return out.reshape(grades.shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        span = data.get("distance_range")
        coefficients = tuple(data["coefficients"])
        mode = f"poly{len(coefficients) - 1}" if data["mode"] == "poly" else data["mode"]  # files before "polyN"
        return cls(mode, coefficients, int(data["grade_min"]), int(data["grade_max"]),
                   None if span is None else tuple(span))


def fit_calibration(dist: np.ndarray, grades: np.ndarray, mode: str = "extremes",
                    grades_used: tuple[int, ...] | None = None,
                    grade_range: tuple[int, int] | None = None) -> Calibration:
    """Fit distance -> grade on (N,) distances and (N,) grades; ``mode`` is a calibration name:

    - ``extremes``: the line through (mean distance of the lowest grade, lowest) and (mean distance of the
      highest grade, highest);
    - ``lstsq``: least-squares line grade ~ distance; ``poly<N>``: least-squares polynomial of degree N.
    Rows are restricted to ``grades_used`` (default: all) and to ``grade_range`` (default: the grades seen).
    """
    kind, degree = parse_calibration(mode)
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    grades = np.asarray(grades, dtype=np.float64).reshape(-1)
    if dist.shape != grades.shape:
        raise ValueError(f"{dist.shape[0]} distances but {grades.shape[0]} grades")
    keep = np.isfinite(dist) & np.isfinite(grades)
    if grades_used is not None:
        keep &= np.isin(grades, grades_used)
    if grade_range is not None:
        keep &= (grades >= grade_range[0]) & (grades <= grade_range[1])
    dist, grades = dist[keep], grades[keep]
    present = np.unique(grades)
    if present.size < 2:
        raise ValueError(f"calibration needs at least two distinct grades, found {present.tolist()} "
                         f"in {dist.size} usable rows")
    grade_min, grade_max = (int(v) for v in (grade_range or (present.min(), present.max())))
    if kind == "extremes":
        low, high = present.min(), present.max()
        d_low, d_high = dist[grades == low].mean(), dist[grades == high].mean()
        if d_low == d_high:
            raise ValueError(f"grades {low:g} and {high:g} have the same mean distance {d_low:g}: no calibration")
        slope = (high - low) / (d_high - d_low)
        coefficients = (float(slope), float(low - slope * d_low))
    else:
        if dist.size <= degree:
            raise ValueError(f"a degree-{degree} calibration needs more than {degree} rows, got {dist.size}")
        coefficients = tuple(float(c) for c in np.polyfit(dist, grades, degree))
    return Calibration(mode, coefficients, grade_min, grade_max, (float(dist.min()), float(dist.max())))
