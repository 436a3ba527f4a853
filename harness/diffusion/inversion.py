"""Few-step inversion that undoes the DDIM sampler exactly: fixed-point refinement of each inversion step.

Plain DDIM inversion (:func:`harness.diffusion.ddim.ddim_invert`) approximates the implicit equation of a sampling
step. A sampling step from ``t'`` (noisier) to ``t`` (Song et al. 2021, Eq. 12, eta = 0) is, with ab = alpha_bar,

    x_t = a * x_{t'} + b_s * eps(x_{t'}, t')          a = sqrt(ab_t / ab_{t'}),
                                                       b_s = sqrt(1 - ab_t) - a * sqrt(1 - ab_{t'})

so the x_{t'} that this step maps to a given x_t solves the implicit equation (the step solved for x_{t'})

    x_{t'} = x_t / a - (b_s / a) * eps(x_{t'}, t')  =  c * x_t + d * eps(x_{t'}, t')                     (*)
        c = sqrt(ab_{t'} / ab_t),   d = sqrt(1 - ab_{t'}) - c * sqrt(1 - ab_t)

DDIM inversion evaluates eps at x_t instead of the unknown x_{t'}: one network call, but the step it takes is
not the inverse of the sampling step, so the round trip errs by O(step^2) per step and only vanishes with many
steps (the 250 / 100 steps of the paper). Solving (*) by fixed-point iteration y <- c x_t + d eps(y, t'), started
from the DDIM guess (the "fixed-point inversion" / AIDI / ReNoise line of work: Pan et al. 2023, "Effective Real
Image Editing with Accelerated Iterative Diffusion Inversion"; Samuel et al. 2023, "Regularized Newton-Raphson
Inversion"; Garibi et al. 2024, "ReNoise"), makes each inversion step the exact inverse of the sampling step over
the same interval as the iteration converges. Decoding with the same step grid then reconstructs the input up to
the residual of the iteration, at any step count; the price is ``iters`` extra network calls per step.

The map's Jacobian is ``d * d eps / dy``; along directions where the data does not vary eps(y) ~ y / sqrt(1 - ab),
which gives a contraction factor ``d / sqrt(1 - ab_{t'}) < 1``: plain (Picard) iteration converges geometrically
(at about a factor 2 per iteration on a 10-20 step grid). ``anderson=True`` applies Anderson acceleration of depth
one (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations", type II with m = 1) per sample, which
solves the linear part of the problem in one secant step and so typically needs fewer calls.

Every function here is per sample: nothing couples the rows of a batch, so a batch inverts exactly as its rows
one by one (to float tolerance).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from harness.diffusion.ddim import DenoiseFn, _alpha_bar_at, _maybe_progress, _sampling_walk, ddim_invert, ddim_step

INVERSIONS = ("ddim", "fixed_point")
"""How :func:`invert` solves each inversion step: one DDIM call, or DDIM plus fixed-point refinement."""


def _per_sample_dot(u: Tensor, v: Tensor) -> Tensor:
    """Inner product over all but the batch dimension: (B, ...) x (B, ...) -> (B, 1, 1, ...), at least float32
    (not float64, which some accelerators lack; a secant coefficient needs no more)."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    dot = (u.to(dtype) * v.to(dtype)).flatten(1).sum(dim=1)  # (B,)
    return dot.reshape(-1, *([1] * (u.ndim - 1)))


