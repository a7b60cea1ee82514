"""Samplers: one function each, one contract (STYLE.md section 1).

    sampler(denoise, x_T, timesteps, alphas_cumprod, *, generator, callback, **opts) -> x_0

- ``denoise(x_t, t) -> (x0, eps)``: the network, wrapped once by ``make_denoiser`` (any prediction
  type, optional x0 clipping or dynamic thresholding). ``t`` is a Python number in [0, T-1]:
  an int for integer spacings, a float for ``karras`` / ``logsnr`` (abar between integer steps is
  interpolated in log-sigma, ``schedule.alphas_cumprod_at``).
- ``timesteps``: descending tensor, exactly the timesteps the model is called at; after the last
  one the sampler steps to "t = -1", i.e. abar = 1, the data. One-model-call-per-timestep samplers
  (all but ``heun``) use one NFE per timestep. ``heun`` calls the model twice at every timestep
  but the first (its corrector evaluation, then the next step's own), so n timesteps cost
  2n - 1 NFE; the last step to the data is an Euler step (EDM Alg. 2, line 7).
- ``alphas_cumprod``: float64 [T], the training schedule; coefficients are Python floats, so
  nothing float64 touches the device.
- ``callback({"i", "t", "x_t", "x0"})`` once per timestep, after the model call at x_t: the input
  x_t of step i and the model's prediction of x0; denoise / progressive pictures come from it.

Notation (Lu et al. 2022, DPM-Solver): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (the VP
noise std), lambda_ = log(alpha_t / sigma_t) (half the log-SNR); EDM's sigma is sigma_t / alpha_t.
At the data, sigma_t = 0 and lambda_ = inf; multistep methods take that last step at first order
(x_0 = the last predicted x0), as DPM-Solver++ and UniPC do with ``lower_order_final``.

Adding a sampler means adding one function here and one entry to ``SAMPLERS``; its keyword-only
parameters are its options (``option_names``), which a run fills from the ``config.SampleConfig``
fields of the same name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .diffusion import x0_eps_from_output
from .errors import did_you_mean
from .schedule import (
    MODEL_SPACINGS,
    alphas_cumprod_at,
    sampling_timesteps,
    sigma_of,
    timestep_of_sigma,
    vp_scalings,
)

Denoiser = Callable[[Tensor, float], tuple[Tensor, Tensor]]
Callback = Callable[[dict[str, Any]], None]


def _as_timestep(t: float | int) -> int | float:
    """Integer-valued timesteps as int (the model gets a long tensor, as in training)."""
    return int(t) if float(t).is_integer() else float(t)


def make_denoiser(model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, *,
                  prediction: str = "eps", clip_x0: bool = True,
                  dynamic_threshold: float = 0.0) -> Denoiser:
    """Wrap ``model(x_t, t_batch) -> eps | x0 | v`` into ``denoise(x_t, t) -> (x0, eps)``.

    t_batch is long [N] for integer t and float [N] (x_t's float dtype) otherwise.
    With ``clip_x0`` the predicted x0 is clamped to [-1, 1] and eps recomputed from it so that
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds (GLIDE / the DDPM code). With
    ``dynamic_threshold`` p in (0, 1) (Imagen, Saharia et al. 2022, Sec. 2.3), each sample's x0 is
    clamped to [-s, s] and divided by s, s = max(1, the p-quantile of |x0|); it replaces
    ``clip_x0``. Both off (False, 0): the model's output is used untouched.
    """
    if not 0.0 <= dynamic_threshold < 1.0:
        raise ValueError(f"dynamic_threshold is a quantile in (0, 1), e.g. 0.995, or 0 for off; "
                         f"got {dynamic_threshold}")
    alphas_cumprod = alphas_cumprod.detach().double().cpu()

    def denoise(x_t: Tensor, t: float) -> tuple[Tensor, Tensor]:
        t = _as_timestep(t)
        dtype = torch.long if isinstance(t, int) else \
            (x_t.dtype if x_t.is_floating_point() else torch.float32)
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=dtype)
        abar = torch.tensor(alphas_cumprod_at(alphas_cumprod, t), device=x_t.device,
                            dtype=x_t.dtype)
        x0, eps = x0_eps_from_output(prediction, model(x_t, t_batch).to(x_t.dtype), x_t, abar)
        if dynamic_threshold > 0:  # Imagen, Sec. 2.3
            s = torch.quantile(x0.flatten(1).abs().float(), dynamic_threshold, dim=1)
            s = s.clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        elif clip_x0:
            x0 = x0.clamp(-1, 1)
        if dynamic_threshold > 0 or clip_x0:
            eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return x0, eps
    return denoise


def _pairs(timesteps: Tensor) -> list[tuple[float, float]]:
    """(t, t_prev) for every step: the timestep called and the one stepped to (-1 = data)."""
    ts = [_as_timestep(t) for t in timesteps.tolist()]
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
        abar_t = alphas_cumprod_at(alphas_cumprod, t)
        abar_prev = alphas_cumprod_at(alphas_cumprod, t_prev)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
    return x


VAR_TYPES = ("fixed_small", "fixed_large")


def check_var_type(var_type: str) -> None:
    """Raise a ValueError naming the choices for an unknown DDPM variance."""
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type '{var_type}'; use fixed_small or fixed_large")


def ddpm_posterior(x0: Tensor, x_t: Tensor, abar_t: float, abar_prev: float,
                   var_type: str = "fixed_small") -> tuple[Tensor, float]:
    """(mean, variance) of the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7),
    generalised to skipped steps with beta = 1 - abar_t / abar_prev:

    mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_prev)/(1 - abar_t) x_t
    var  = beta (1 - abar_prev)/(1 - abar_t)   (fixed_small, beta tilde)   or   beta (fixed_large).

    x0, x_t: tensors of one shape; abar_prev = 1 (the data) gives mean = x0 and var = 0.
    """
    beta = 1 - abar_t / abar_prev
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 \
        + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * x_t
    var = beta * (1 - abar_prev) / (1 - abar_t) if var_type == "fixed_small" else beta
    return mean, var


@torch.no_grad()
def ddpm(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
         var_type: str = "fixed_small", generator: torch.Generator | None = None,
         callback: Callback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): x_prev ~ q(x_prev | x_t, x0) with the
    model's x0 (``ddpm_posterior``). No noise is added on the last step."""
    check_var_type(var_type)
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        x, var = ddpm_posterior(x0, x, alphas_cumprod_at(alphas_cumprod, t),
                                alphas_cumprod_at(alphas_cumprod, t_prev), var_type)
        if t_prev >= 0:
            x = x + math.sqrt(var) * _noise(x, generator)
    return x


