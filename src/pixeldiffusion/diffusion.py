"""The forward process q(x_t | x0), the eps / x0 / v parameterisations, and the training loss.

Notation (Ho et al. 2020): abar_t = alphas_cumprod[t], x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Timesteps index alphas_cumprod: t in [0, T-1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v")


def gather(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """abar_t for a batch of timesteps, shaped [N, 1, 1, 1] to broadcast against ``like``
    (cast to like's device and dtype). ``t``: long [N] in [0, T-1]."""
    abar = alphas_cumprod.to(like.device)[t]
    return abar.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, abar_t: Tensor, eps: Tensor) -> Tensor:
    """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)  (DDPM eq. 4)."""
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps


def v_target(x0: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0  (Salimans & Ho 2022, Sec. 4)."""
    return abar_t.sqrt() * eps - (1 - abar_t).sqrt() * x0


def target(prediction: str, x0: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """What a network of the given ``prediction`` type is trained to output."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_target(x0, eps, abar_t)
    raise ValueError(f"unknown prediction '{prediction}'; use one of {PREDICTIONS}")


def x0_eps_from_output(prediction: str, output: Tensor, x_t: Tensor,
                       abar_t: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output at x_t; inverts ``target`` exactly.

    eps: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)          (DDPM eq. 15, rearranged)
    x0:  eps = (x_t - sqrt(abar) x0) / sqrt(1-abar)
    v:   x0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(1-abar) x_t + sqrt(abar) v
         (Salimans & Ho 2022, App. D)
    """
    sqrt_abar, sqrt_one_minus = abar_t.sqrt(), (1 - abar_t).sqrt()
    if prediction == "eps":
        return (x_t - sqrt_one_minus * output) / sqrt_abar, output
    if prediction == "x0":
        return output, (x_t - sqrt_abar * output) / sqrt_one_minus
    if prediction == "v":
        return sqrt_abar * x_t - sqrt_one_minus * output, sqrt_one_minus * x_t + sqrt_abar * output
    raise ValueError(f"unknown prediction '{prediction}'; use one of {PREDICTIONS}")


def min_snr_weight(prediction: str, abar_t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8), expressed for each target so the
    effective x0-space weight is min(SNR, gamma): eps -> min(SNR, g)/SNR, x0 -> min(SNR, g),
    v -> min(SNR, g)/(SNR + 1). SNR_t = abar_t / (1 - abar_t)."""
    snr = abar_t / (1 - abar_t)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def training_loss(model: Callable[..., Tensor], x0: Tensor, alphas_cumprod: Tensor, *,
                  prediction: str = "eps", loss: str = "l2", min_snr_gamma: float = 0.0,
                  generator: torch.Generator | None = None, **model_kwargs) -> Tensor:
    """DDPM's simple loss (Ho et al. 2020, Alg. 1 / eq. 14) for a batch, as a scalar.

    x0: [N, C, H, W] in [-1, 1]. t ~ U{0..T-1} and eps ~ N(0, I) are drawn from ``generator``
    (on x0's device). ``model(x_t, t, **model_kwargs)`` predicts ``prediction``.
    """
    n, T = x0.shape[0], alphas_cumprod.shape[0]
    t = torch.randint(0, T, (n,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    abar_t = gather(alphas_cumprod, t, x0)
    output = model(q_sample(x0, abar_t, eps), t, **model_kwargs).float()
    error = output - target(prediction, x0, eps, abar_t).float()
    per_sample = (error.square() if loss == "l2" else error.abs()).flatten(1).mean(1)
    if min_snr_gamma > 0:
        weight = min_snr_weight(prediction, abar_t.flatten().float(), min_snr_gamma)
        per_sample = per_sample * weight
    return per_sample.mean()