def fixed_point_step(denoise_fn: DenoiseFn, x: Tensor, t_from: int, t_to: int, alpha_bar: Tensor, iters: int,
                     anderson: bool = False) -> Tensor:
    """Invert one DDIM sampling step: find y at ``t_to`` that :func:`ddim_step` maps to ``x`` at ``t_from``.

    ``t_to > t_from`` (``t_from`` may be -1, clean data). Solves (*) of the module docstring by ``iters`` fixed-point
    iterations started from the plain DDIM inversion step: ``1 + iters`` network calls, all with the label
    ``t_to`` (the label the sampling step queries). ``iters = 0`` is exactly :func:`ddim_step`. (B, C, H, W).
    """
    if t_to <= t_from:
        raise ValueError(f"an inversion step goes to a noisier timestep, got {t_from} -> {t_to}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    y = ddim_step(denoise_fn, x, t_from, t_to, alpha_bar)  # the DDIM guess: eps evaluated at x, not at y
    if iters == 0:
        return y
    ab_from, ab_to = _alpha_bar_at(alpha_bar, t_from), _alpha_bar_at(alpha_bar, t_to)
    c = math.sqrt(ab_to / ab_from)
    d = math.sqrt(1.0 - ab_to) - c * math.sqrt(1.0 - ab_from)
    cx = c * x  # (B, C, H, W), fixed for the whole solve
    t_batch = torch.full((x.shape[0],), t_to, dtype=torch.long, device=x.device)
    y_prev = g_prev = None
    for _ in range(iters):
        g = cx + d * denoise_fn(y, t_batch) - y  # residual of (*) at y; Picard would step y <- y + g
        if anderson and y_prev is not None:
            # Type-II Anderson, depth 1: the secant through the last two residuals, per sample.
            dy, dg = y - y_prev, g - g_prev
            gamma = _per_sample_dot(g, dg) / _per_sample_dot(dg, dg).clamp_min(1e-30)  # (B, 1, 1, 1)
            y_next = y + g - gamma.to(y.dtype) * (dy + dg)
        else:
            y_next = y + g
        y_prev, g_prev, y = y, g, y_next
    return y


@torch.no_grad()
def fixed_point_invert(denoise_fn: DenoiseFn, x0: Tensor, alpha_bar: Tensor, steps: int, iters: int = 4,
                       anderson: bool = True, progress: bool = False, t_end: int | None = None) -> Tensor:
    """Encode clean ``x0`` (B, C, H, W) to the code that :func:`~harness.diffusion.ddim.ddim_sample` decodes to it.

    The walk is :func:`ddim_invert`'s (``steps`` spaces the full schedule; ``t_end`` is the partial depth), each
    step refined by :func:`fixed_point_step` with ``iters`` iterations. Decode with ``ddim_sample`` and the SAME
    ``steps`` (and ``t_start=t_end``): the round trip is then exact up to the iteration residual. With another
    decoding step count the decoder walks another grid and the usual discretisation mismatch returns.
    ``iters = 0`` equals ``ddim_invert`` bit for bit. Network calls: :func:`inversion_nfe`.
    """
    alpha_bar = alpha_bar.detach().to("cpu", torch.float64)  # scalars read per step: no device syncs in the loop
    x = x0
    walk = _sampling_walk(alpha_bar.shape[0], steps, t_end)
    reverse_walk = [(t_to, t_from) for t_from, t_to in reversed(walk)]
    for t_from, t_to in _maybe_progress(reverse_walk, progress, "fixed-point invert"):
        x = fixed_point_step(denoise_fn, x, t_from, t_to, alpha_bar, iters, anderson=anderson)
    return x


def walk_length(num_timesteps: int, steps: int, t_limit: int | None = None) -> int:
    """Number of DDIM steps (network calls) of a walk of ``steps`` over 0..T-1 that stops at ``t_limit``."""
    return len(_sampling_walk(num_timesteps, steps, t_limit))


def inversion_nfe(num_timesteps: int, steps: int, method: str = "ddim", iters: int = 0,
                  t_end: int | None = None) -> int:
    """UNet evaluations of one inversion: ``steps`` (or the partial walk) times ``1 + iters`` for fixed_point."""
    if method not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS}, got {method!r}")
    per_step = 1 + iters if method == "fixed_point" else 1
    return walk_length(num_timesteps, steps, t_end) * per_step


def counterfactual_nfe(num_timesteps: int, invert_steps: int, decode_steps: int, method: str = "ddim",
                       iters: int = 0, t_end: int | None = None) -> int:
    """Network evaluations of one CE from scratch: 1 encoder pass + inversion + decoding (shared inversions not
    discounted: the count for a single CE of a single image)."""
    return 1 + inversion_nfe(num_timesteps, invert_steps, method, iters, t_end) + walk_length(
        num_timesteps, decode_steps, t_end)


@torch.no_grad()
def invert(denoise_fn: DenoiseFn, x0: Tensor, alpha_bar: Tensor, steps: int, method: str = "ddim",
           iters: int = 0, anderson: bool = False, progress: bool = False, t_end: int | None = None) -> Tensor:
    """Dispatch on ``method`` (one of :data:`INVERSIONS`): ``ddim`` is :func:`ddim_invert` unchanged. (B, C, H, W)."""
    if method not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS}, got {method!r}")
    if method == "ddim":
        return ddim_invert(denoise_fn, x0, alpha_bar, steps, progress=progress, t_end=t_end)
    return fixed_point_invert(denoise_fn, x0, alpha_bar, steps, iters, anderson=anderson, progress=progress,
                              t_end=t_end)


__all__ = ["INVERSIONS", "counterfactual_nfe", "fixed_point_invert", "fixed_point_step", "invert",
           "inversion_nfe", "walk_length"]