@torch.no_grad()
def euler(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
          generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Euler on the probability-flow ODE in EDM's variables (Karras et al. 2022, Alg. 1 with the
    VP scaling s_t = alpha_t of Table 1): x~ = x_t / alpha_t, dx~/dsigma = (x~ - x0)/sigma = eps,

        x~_next = x~ + (sigma_next - sigma) eps,    x_next = alpha_next x~_next.

    In exact arithmetic this is DDIM with eta = 0 (Karras et al. 2022, Sec. 3, "DDIM is Euler").
    """
    return heun(denoise, x_T, timesteps, alphas_cumprod, generator=generator, callback=callback,
                second_order=False)


@torch.no_grad()
def heun(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
         s_noise: float = 1.0, second_order: bool = True,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Alg. 2) in VP form (x~ = x_t / alpha_t,
    sigma = sqrt((1 - abar)/abar), d = (x~ - x0)/sigma):

        gamma = min(S_churn/N, sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0   (line 4)
        sigma_hat = (1 + gamma) sigma, x~_hat = x~ + sqrt(sigma_hat^2 - sigma^2) S_noise z (5-6)
        x~_next = x~_hat + (sigma_next - sigma_hat) d                                (7-8)
        x~_next = x~_hat + (sigma_next - sigma_hat) (d + d')/2, d' at (x~_next, sigma_next) (9-11)

    The last step (to sigma = 0) is Euler. NFE = 2 n - 1 for n timesteps. With s_churn > 0 the
    model is evaluated at sigma_hat (a float timestep between those of the spacing).
    ``second_order=False`` is Alg. 1 / ``euler``.
    """
    x_tilde = x_T / math.sqrt(alphas_cumprod_at(alphas_cumprod, float(timesteps[0])))
    pairs = _pairs(timesteps)
    for i, (t, t_prev) in enumerate(pairs):
        abar_t = alphas_cumprod_at(alphas_cumprod, t)
        abar_prev = alphas_cumprod_at(alphas_cumprod, t_prev)
        sigma, sigma_next = sigma_of(abar_t), sigma_of(abar_prev)
        gamma = min(s_churn / len(pairs), math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0:  # Alg. 2 lines 4-6: raise the noise level to sigma_hat
            sigma_hat = min(sigma * (1 + gamma), sigma_of(float(alphas_cumprod[-1])))
            x_tilde = x_tilde + math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * s_noise \
                * _noise(x_tilde, generator)
            t_hat = _as_timestep(float(timestep_of_sigma(alphas_cumprod, torch.tensor(sigma_hat))))
            sigma, abar_t, t = sigma_hat, alphas_cumprod_at(alphas_cumprod, t_hat), t_hat
        x_t = x_tilde * math.sqrt(abar_t)
        x0, _ = denoise(x_t, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x_t, "x0": x0})
        d = (x_tilde - x0) / sigma                                    # Alg. 2 line 7
        x_next = x_tilde + (sigma_next - sigma) * d                   # line 8
        if second_order and t_prev >= 0:                              # lines 9-11
            x0_next, _ = denoise(x_next * math.sqrt(abar_prev), t_prev)
            d_prime = (x_next - x0_next) / sigma_next
            x_next = x_tilde + (sigma_next - sigma) * (0.5 * d + 0.5 * d_prime)
        x_tilde = x_next
    return x_tilde


