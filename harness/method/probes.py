"""Probes that a detection AUC cannot fake: does the DAE use z_sem, and do counterfactuals do what they claim?

Two traps motivate this module. First, the UNet may learn to ignore ``z_sem`` (the stochastic code ``x_T``
and the noisy input already carry the image); then moving ``z_sem`` cannot change a decoded image and every
counterfactual is a reconstruction. :func:`z_usage` measures how much the denoiser's error grows when each
image is given another image's ``z_sem``; :func:`random_xT_identity` checks that ``z_sem`` alone (with a random
``x_T``) still decodes to an image recognisably its source. Second, a counterfactual can flip the head's
decision without moving towards the true counterfactual: :func:`truth_errors` scores it against the truth
(phantoms can be re-rendered at any grade) beside the trivial "change nothing" answer, and
:func:`change_alignment` says why a CE misses it (wrong pattern, too small, or spread over pixels the truth leaves
alone); :func:`realised_fraction` says how much of the intended move in z_sem the re-encoded counterfactual kept.

Pure functions on tensors / arrays; no training-loop or tracking imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.diffusion import q_sample

DenoiserFactory = Callable[[Tensor], Callable[[Tensor, Tensor], Tensor]]


def _derangement(z: Tensor) -> Tensor:
    """Rows of ``z`` (B, D) rolled by one: no row keeps its own code (needs B >= 2)."""
    if z.shape[0] < 2:
        raise ValueError(f"shuffling z across the batch needs at least 2 rows, got {z.shape[0]}")
    return torch.roll(z, shifts=1, dims=0)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def z_usage(eps_fn_for: DenoiserFactory, x0: Tensor, z: Tensor, alpha_bar: Tensor,
            timesteps: Sequence[int] = (250, 500, 750, 950),
            generator: torch.Generator | None = None) -> list[dict[str, float]]:
    """How much the denoiser relies on z_sem, per timestep.

    ``eps_fn_for(z)`` returns a denoiser ``(x_t (B, C, H, W), t (B,) long) -> eps (B, C, H, W)`` conditioned on
    ``z`` (B, D) (e.g. ``lambda z: lambda x_t, t: dae(x_t, t, z_sem=z)`` with the DAE in eval mode). For each
    ``t`` one noise draw (from ``generator``) gives ``x_t = q_sample(x0, t, noise)``; the epsilon MSE is computed
    with the true ``z`` and with ``z`` rolled by one across the batch (every image gets another image's code,
    same noise, same ``x_t``). ``usage = (mse_shuffled - mse_true) / mse_shuffled``: 0 when z is ignored, near 1
    when the right z removes almost all the error (NaN if ``mse_shuffled`` is 0).

    Why epsilon space suffices: the implied clean image is ``x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)``,
    so ``x0_hat - x0 = -sqrt((1 - ab_t) / ab_t) (eps_hat - eps)``. At a fixed t both MSEs scale by the same factor
    ``(1 - ab_t) / ab_t``, which cancels in the relative increase: usage in x0 space equals usage in eps space.

    Args: ``x0`` (B, C, H, W) clean images, ``z`` (B, D) their codes, ``alpha_bar`` (T,) cumulative schedule.
    Returns one row per t: ``{"t", "mse_true", "mse_shuffled", "usage"}``.
    """
    if x0.shape[0] != z.shape[0]:
        raise ValueError(f"x0 has {x0.shape[0]} rows, z has {z.shape[0]}")
    z_other = _derangement(z)  # (B, D)
    denoise_true, denoise_other = eps_fn_for(z), eps_fn_for(z_other)
    rows = []
    for t in timesteps:
        if not 0 <= int(t) < alpha_bar.shape[0]:
            raise ValueError(f"timestep {t} outside 0..{alpha_bar.shape[0] - 1}")
        noise = _randn_like(x0, generator)  # (B, C, H, W)
        t_batch = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)  # (B,)
        x_t = q_sample(x0, t_batch, noise, alpha_bar)  # (B, C, H, W)
        mse_true = torch.mean((denoise_true(x_t, t_batch).float() - noise.float()) ** 2).item()
        mse_other = torch.mean((denoise_other(x_t, t_batch).float() - noise.float()) ** 2).item()
        usage = (mse_other - mse_true) / mse_other if mse_other > 0 else float("nan")
        rows.append({"t": int(t), "mse_true": mse_true, "mse_shuffled": mse_other, "usage": usage})
    return rows


@torch.no_grad()
def random_xT_identity(decode: Callable[[Tensor, Tensor], Tensor], x: Tensor, z: Tensor,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
    """Does z_sem alone identify its image? Decode every z with a fresh random x_T and find the nearest source.

    ``decode(z (B, D), x_T (B, C, H, W)) -> images (B, C, H, W)`` (e.g. ``DiffusionAutoencoder.decode``).
    Each decode is matched to the closest image of ``x`` (B, C, H, W) in L2. A decoder that ignores z lands on
    its own source only by chance (``1 / B``); a semantic z brings it back to its source far more often.

    Returns ``{"nearest_own_source": fraction matched to their own source, "chance": 1 / B, "n": B,
    "own_distance_median", "other_distance_median"}`` (L2 distances from each decode to its source and to the
    other sources).
    """
    n = x.shape[0]
    if z.shape[0] != n or n < 2:
        raise ValueError(f"need x and z with the same number (>= 2) of rows, got {n} and {z.shape[0]}")
    x_T = _randn_like(x, generator)  # (B, C, H, W)
    decoded = decode(z, x_T)  # (B, C, H, W)
    dist = torch.cdist(decoded.reshape(n, -1).double(), x.reshape(n, -1).double().to(decoded.device))  # (B, B)
    nearest = dist.argmin(dim=1)  # (B,)
    own = torch.eye(n, dtype=torch.bool, device=dist.device)  # (B, B)
    return {
        "nearest_own_source": float((nearest == torch.arange(n, device=dist.device)).float().mean()),
        "chance": 1.0 / n,
        "n": n,
        "own_distance_median": float(dist[own].median()),
        "other_distance_median": float(dist[~own].median()),
    }


def truth_errors(x: Tensor, x_ce: Tensor, truth: Tensor) -> dict[str, Any]:
    """Counterfactuals scored against the true counterfactual, beside the "change nothing" baseline.

    ``x`` (B, C, H, W) inputs, ``x_ce`` (B, C, H, W) their counterfactuals, ``truth`` (B, C, H, W) the true
    counterfactuals (same range). Per sample: ``ce_error = mean |x_ce - truth|``, ``input_error = mean |x - truth|``.
    A CE is only useful where ``ce_error < input_error``: otherwise returning the input would be as good.

    Returns medians and means of both, ``closer_than_input`` (fraction with ce_error strictly below
    input_error), ``n``, and the per-sample arrays ``ce_error`` / ``input_error`` (numpy (B,)).
    """
    if not x.shape == x_ce.shape == truth.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, x_ce {tuple(x_ce.shape)}, truth {tuple(truth.shape)}")
    n = x.shape[0]
    ce_error = (x_ce.double() - truth.double()).abs().reshape(n, -1).mean(dim=1).cpu().numpy()  # (B,)
    input_error = (x.double() - truth.double()).abs().reshape(n, -1).mean(dim=1).cpu().numpy()  # (B,)
    return {
        "ce_error_median": float(np.median(ce_error)), "input_error_median": float(np.median(input_error)),
        "ce_error_mean": float(np.mean(ce_error)), "input_error_mean": float(np.mean(input_error)),
        "closer_than_input": float(np.mean(ce_error < input_error)), "n": n,
        "ce_error": ce_error, "input_error": input_error,
    }


def change_alignment(x: Tensor, x_ce: Tensor, truth: Tensor, region_threshold: float = 0.02) -> dict[str, float]:
    """Does the image change a CE makes look like the true change? Medians over the batch.

    With ``d = x_ce - x`` (the CE's change) and ``g = truth - x`` (the true change), per sample (all (B, C, H, W)):
    ``cosine`` = cos(d, g) (1 = the right pattern, 0 = unrelated); ``magnitude`` = ||d|| / ||g|| (1 = the right
    size); ``inside`` = the share of sum |d| that falls where |g| > ``region_threshold`` (the pixels the truth
    changes; 1 = a local edit, about ``region_share`` = a change spread evenly over the image). A CE can be
    farther from the truth than the input because it points the wrong way, is too small, or changes pixels the
    truth leaves alone; these three tell which. Samples with no true change are skipped.
    """
    if not x.shape == x_ce.shape == truth.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, x_ce {tuple(x_ce.shape)}, truth {tuple(truth.shape)}")
    n = x.shape[0]
    d = (x_ce.double() - x.double()).reshape(n, -1)  # (B, P)
    g = (truth.double() - x.double()).reshape(n, -1)  # (B, P)
    region = g.abs() > region_threshold  # (B, P)
    keep = region.any(dim=1)
    if not bool(keep.any()):
        raise ValueError(f"no sample changes by more than {region_threshold} between input and truth")
    d, g, region = d[keep], g[keep], region[keep]
    d_size = d.abs().sum(dim=1)
    cosine = torch.nn.functional.cosine_similarity(d, g, dim=1)
    inside = torch.where(d_size > 0, (d.abs() * region).sum(dim=1) / d_size.clamp_min(1e-12), torch.nan)
    return {"cosine": float(cosine.median()), "magnitude": float((d.norm(dim=1) / g.norm(dim=1)).median()),
            "inside": float(inside.nanmedian()), "region_share": float(region.double().mean(dim=1).median()),
            "n": int(keep.sum())}


def realised_fraction(dist_input: np.ndarray, dist_target: np.ndarray, dist_reencoded: np.ndarray,
                      atol: float = 1e-8) -> np.ndarray:
    """Share of the intended move along the head's normal that survives decoding and re-encoding. (N,).

    ``(dist_reencoded - dist_input) / (dist_target - dist_input)`` per sample, from signed distances (N,) of the
    input's z, the target z and the re-encoded counterfactual's z. 1 = the full move was realised, 0 = the
    counterfactual re-encodes where the input was, < 0 = it moved the wrong way. NaN where the intended move
    ``|dist_target - dist_input|`` is at most ``atol``.
    """
    start = np.asarray(dist_input, dtype=np.float64).reshape(-1)
    target = np.asarray(dist_target, dtype=np.float64).reshape(-1)
    reached = np.asarray(dist_reencoded, dtype=np.float64).reshape(-1)
    if not start.shape == target.shape == reached.shape:
        raise ValueError(f"lengths differ: {start.shape[0]}, {target.shape[0]}, {reached.shape[0]}")
    intended = target - start  # (N,)
    defined = np.abs(intended) > atol
    out = np.full(start.shape, np.nan)
    out[defined] = (reached[defined] - start[defined]) / intended[defined]
    return out


def realised_fraction_summary(fraction: np.ndarray) -> dict[str, Any]:
    """``{"median": median over defined samples (NaN if none), "n": all samples, "n_defined": non-NaN ones}``."""
    fraction = np.asarray(fraction, dtype=np.float64).reshape(-1)
    defined = fraction[np.isfinite(fraction)]
    return {"median": float(np.median(defined)) if defined.size else float("nan"), "n": int(fraction.size),
            "n_defined": int(defined.size)}
