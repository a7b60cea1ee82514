"""Noise schedules (beta_t, alphas_cumprod) and the timestep sequences a sampler walks.

All schedule math is float64 on the CPU; callers cast to their device and dtype (MPS has no
float64). The one exception is ``DeviceTable``: the same look-ups, per model call, on the
input's device. Index convention: the T noise levels are t = 0 .. T-1, as in the DDPM code, where
t = 0 is the first noising step (x_1 in the paper's 1-based notation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .errors import did_you_mean

if TYPE_CHECKING:
    from .config import Config


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


def alphas_cumprod_of(cfg: Config) -> Tensor:
    """The noise levels abar_t a config's model samples over: float64 [T] on the CPU. For DDPM
    its beta schedule; for EDM and flow matching their VP table (``formulations.bridge_for``;
    their networks are sampled through ``bridge_for(cfg.diffusion).wrap``)."""
    from .formulations import alphas_cumprod_for  # formulations builds on this module

    return alphas_cumprod_for(cfg.diffusion)


def sigma_of(abar: float | Tensor) -> float | Tensor:
    """EDM's noise level sigma = sqrt((1 - abar) / abar) of x_t / sqrt(abar) = x0 + sigma eps
    (Karras et al. 2022, Table 1, VP column); log-SNR/2: lambda_ = -log(sigma).

    A float gives a float (0 at the data, abar = 1); a tensor (e.g. the schedule [T]) gives
    float64 of its shape, increasing in t.
    """
    if isinstance(abar, Tensor):
        abar = abar.double()
        return ((1 - abar) / abar).sqrt()
    return math.sqrt(max(1.0 - abar, 0.0) / abar)


def vp_scalings(abar: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_) of abar_t in DPM-Solver's notation (Lu et al. 2022):
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_ = log(alpha_t / sigma_t);
    lambda_ = inf at the data (abar = 1)."""
    alpha, sigma = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)


def alphas_cumprod_at(alphas_cumprod: Tensor, t: Tensor | float) -> Tensor | float:
    """abar at (possibly non-integer) timesteps t in [0, T-1].

    A tensor t gives float64 of t's shape. A number t gives a float, and t < 0 (the samplers'
    t = -1, one step past t = 0) gives abar = 1, the data.

    Integer t is an exact table look-up. Between two integers, log(sigma) is interpolated
    linearly and abar = 1 / (1 + sigma^2), as k-diffusion's ``DiscreteSchedule`` and diffusers'
    ``_sigma_to_t`` do, so ``timestep_of_sigma`` inverts it exactly.
    """
    if not isinstance(t, Tensor):
        if t < 0:
            return 1.0
        if float(t).is_integer() and t <= len(alphas_cumprod) - 1:
            return float(alphas_cumprod[int(t)])
        t = torch.tensor(float(t), dtype=torch.float64)
        return float(alphas_cumprod_at(alphas_cumprod, t))
    ac = alphas_cumprod.detach().double().cpu()
    t = t.to(dtype=torch.float64, device="cpu")
    _check_timesteps(t, len(ac))
    return _abar_at(ac, sigma_of(ac).log(), t)


def _check_timesteps(t: Tensor, T: int) -> None:
    """ValueError unless every timestep in ``t`` (on the CPU) lies in [0, T-1]."""
    if not bool(((t >= 0) & (t <= T - 1)).all()):
        raise ValueError(f"timesteps must lie in [0, {T - 1}]; got {t.tolist()}")


def _abar_at(ac: Tensor, log_sigma: Tensor, t: Tensor) -> Tensor:
    """``alphas_cumprod_at`` of float64 t in [0, T-1] (not checked) on t's device, where
    ``ac`` and its ``log_sigma`` (float64 [T]) already are: exact on integers, log(sigma)
    linear between them."""
    low = t.floor().long()
    high = (low + 1).clamp(max=len(ac) - 1)
    frac = t - low
    interpolated = log_sigma[low] * (1 - frac) + log_sigma[high] * frac
    return torch.where(frac == 0, ac[low], 1 / (1 + (2 * interpolated).exp()))


