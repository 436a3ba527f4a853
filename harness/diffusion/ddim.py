"""Forward noising, the training loss and deterministic DDIM sampling / inversion as free functions.

Nothing here holds a network: every function takes a ``denoise_fn(x_t, t) -> eps`` (for a DAE, a closure over
the semantic code ``z_sem``), so the same math serves training, encoding and decoding, and is tested on CPU
with analytic denoisers.

Key to DDIM notation (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 with sigma_t = 0):

    x_{t-1} = sqrt(alpha_{t-1}) * [ (x_t - sqrt(1 - alpha_t) * eps_theta(x_t)) / sqrt(alpha_t) ]   # "predicted x_0"
              + sqrt(1 - alpha_{t-1}) * eps_theta(x_t)                                            # "direction to x_t"

    paper            here
    alpha_t          alpha_bar[t]   (cumulative product of 1 - beta; DDPM's alpha-bar)
    tau_1..tau_S     respaced_timesteps(T, S) (ascending; tau_1 = 0, tau_S = T - 1)
    alpha_0 := 1     t = -1 ("clean"): the last sampling step lands on alpha_bar = 1, i.e. returns predicted x_0,
                     as diffusers' ``DDIMScheduler(set_alpha_to_one=True)``; inversion starts there.
    eta = 0          always: sampling is a deterministic ODE discretisation, so it can be inverted.

Sampling walks tau_S -> ... -> tau_1 -> clean; inversion walks the same grid backwards, clean -> tau_1 -> ... ->
tau_S (at partial depth both stop at / start from a timestep below T-1 instead: :func:`_sampling_walk`). Both
use :func:`ddim_step`, which queries the network at the *noisier* end of the step. A sampling step and the
inversion step over the same interval therefore use the same timestep label; they differ only in the
point where eps is evaluated (x_{t_k} vs. x_{t_(k-1)}), which is the standard DDIM inversion approximation
(Song et al. 2021, Sec. 4.3; diffusers' ``DDIMInverseScheduler``). The official DiffAE code instead queries
inversion steps at the less noisy end; on Gaussian data with the exact eps that gives a ~1.7x larger round-trip
error at every step count tested (10 to 250), and it needs a label for clean data that does not exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from harness.diffusion.schedule import respaced_timesteps

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""``(x_t (B, C, H, W), t (B,) long) -> predicted eps (B, C, H, W)``."""

CLEAN = -1
"""The pseudo-timestep of clean data: ``alpha_bar = 1`` (DDIM's alpha_0 := 1)."""


def _alpha_bar_at(alpha_bar: Tensor, t: int) -> float:
    """alpha_bar at an integer timestep as a Python float (float64); ``t = -1`` means clean data (1.0)."""
    if t == CLEAN:
        return 1.0
    if not 0 <= t < alpha_bar.shape[0]:
        raise ValueError(f"timestep {t} is outside 0..{alpha_bar.shape[0] - 1} (or -1 for clean data)")
    return float(alpha_bar[t])


def _broadcast_per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``like``'s rank, dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward noising ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (DDPM Eq. 4). (B, C, H, W).

    ``t`` is (B,) long; ``alpha_bar`` may live on any device in any float dtype (typically CPU float64).
    """
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    ab = alpha_bar.to(torch.float64)  # (T,): square roots in float64, then the table goes to x0's dtype and device
    t = t.to(x0.device)
    signal = _broadcast_per_sample(ab.sqrt().to(x0.dtype).to(x0.device)[t], x0)  # (B, 1, 1, 1)
    noise_scale = _broadcast_per_sample((1.0 - ab).sqrt().to(x0.dtype).to(x0.device)[t], x0)  # (B, 1, 1, 1)
    return signal * x0 + noise_scale * noise


def eps_loss(denoise_fn: DenoiseFn, x0: Tensor, alpha_bar: Tensor, t: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The simple epsilon-prediction loss, DiffAE Eq. 1: ``E_{t, eps} || eps_theta(x_t, t) - eps ||^2`` (scalar).

    ``t`` defaults to uniform draws from 0..T-1 and ``noise`` to standard normal draws, both from ``generator``
    (which must then live on ``x0``'s device). The mean runs over batch and pixels. This is the eps / unweighted
    case of :func:`harness.diffusion.objectives.diffusion_loss` (v targets, Min-SNR weights), which equals it
    exactly.
    """
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, alpha_bar.shape[0], (batch,), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(x0, t, noise, alpha_bar)  # (B, C, H, W)
    eps_pred = denoise_fn(x_t, t.to(x0.device))  # (B, C, H, W)
    if eps_pred.shape != noise.shape:
        raise ValueError(f"denoise_fn returned shape {tuple(eps_pred.shape)}, expected {tuple(noise.shape)}")
    return torch.mean((eps_pred.float() - noise.float()) ** 2)