@torch.no_grad()
def euler_ancestral(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
                    eta: float = 1.0, s_noise: float = 1.0,
                    generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, after Song et al. 2021b's
    reverse SDE): in EDM variables, step down to sigma_down deterministically, then add noise
    sigma_up so the marginal is right at sigma_next:

        sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),
        x~_next = x~ + (sigma_down - sigma) eps + s_noise sigma_up z.

    With eta = 1 this is exactly DDPM's posterior step (DDIM eq. 16 with eta = 1, rescaled by
    alpha); eta = 0 is ``euler``.
    """
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        x0, eps = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        abar_t = alphas_cumprod_at(alphas_cumprod, t)
        abar_prev = alphas_cumprod_at(alphas_cumprod, t_prev)
        sigma, sigma_next = sigma_of(abar_t), sigma_of(abar_prev)
        sigma_up = min(sigma_next,
                       eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x_tilde = x0 + sigma_down * eps                     # x~ + (sigma_down - sigma) eps
        if sigma_up > 0:
            x_tilde = x_tilde + s_noise * sigma_up * _noise(x, generator)
        x = math.sqrt(abar_prev) * x_tilde
    return x


@torch.no_grad()
def dpmpp_2m(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
             generator: torch.Generator | None = None,
             callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Alg. 2), data prediction, multistep:

        h = lambda_next - lambda_t, r = h_last / h,
        D = (1 + 1/(2r)) x0_t - 1/(2r) x0_last        (first step: D = x0_t)
        x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) D.

    The step to the data is first order (x_0 = x0_t). ``dpmpp_2m_sde`` with eta = 0 is this.
    """
    return dpmpp_2m_sde(denoise, x_T, timesteps, alphas_cumprod, eta=0.0, generator=generator,
                        callback=callback)