def timestep_of_sigma(alphas_cumprod: Tensor, sigma: Tensor) -> Tensor:
    """The float timestep t whose noise level is ``sigma`` (inverse of ``alphas_cumprod_at``;
    log(sigma) linear between integer steps). sigma is clamped to the schedule's range.
    float64 of sigma's shape, on the CPU."""
    log_sigma = sigma_of(alphas_cumprod.detach().cpu()).log()
    target = np.log(np.asarray(sigma, dtype=np.float64))
    return _timestep_of(log_sigma, torch.as_tensor(target, dtype=torch.float64))


def _timestep_of(log_sigma: Tensor, target: Tensor) -> Tensor:
    """``np.interp(target, log_sigma, arange(T))`` in the same float64 arithmetic, on the
    device of ``target`` (log sigma, any shape) and ``log_sigma`` (float64 [T], increasing):
    0 below the table, T - 1 at or above its end."""
    T = len(log_sigma)
    j = (torch.searchsorted(log_sigma, target.contiguous(), right=True) - 1).clamp(0, T - 2)
    slope = 1.0 / (log_sigma[j + 1] - log_sigma[j])  # numpy's (fp[j+1] - fp[j]) / (...), fp = t
    t = slope * (target - log_sigma[j]) + j
    t = torch.where(target >= log_sigma[-1], T - 1.0, t)
    return torch.where(target < log_sigma[0], 0.0, t)


class DeviceTable:
    """A VP table's per-model-call look-ups on the input's device: ``abar_at(t)`` is
    ``alphas_cumprod_at`` and ``timestep_of(sigma)`` ``timestep_of_sigma``, with the same
    float64 arithmetic, but the table and its log sigma are copied to each device once, so a
    call on a GPU costs no copy to the host and no host sync. MPS, which has no float64, looks
    up on the CPU. Results are float64 of the input's shape; callers cast as before.

    alphas_cumprod: float64 [T] (any device). Timesteps are checked against [0, T-1] on the CPU
    only (the check reads the values; elsewhere it would stall the GPU): the samplers' timesteps
    are checked before their loop (``sampling_timesteps``).
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = alphas_cumprod.detach().double().cpu()
        self.T = len(ac)
        self._copies: dict[torch.device, tuple[Tensor, Tensor]] = {
            torch.device("cpu"): (ac, sigma_of(ac).log())}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(abar, log sigma) on ``device`` (the CPU for MPS), copied there on first use."""
        if device.type == "mps":
            device = torch.device("cpu")
        if device not in self._copies:
            ac, log_sigma = self._copies[torch.device("cpu")]
            self._copies[device] = (ac.to(device), log_sigma.to(device))
        return self._copies[device]

    def abar_at(self, t: Tensor) -> Tensor:
        """abar at the timesteps ``t`` (long or float, any shape, in [0, T-1])."""
        ac, log_sigma = self._on(t.device)
        t = t.detach().to(device=ac.device, dtype=torch.float64)
        if t.device.type == "cpu":
            _check_timesteps(t, self.T)
        return _abar_at(ac, log_sigma, t)

    def timestep_of(self, sigma: Tensor) -> Tensor:
        """The float timestep of each noise level in ``sigma`` (> 0, any shape), clamped to the
        table's range."""
        _, log_sigma = self._on(sigma.device)
        return _timestep_of(log_sigma, sigma.detach().to(log_sigma.device, torch.float64).log())


SPACINGS = ("uniform", "leading", "linspace", "quadratic", "karras", "logsnr")
MODEL_SPACINGS = ("optimal",)  # fitted to a model: optimal_steps.calibrated_timesteps


def _explicit(spacing: str | Sequence[float] | Tensor) -> Tensor | None:
    """An explicit list of timesteps (a sequence, or text such as "999,500,100"), else None."""
    if isinstance(spacing, str):
        if not spacing.replace(",", "").replace(".", "").replace(" ", "").isdigit():
            return None
        values = [float(v) for v in spacing.split(",") if v.strip()]
    else:
        values = [float(v) for v in spacing]
    seq = torch.tensor(values, dtype=torch.float64)
    return seq.long() if bool((seq == seq.round()).all()) else seq


