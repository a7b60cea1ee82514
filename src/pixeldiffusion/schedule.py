"""Noise schedules (beta_t, alphas_cumprod) and the timestep sequences a sampler walks.

All schedule math is float64 on the CPU; callers cast to their device and dtype (MPS has no
float64). Index convention: the T noise levels are t = 0 .. T-1, as in the DDPM code, where
t = 0 is the first noising step (x_1 in the paper's 1-based notation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM (Ho et al. 2020, Sec. 4): beta_t linear from beta_start to beta_end. Shape [T]."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _betas_from_alphas_cumprod(alphas_cumprod: Tensor, max_beta: float = 0.999) -> Tensor:
    # beta_t = 1 - abar_t / abar_{t-1}, clipped as in Nichol & Dhariwal (2021), Sec. 3.2
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / prev).clamp(max=max_beta)


def cosine_betas(T: int, s: float = 0.008) -> Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021), eq. 17: abar(t) = f(t)/f(0),
    f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2. Shape [T]."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(f[1:] / f[0])


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> Tensor:
    """Sigmoid schedule of Jabri et al. (2022), "Scalable Adaptive Computation", Alg. 1:
    abar(t) = (sigmoid(end/tau) - sigmoid((t (end-start) + start)/tau)) / (sigmoid(end/tau) -
    sigmoid(start/tau)), better than cosine for larger images. Shape [T]."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    v_start, v_end = (torch.tensor([start, end], dtype=torch.float64) / tau).sigmoid()
    f = (v_end - ((steps * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    return _betas_from_alphas_cumprod(f[1:] / f[0])


def make_betas(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_t for t = 0..T-1 (float64, shape [T]) of the schedule ``name``."""
    if name == "linear":
        return linear_betas(T, beta_start, beta_end)
    if name == "cosine":
        return cosine_betas(T)
    if name == "sigmoid":
        return sigmoid_betas(T)
    raise ValueError(f"unknown beta schedule '{name}'; use linear, cosine or sigmoid")


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), float64, shape [T]."""
    return torch.cumprod(1 - betas.double(), dim=0)


def sampling_timesteps(T: int, steps: int, skip_type: str = "uniform") -> Tensor:
    """The exact descending sequence of timesteps a sampler calls the model at. Long, shape [steps].

    uniform:   trailing spacing, round(T - k*T/steps) - 1 for k = 0..steps-1; starts at T-1 and
               equals T-1..0 when steps == T (Lin et al. 2024, "Common Diffusion Noise Schedules
               and Sample Steps are Flawed", Table 2).
    quadratic: DDIM's spacing for CIFAR-10 (Song et al. 2021, App. D.2), t ~ (k * sqrt(0.8 T)/
               (steps-1))^2, dense near t = 0.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the model's timesteps); got {steps}")
    if skip_type == "uniform":
        seq = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif skip_type == "quadratic":
        ascending = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
        # at many steps the low end repeats; push repeats up so every call is at a new t
        k = np.arange(steps)
        seq = (np.maximum.accumulate(ascending - k) + k)[::-1]
    else:
        raise ValueError(f"unknown skip type '{skip_type}'; use uniform or quadratic")
    seq = torch.from_numpy(seq.copy())
    assert bool((seq[:-1] > seq[1:]).all()) and 0 <= int(seq[-1]) and int(seq[0]) < T, seq
    return seq
