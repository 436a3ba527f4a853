"""Diffusion math as pure functions: schedules, forward noising, the training loss, DDIM sampling and inversion."""

from harness.diffusion.ddim import CLEAN, DenoiseFn, ddim_invert, ddim_sample, ddim_step, eps_loss, q_sample
from harness.diffusion.schedule import alphas_cumprod, linear_betas, respaced_timesteps

__all__ = [
    "CLEAN",
    "DenoiseFn",
    "alphas_cumprod",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "eps_loss",
    "linear_betas",
    "q_sample",
    "respaced_timesteps",
]