def karras_sigmas(n: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, even in sigma^(1/rho) (EDM eq. 5),
    float64 [n]."""
    ramp = np.linspace(0, 1, n)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def sampling_timesteps(T: int, steps: int, spacing: str | Sequence[float] | Tensor = "uniform",
                       alphas_cumprod: Tensor | None = None, *, rho: float = 7.0) -> Tensor:
    """The exact descending sequence of timesteps a sampler calls the model at, shape [steps].

    Integer spacings return a long tensor; ``karras`` and ``logsnr`` return float64 timesteps
    (abar between integers: ``alphas_cumprod_at``). After the last one, samplers step to the
    data (abar = 1). With n = steps:

    uniform:   trailing, round(T - k T/n) - 1, k = 0..n-1: starts at T-1, ends at T/n - 1; all of
               T-1..0 when n = T (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
               Steps are Flawed", Table 2).
    leading:   k floor(T/n) for k = n-1..0, DDIM's original code (Song et al. 2021); ends at 0
               but starts at (n-1) floor(T/n), below T-1 (Lin et al. 2024 show why that hurts).
    linspace:  round(linspace(T-1, 0, n)): starts at T-1, ends at 0 (Lin et al. 2024, Table 2).
    quadratic: DDIM's CIFAR-10 spacing (Song et al. 2021, App. D.2), t ~ (k sqrt(0.8 T)/(n-1))^2,
               dense near t = 0; starts at int(0.8 T) (later when steps near T push repeated
               low timesteps up), ends at 0.
    karras:    EDM's sigma_k = (sigma_max^(1/rho) + k/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))
               ^rho (Karras et al. 2022, eq. 5, rho = 7) between sigma(T-1) and sigma(0):
               starts at T-1, ends at 0. Needs ``alphas_cumprod``.
    logsnr:    uniform in lambda_ = log(alpha/sigma) from lambda_(T-1) to lambda_(0) (Lu et al.
               2022, DPM-Solver, Sec. 3.3 "time uniform in lambda"): starts at T-1, ends at 0.
               Needs ``alphas_cumprod``.
    optimal:   fitted to a model (``optimal_steps.optimal_timesteps``); not available here.
    A list or tensor of timesteps (or text "999,500,100"): used as given; it must be strictly
    decreasing within [0, T-1]; ``steps`` is then ignored (the list's length is the count).
    """
    explicit = _explicit(spacing)
    if explicit is not None:
        if not (len(explicit) and bool((explicit[:-1] > explicit[1:]).all())
                and float(explicit[-1]) >= 0 and float(explicit[0]) <= T - 1):
            raise ValueError(f"explicit timesteps must be strictly decreasing within [0, {T - 1}];"
                             f" got {explicit.tolist()}")
        return explicit
    if spacing in MODEL_SPACINGS:
        raise ValueError(f"the '{spacing}' spacing is fitted to a model: fit it with "
                         f"optimal_steps.calibrated_timesteps and pass the timesteps it returns")
    if spacing not in SPACINGS:
        names = SPACINGS + MODEL_SPACINGS
        raise ValueError(f"unknown spacing '{spacing}'; {did_you_mean(spacing, names)}use one of "
                         f"{', '.join(names)} or a comma-separated list of timesteps")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the model's timesteps); got {steps}")
    if spacing in ("karras", "logsnr"):
        if alphas_cumprod is None:
            raise ValueError(f"the '{spacing}' spacing needs alphas_cumprod")
        sigmas = sigma_of(alphas_cumprod)
        sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
        ramp = np.linspace(0, 1, steps)
        if spacing == "karras":
            sigma = karras_sigmas(steps, sigma_max, sigma_min, rho)
        else:  # uniform in lambda_ = -log(sigma)
            sigma = np.exp(np.log(sigma_max) + ramp * (np.log(sigma_min) - np.log(sigma_max)))
        seq = timestep_of_sigma(alphas_cumprod, torch.from_numpy(sigma))
        seq[0] = T - 1  # exact end points, free of round-off
        if steps > 1:
            seq[-1] = 0
        assert bool((seq[:-1] > seq[1:]).all()), seq
        return seq
    if spacing == "uniform":
        seq = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        seq = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "linspace":
        seq = np.round(np.linspace(T - 1, 0, steps)).astype(np.int64)
    else:  # quadratic
        ascending = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
        # at many steps the low end repeats; push repeats up so every call is at a new t
        k = np.arange(steps)
        seq = (np.maximum.accumulate(ascending - k) + k)[::-1]
    seq = torch.from_numpy(seq.copy())
    assert bool((seq[:-1] > seq[1:]).all()) and 0 <= int(seq[-1]) and int(seq[0]) < T, seq
    return seq
