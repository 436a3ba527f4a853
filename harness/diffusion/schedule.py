"""Noise schedules and timestep respacing: pure tensor functions, CPU-checkable.

The paper (Preechakul et al., DiffAE; Atad et al.) trains with T = 1000 steps of linearly increasing betas
(Ho et al. 2020) and decodes / inverts with a DDIM sub-sequence of those steps. Everything here is float64 so
that the DDIM round trip (inversion then sampling) is limited by the network, not by the schedule's precision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas rising linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4). Shape (T,), float64."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s <= t} (1 - beta_s)``: the signal fraction kept at step t. Shape (T,), float64.

    In DDIM notation (Song et al. 2021) this is their ``alpha_t``; in DDPM notation ``alpha-bar_t``.
    """
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D (T,), got shape {tuple(betas.shape)}")
    if bool(((betas <= 0) | (betas >= 1)).any()):
        raise ValueError("every beta must lie in (0, 1)")
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def respaced_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """``steps`` evenly spaced training timesteps, ascending, from 0 to ``num_timesteps - 1``. Shape (steps,), long.

    The sub-sequence ``tau`` of DDIM (Song et al. 2021, Sec. 4.2) is ``round(linspace(0, T - 1, steps))``: the
    spacing of the official DiffAE code (``space_timesteps``) and of diffusers' ``timestep_spacing="linspace"``.
    Because it always ends at ``T - 1``, a code ``x_T`` from inversion with one step count sits at the same noise
    level as the start of decoding with another (e.g. invert with 250 steps, decode with 100). With
    ``steps <= T`` the spacing is at least 1, so the rounded timesteps are distinct.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in 1..{num_timesteps} (the number of training timesteps), got {steps}")
    if steps == 1:
        return torch.zeros(1, dtype=torch.long)
    # torch.round rounds half to even, like numpy and Python, so the result matches the reference spacings.
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()
