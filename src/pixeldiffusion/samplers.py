"""Samplers: one function each, one contract (STYLE.md section 1).

    sampler(denoise, x_T, timesteps, alphas_cumprod, *, generator, callback, **opts) -> x_0

- ``denoise(x_t, t) -> (x0, eps)``: the network, wrapped once by ``make_denoiser`` (any prediction
  type, optional x0 clipping). ``t`` is a Python int in [0, T-1].
- ``timesteps``: descending long tensor, exactly the timesteps the model is called at, one call
  (one NFE) each; after the last one the sampler steps to "t = -1", i.e. abar = 1, the data.
- ``alphas_cumprod``: float64 [T], the training schedule; coefficients are Python floats, so
  nothing float64 touches the device.
- ``callback({"i", "t", "x_t", "x0"})`` after each model call: the input x_t of step i and the
  model's prediction of x0; denoise / progressive pictures are built from it.

Adding a sampler means adding one function here and one entry to ``SAMPLERS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .diffusion import x0_eps_from_output
from .schedule import sampling_timesteps

Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]
Callback = Callable[[dict[str, Any]], None]


def make_denoiser(model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, *,
                  prediction: str = "eps", clip_x0: bool = True) -> Denoiser:
    """Wrap ``model(x_t, t_batch) -> eps | x0 | v`` into ``denoise(x_t, t) -> (x0, eps)``.

    With ``clip_x0`` the predicted x0 is clamped to [-1, 1] and eps recomputed from it so that
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds; without it the math is untouched.
    """
    def denoise(x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        abar = torch.tensor(float(alphas_cumprod[t]), device=x_t.device, dtype=x_t.dtype)
        x0, eps = x0_eps_from_output(prediction, model(x_t, t_batch).to(x_t.dtype), x_t, abar)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return x0, eps
    return denoise


def _abar(alphas_cumprod: Tensor, t: int) -> float:
    return 1.0 if t < 0 else float(alphas_cumprod[t])


def _pairs(timesteps: Tensor) -> list[tuple[int, int]]:
    """(t, t_prev) for every step: the timestep called and the one stepped to (-1 = data)."""
    ts = [int(t) for t in timesteps]
    return list(zip(ts, ts[1:] + [-1], strict=True))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddim(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
         eta: float = 0.0, generator: torch.Generator | None = None,
         callback: Callback | None = None) -> Tensor:
    """DDIM (Song et al. 2021), eq. 12 with sigma from eq. 16:

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).
    eta = 0 is deterministic; eta = 1 is DDPM's posterior (fixed_small variance).
    """
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        x0, eps = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        abar_t, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
    return x


@torch.no_grad()
def ddpm(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
         var_type: str = "fixed_small", generator: torch.Generator | None = None,
         callback: Callback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) through the posterior q(x_prev | x_t, x0)
    (eq. 6-7), generalised to skipped steps with beta = 1 - abar_t / abar_prev:

    mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_prev)/(1 - abar_t) x_t
    var  = beta (1 - abar_prev)/(1 - abar_t)   (fixed_small, beta tilde)   or   beta (fixed_large).
    No noise is added on the last step.
    """
    if var_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown var_type '{var_type}'; use fixed_small or fixed_large")
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        abar_t, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
        beta = 1 - abar_t / abar_prev
        x = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 \
            + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * x
        if t_prev >= 0:
            var = beta * (1 - abar_prev) / (1 - abar_t) if var_type == "fixed_small" else beta
            x = x + math.sqrt(var) * _noise(x, generator)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm, "ddim": ddim}


def sample(model: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, alphas_cumprod: Tensor, *,
           sampler: str = "ddim", steps: int = 100, skip_type: str = "uniform",
           prediction: str = "eps", clip_x0: bool = True, generator: torch.Generator | None = None,
           callback: Callback | None = None, **options: Any) -> Tensor:
    """Draw x_0 from any noise-, x0- or v-prediction model.

    model: ``model(x_t, t) -> eps | x0 | v`` with x_t [N, C, H, W] and t long [N] in [0, T-1].
    x_T: [N, C, H, W] standard normal noise. alphas_cumprod: the training schedule, shape [T].
    options: the sampler's own keywords (``eta`` for ddim, ``var_type`` for ddpm).
    Returns x_0 [N, C, H, W], in [-1, 1] for image models.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")
    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, skip_type)
    denoise = make_denoiser(model, alphas_cumprod, prediction=prediction, clip_x0=clip_x0)
    return SAMPLERS[sampler](denoise, x_T, timesteps, alphas_cumprod, generator=generator,
                             callback=callback, **options)