def ddim_step(denoise_fn: DenoiseFn, x: Tensor, t_from: int, t_to: int, alpha_bar: Tensor,
              clip_x0: bool = False) -> Tensor:
    """One deterministic DDIM move of ``x`` from noise level ``t_from`` to ``t_to`` (Song et al. 2021, Eq. 12).

    ``t_to < t_from`` denoises (sampling), ``t_to > t_from`` noises deterministically (inversion); ``-1`` stands
    for clean data (alpha_bar = 1). The network is queried at ``max(t_from, t_to)``, the noisier end, so a step
    and its reverse share the timestep label. ``clip_x0`` clamps the predicted x_0 to [-1, 1] and re-derives eps
    from it (the DiffAE / guided-diffusion convention), keeping the step consistent with the clipped estimate.
    Returns a tensor shaped like ``x`` (B, C, H, W).
    """
    if t_from == t_to:
        raise ValueError(f"t_from and t_to must differ, both are {t_from}")
    t_query = max(t_from, t_to)
    ab_from, ab_to = _alpha_bar_at(alpha_bar, t_from), _alpha_bar_at(alpha_bar, t_to)
    t_batch = torch.full((x.shape[0],), t_query, dtype=torch.long, device=x.device)
    eps = denoise_fn(x, t_batch)  # (B, C, H, W)
    x0_pred = (x - math.sqrt(1.0 - ab_from) * eps) / math.sqrt(ab_from)  # "predicted x_0"
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
        if ab_from < 1.0:  # eps consistent with the clipped x_0; at clean data x carries no noise to re-derive
            eps = (x - math.sqrt(ab_from) * x0_pred) / math.sqrt(1.0 - ab_from)
    return math.sqrt(ab_to) * x0_pred + math.sqrt(1.0 - ab_to) * eps  # "+ direction pointing to x_t"


def _maybe_progress(iterable: list[tuple[int, int]], progress: bool, desc: str) -> Iterable[tuple[int, int]]:
    if not progress:
        return iterable
    from tqdm.auto import tqdm  # imported lazily: only interactive callers ask for a bar

    return tqdm(iterable, desc=desc, leave=False)


def _sampling_walk(num_timesteps: int, steps: int, t_start: int | None = None) -> list[tuple[int, int]]:
    """(t_from, t_to) pairs from tau_S down to clean: [(tau_S, tau_{S-1}), ..., (tau_1 = 0, -1)].

    With ``t_start`` (partial depth) the walk starts at ``t_start`` itself: the grid's timesteps below it, then
    clean, i.e. [(t_start, tau_k), (tau_k, tau_{k-1}), ..., (0, -1)] with tau_k the largest grid point < t_start.
    ``steps`` still spaces the grid over the FULL schedule 0..T-1, so a partial walk takes fewer network calls
    (about steps * t_start / (T - 1)). When ``t_start`` is on the grid the walk is the full walk's tail; otherwise
    its first step is shorter than the grid spacing. Either way the code sits exactly at ``t_start``, whatever the
    step count, so inverting with one count and decoding with another meet at the same noise level.
    """
    taus = respaced_timesteps(num_timesteps, steps).tolist()
    if t_start is not None:
        if not 0 <= t_start < num_timesteps:
            raise ValueError(f"partial depth {t_start} is outside 0..{num_timesteps - 1}")
        taus = [tau for tau in taus if tau < t_start] + [t_start]
    targets = [CLEAN] + taus[:-1]
    return list(zip(reversed(taus), reversed(targets), strict=True))


@torch.no_grad()
def ddim_sample(denoise_fn: DenoiseFn, x_T: Tensor, alpha_bar: Tensor, steps: int, clip_x0: bool = False,
                progress: bool = False, t_start: int | None = None) -> Tensor:
    """Decode ``x_T`` (at timestep T-1) to clean data with ``steps`` deterministic DDIM steps. (B, C, H, W).

    ``t_start`` (partial depth; None = T-1, the full walk) says ``x_T`` is a code at that timestep, as returned by
    :func:`ddim_invert` with ``t_end=t_start``; ``steps`` counts steps over the full schedule (see
    :func:`_sampling_walk`), so only the grid's steps below ``t_start`` are taken.
    """
    alpha_bar = alpha_bar.detach().to("cpu", torch.float64)  # scalars read per step: no device syncs in the loop
    x = x_T
    walk = _sampling_walk(alpha_bar.shape[0], steps, t_start)
    for t_from, t_to in _maybe_progress(walk, progress, "DDIM sample"):
        x = ddim_step(denoise_fn, x, t_from, t_to, alpha_bar, clip_x0=clip_x0)
    return x


@torch.no_grad()
def ddim_invert(denoise_fn: DenoiseFn, x0: Tensor, alpha_bar: Tensor, steps: int,
                progress: bool = False, t_end: int | None = None) -> Tensor:
    """Encode clean ``x0`` to its deterministic noise code ``x_T`` (timestep T-1): the sampling walk reversed.

    Decoding the result with :func:`ddim_sample` and the same ``denoise_fn`` reconstructs ``x0`` up to the
    inversion approximation, which vanishes as ``steps`` grows (DiffAE Sec. 3.2, "stochastic encoder").
    ``t_end`` (partial depth, "inversion depth"; None = T-1, the full walk) stops the walk at timestep ``t_end``
    after the grid's steps below it; ``steps`` keeps counting steps over the full schedule (see
    :func:`_sampling_walk`). Decode such a code with ``ddim_sample(..., t_start=t_end)``.
    """
    alpha_bar = alpha_bar.detach().to("cpu", torch.float64)  # scalars read per step: no device syncs in the loop
    x = x0
    walk = _sampling_walk(alpha_bar.shape[0], steps, t_end)
    reverse_walk = [(t_to, t_from) for t_from, t_to in reversed(walk)]
    for t_from, t_to in _maybe_progress(reverse_walk, progress, "DDIM invert"):
        x = ddim_step(denoise_fn, x, t_from, t_to, alpha_bar)
    return x