@torch.no_grad()
def dpmpp_2m_sde(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
                 eta: float = 1.0, s_noise: float = 1.0, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5 / App. B "SDE-DPM-Solver++2M", eq. 18 with
    k-diffusion's ``eta``), data prediction, midpoint form:

        h = lambda_next - lambda_t,  x_next = (sigma_next/sigma_t) exp(-eta h) x_t
              + alpha_next (1 - exp(-(1+eta) h)) (x0_t + (x0_t - x0_last) / (2r))
              + s_noise sigma_next sqrt(1 - exp(-2 eta h)) z.

    eta = 1 is the SDE of the paper; eta = 0 is the ODE solver ``dpmpp_2m``.
    """
    x = x_T
    x0_last, h_last = None, 0.0
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        _, sigma_t, lambda_t = vp_scalings(alphas_cumprod_at(alphas_cumprod, t))
        alpha_next, sigma_next, lambda_next = vp_scalings(alphas_cumprod_at(alphas_cumprod, t_prev))
        if t_prev < 0:  # to the data: first order, x_0 = x0
            return x0
        h = lambda_next - lambda_t
        D = x0 if x0_last is None else x0 + (x0 - x0_last) * (h / h_last / 2)
        x = (sigma_next / sigma_t * math.exp(-eta * h)) * x \
            - alpha_next * math.expm1(-(1 + eta) * h) * D
        if eta > 0:
            x = x + s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) \
                * _noise(x, generator)
        x0_last, h_last = x0, h
    return x


@torch.no_grad()
def dpmpp_3m(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
             generator: torch.Generator | None = None,
             callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(3M), 3rd-order multistep in data prediction (Lu et al. 2022b, App. A; the
    third-order update of Lu et al. 2022a, "DPM-Solver", Alg. 2 in x0 form), h = lambda_next -
    lambda_t, r0 = h_0/h, r1 = h_1/h (the last two step sizes):

        D1_0 = (x0_t - x0_1)/r0,  D1_1 = (x0_1 - x0_2)/r1,
        D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r0 + r1),
        x_next = (sigma_next/sigma_t) x_t - alpha_next (e^{-h} - 1) x0_t
                 + alpha_next ((e^{-h} - 1)/h + 1) D1 - alpha_next ((e^{-h} - 1 + h)/h^2 - 1/2) D2.

    Warm-up: 1st then 2nd order; the last step before the data is 2nd order and the step to the
    data first order (``lower_order_final``).
    """
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0, lambda_) of earlier steps, newest last
    pairs = _pairs(timesteps)
    for i, (t, t_prev) in enumerate(pairs):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        _, sigma_t, lambda_t = vp_scalings(alphas_cumprod_at(alphas_cumprod, t))
        alpha_next, sigma_next, lambda_next = vp_scalings(alphas_cumprod_at(alphas_cumprod, t_prev))
        if t_prev < 0:
            return x0
        h = lambda_next - lambda_t
        order = min(3, len(history) + 1, len(pairs) - i)
        phi_1 = math.expm1(-h)
        x_next = (sigma_next / sigma_t) * x - alpha_next * phi_1 * x0
        if order >= 2:
            x0_1, lambda_1 = history[-1]
            r0 = (lambda_t - lambda_1) / h
            D1_0 = (x0 - x0_1) / r0
            if order == 2:  # DPM-Solver++(2M), eq. above with D2 = 0 and D1 = D1_0, midpoint
                x_next = x_next - 0.5 * alpha_next * phi_1 * D1_0
            else:
                x0_2, lambda_2 = history[-2]
                r1 = (lambda_1 - lambda_2) / h
                D1_1 = (x0_1 - x0_2) / r1
                D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                x_next = x_next + alpha_next * (phi_1 / h + 1) * D1 \
                    - alpha_next * ((phi_1 + h) / h**2 - 0.5) * D2
        history = [*history[-1:], (x0, lambda_t)]
        x = x_next
    return x


