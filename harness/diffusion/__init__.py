"""Diffusion math as pure functions: schedules, forward noising, the training losses (eps or v targets, optional
Min-SNR weighting), DDIM sampling and inversion (full or partial depth)."""

from harness.diffusion.ddim import CLEAN, DenoiseFn, ddim_invert, ddim_sample, ddim_step, eps_loss, q_sample
from harness.diffusion.objectives import (
    PREDICTIONS,
    WEIGHTINGS,
    ModelFn,
    diffusion_loss,
    eps_fn_from_output,
    eps_x0_from_output,
    min_snr_weight,
    prediction_target,
    snr,
    v_from_eps_x0,
)
from harness.diffusion.schedule import alphas_cumprod, linear_betas, respaced_timesteps

__all__ = [
    "CLEAN",
    "PREDICTIONS",
    "WEIGHTINGS",
    "DenoiseFn",
    "ModelFn",
    "alphas_cumprod",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "diffusion_loss",
    "eps_fn_from_output",
    "eps_loss",
    "eps_x0_from_output",
    "linear_betas",
    "min_snr_weight",
    "prediction_target",
    "q_sample",
    "respaced_timesteps",
    "snr",
    "v_from_eps_x0",
]