def _unipc_coefficients(rks: Sequence[float], h: float, variant: str,
                        order: int) -> tuple[float, list[float]]:
    """B(h) and the solution rho of R rho = b for UniPC (Zhao et al. 2023, Alg. 2 / eq. 8) in
    data prediction (hh = -h): R[k, j] = r_j^k, b_k = (h phi_{k+1}(hh) k!) / B(h), with
    h phi_1 = e^{hh} - 1 and h phi_{k+1} = h phi_k / hh - 1/k!. bh1: B(h) = hh, bh2: e^{hh} - 1."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[r ** (k - 1) for r in rks] for k in range(1, order + 1)],
                     dtype=torch.float64)
    rho = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64))
    return B_h, rho.tolist()


@torch.no_grad()
def unipc(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
          order: int = 3, variant: str = "bh2", corrector: bool = True,
          lower_order_final: bool = True, generator: torch.Generator | None = None,
          callback: Callback | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), multistep,
    data prediction, Alg. 2 (UniP-p) and Alg. 1 / eq. 8 (UniC-p), B(h) = h ("bh1") or e^h - 1
    ("bh2"). With h = lambda_next - lambda_t, D_k = (x0_k - x0_t)/r_k, r_k = (lambda_k -
    lambda_t)/h:

        UniP:  x_next = (sigma_next/sigma_t) x_t - alpha_next (e^{-h} - 1) x0_t
                        - alpha_next B(h) sum_k rho_k D_k          (order 2: rho = 1/2)
        UniC:  x_next^c = same with the model's x0 at x_next as one more D (r = 1),
               rho_c solving R rho = b one order higher (order 1: rho_c = 1/2).

    The corrector reuses the model call at x_next that the next step needs anyway, so UniPC
    costs one NFE per timestep; there is no corrector after the last step. Orders warm up from 1
    and fall to 1 on the step to the data; with ``lower_order_final`` (default) order 3 also
    drops to 2 on the step before it, as in diffusers.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant '{variant}'; use bh1 or bh2")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3; got {order}")
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0, lambda_) of the steps so far, newest last
    last: tuple[Tensor, float, float, int] | None = None  # x, sigma_t, lambda_t, order of the last
    pairs = _pairs(timesteps)
    for i, (t, t_prev) in enumerate(pairs):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0": x0})
        alpha_t, sigma_t, lambda_t = vp_scalings(alphas_cumprod_at(alphas_cumprod, t))
        if corrector and last is not None:  # UniC: correct x with the model output at x
            x_last, sigma_last, lambda_last, last_order = last
            h = lambda_t - lambda_last
            m0 = history[-1][0]
            rks = [(lam - lambda_last) / h for _, lam in reversed(history[-last_order:-1])]
            D = [(m - m0) / r for (m, _), r in zip(reversed(history[-last_order:-1]), rks,
                                                   strict=True)]
            B_h, rho_c = (math.expm1(-h) if variant == "bh2" else -h, [0.5]) if last_order == 1 \
                else _unipc_coefficients([*rks, 1.0], h, variant, last_order)
            correction = sum((rho * d for rho, d in zip(rho_c[:-1], D, strict=True)),
                             torch.zeros_like(x)) + rho_c[-1] * (x0 - m0)
            x = (sigma_t / sigma_last) * x_last - alpha_t * math.expm1(-h) * m0 \
                - alpha_t * B_h * correction
        history = [*history[-2:], (x0, lambda_t)]
        alpha_next, sigma_next, lambda_next = vp_scalings(alphas_cumprod_at(alphas_cumprod, t_prev))
        if t_prev < 0:
            return x0
        this_order = min(order, len(history), len(pairs) - i if lower_order_final else order)
        h = lambda_next - lambda_t
        rks = [(lam - lambda_t) / h for _, lam in reversed(history[-this_order:-1])]
        D = [(m - x0) / r for (m, _), r in zip(reversed(history[-this_order:-1]), rks,
                                               strict=True)]
        x_next = (sigma_next / sigma_t) * x - alpha_next * math.expm1(-h) * x0
        if this_order >= 2:  # UniP-p: rho_p solves the first p-1 rows of R rho = b
            B_h, rho_p = _unipc_coefficients(rks, h, variant, this_order - 1)
            if this_order == 2:  # the paper's and diffusers' simplified choice
                rho_p = [0.5]
            x_next = x_next - alpha_next * B_h * sum(
                (rho * d for rho, d in zip(rho_p, D, strict=True)), torch.zeros_like(x))
        last = (x, sigma_t, lambda_t, this_order)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "euler_ancestral": euler_ancestral,
    "heun": heun, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
}
CONTRACT = ("generator", "callback")  # keywords every sampler takes; not options of its own


def check_sampler(name: str) -> None:
    """Raise a ValueError with a "did you mean" hint for an unknown sampler name."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; {did_you_mean(name, SAMPLERS)}use one of "
                         f"{', '.join(SAMPLERS)}")


def option_defaults(sampler: str) -> dict[str, Any]:
    """The options ``sampler`` takes and their defaults: its keyword-only parameters (e.g.
    ``eta``, ``var_type``, ``order``), without the contract's ``generator`` and ``callback``."""
    check_sampler(sampler)
    return {name: p.default for name, p in inspect.signature(SAMPLERS[sampler]).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in CONTRACT}


def option_names(sampler: str) -> tuple[str, ...]:
    """The names of ``option_defaults(sampler)``."""
    return tuple(option_defaults(sampler))


def nfe_of(sampler: str, steps: int) -> int:
    """Model calls (NFE) of ``sampler`` over ``steps`` timesteps: 2 steps - 1 for ``heun``
    (with or without churn), ``steps`` for every other sampler."""
    return 2 * steps - 1 if sampler == "heun" else steps


def default_spacing(sampler: str) -> str:
    """The spacing ``sample`` uses for ``sampler`` when none is given."""
    if sampler in ("ddpm", "ddim"):
        return "uniform"
    if sampler in ("euler", "heun", "euler_ancestral"):
        return "karras"
    return "logsnr"


def sample(model: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, alphas_cumprod: Tensor, *,
           sampler: str = "ddpm", steps: int = 100,
           spacing: str | Sequence[float] | Tensor | None = None,
           prediction: str = "eps", clip_x0: bool = True, dynamic_threshold: float = 0.0,
           generator: torch.Generator | None = None, callback: Callback | None = None,
           **options: Any) -> Tensor:
    """Draw x_0 from any noise-, x0- or v-prediction model. These defaults are stated here once:
    a run's sample section (``config.SampleConfig``) takes its own from this signature.

    model: ``model(x_t, t) -> eps | x0 | v`` with x_t [N, ...] and t [N] in [0, T-1]: long for
        integer spacings, float for ``karras`` / ``logsnr``.
    x_T: [N, ...] standard normal noise. alphas_cumprod: the training schedule, shape [T].
    sampler: a name in ``SAMPLERS``; steps: timesteps (= NFE, except ``heun``: 2 steps - 1).
    spacing: a ``schedule.SPACINGS`` name or explicit timesteps (e.g. those that
        ``optimal_steps.calibrated_timesteps`` fits to a model); None: ``default_spacing``
        ("logsnr" for ``unipc`` and the DPM-Solver++ samplers, "karras" for euler/heun/
        euler_ancestral, "uniform" for ddpm/ddim).
    clip_x0 / dynamic_threshold: see ``make_denoiser``; False / 0 leave the math untouched.
    options: the sampler's own keywords (``option_names``: ``eta``, ``var_type``, ``order``...).
    Returns x_0 [N, ...], in [-1, 1] for image models with clipping.
    """
    check_sampler(sampler)
    if spacing is None:
        spacing = default_spacing(sampler)
    if isinstance(spacing, str) and spacing in MODEL_SPACINGS:
        raise ValueError(f"the '{spacing}' spacing is fitted to a model: pass the timesteps "
                         f"that optimal_steps.calibrated_timesteps returns as the spacing")
    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    denoise = make_denoiser(model, alphas_cumprod, prediction=prediction, clip_x0=clip_x0,
                            dynamic_threshold=dynamic_threshold)
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, spacing, alphas_cumprod)
    return SAMPLERS[sampler](denoise, x_T, timesteps, alphas_cumprod, generator=generator,
                             callback=callback, **options)


def is_stochastic(sampler: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``sampler`` with ``options`` adds fresh noise along the chain, so that two runs
    from the same x_T differ: ``ddpm`` always, the others when their ``eta`` or ``s_churn`` is
    above 0 (given in ``options``, else the sampler's own default: ddim 0, euler_ancestral and
    dpmpp_2m_sde 1, heun's s_churn 0)."""
    if sampler == "ddpm":
        return True
    options = options or {}
    parameters = inspect.signature(SAMPLERS[sampler]).parameters
    return any(float(options.get(name, parameters[name].default)) > 0
               for name in ("eta", "s_churn") if name in parameters)
