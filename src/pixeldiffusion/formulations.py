"""Training formulations: DDPM, EDM and flow matching, each a loss plus a bridge to the samplers.

Every formulation is a forward process x = alpha(t) x0 + sigma(t) eps with its own network
conditioning and loss. They differ in how they parameterise the noise level, not in kind: the
half log-SNR lambda_ = log(alpha / sigma) orders all of them, and EDM's sigma = sigma / alpha
(Karras et al. 2022, Table 1) is the common axis used here. So one formulation hands the rest of
the library two things:

- a training loss, ``loss_fn(net, x0, generator=generator, y=labels_or_None) -> 0-dim Tensor``,
  where ``net(x_in, c_noise, y=None)`` is the raw UNet and x0 is [N, C, H, W] in [-1, 1]
  (``loss_for``);
- a ``VPBridge`` (``bridge_for``): its noise levels as a VP table ``alphas_cumprod`` (float64
  [T], abar = alpha^2 / (alpha^2 + sigma^2), increasing noise with the index) and ``wrap(net)``,
  which turns the network into the samplers' ``model(x_t, t, y=None)`` over that table. Every
  sampler, spacing, guidance and inpainting works on it unchanged.

The VP bridge: the samplers' x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is a formulation's
x = alpha x0 + sigma eps divided by sqrt(alpha^2 + sigma^2), so x = x_t sqrt(alpha^2 + sigma^2)
(EDM: alpha = 1, x = x_t / sqrt(abar); flow: alpha = 1 - t, sigma = t). The wrapped model reads
abar at the sampler's (possibly fractional) timestep with ``schedule.alphas_cumprod_at``'s look-up,
the samplers' own, on the timestep's device (``schedule.DeviceTable``: no host sync per call),
rescales x_t, and returns the denoised x0 (``prediction="x0"``).

Neither the training loop nor the samplers branch on the formulation's name: they are handed the
loss and the bridge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .diffusion import training_loss
from .errors import did_you_mean
from .schedule import DeviceTable, alphas_cumprod_from_betas, make_betas, sigma_of

if TYPE_CHECKING:
    from .config import DiffusionConfig

FLOW_PREDICTIONS = ("v", "x0")
FLOW_TIME_SCALE = 1000.0  # flow's network sees c_noise = 1000 t, the range the UNet's
#                           sinusoidal embedding was built for (DDPM's t in [0, 999])
FLOW_T_MIN_X0 = 0.05  # x0-prediction: t is clamped to this in v = (x_t - x0) / t (Li & He 2025)

Net = Callable[..., Tensor]  # net(x_in [N, C, H, W], c_noise [N], y=None) -> [N, C, H, W]
VPModel = Callable[..., Tensor]  # model(x_t, t [N], y=None) -> x0, over a VP table
LossFn = Callable[..., Tensor]  # loss_fn(net, x0, *, generator=None, y=None) -> 0-dim Tensor


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1] (as many 1s as ``like`` has dimensions after the batch)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning (Karras et al. 2022, Table 1):

        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,   sd = sigma_data.

    sigma: any shape, > 0. Each result has sigma's shape and dtype.
    """
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoise(net: Net, x: Tensor, sigma: Tensor, *, sigma_data: float = 0.5,
                y: Tensor | None = None) -> Tensor:
    """EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)  (Karras et al. 2022,
    eq. 7). x: [N, C, H, W], the data plus noise of std sigma (x = x0 + sigma eps); sigma: [N],
    > 0. Returns D in x's dtype: the network's estimate of x0."""
    c_skip, c_out, c_in, c_noise = edm_scalings(_per_sample(sigma, x).to(x.dtype), sigma_data)
    F_x = net(c_in * x, c_noise.flatten(), y=y)
    return c_skip * x + c_out * F_x.to(x.dtype)


def edm_alphas_cumprod(T: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """EDM's noise levels as a VP table: ln sigma uniform from ln sigma_min (t = 0) to
    ln sigma_max (t = T-1), abar = 1 / (1 + sigma^2). float64 [T]. Fractional timesteps are
    interpolated in ln sigma (``schedule.alphas_cumprod_at``), so they are exact here."""
    log_sigma = torch.linspace(math.log(sigma_min), math.log(sigma_max), T, dtype=torch.float64)
    return 1 / (1 + (2 * log_sigma).exp())


@dataclass(frozen=True)
class EDMLoss:
    """EDM's training loss (Karras et al. 2022, eq. 8 and Table 1, "Training" rows):

        ln sigma ~ N(p_mean, p_std^2),  lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2,
        loss = lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2,  n ~ N(0, I),

    averaged over the batch and the pixels. The weight makes the effective target of F unit
    variance; with data ~ N(mu, sd^2) the optimal loss is exactly 1 at every sigma.
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, net: Net, x0: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None) -> Tensor:
        sigma = (_randn((x0.shape[0],), x0, generator) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        x = x0 + _per_sample(sigma, x0) * _randn(x0.shape, x0, generator)
        D = edm_denoise(net, x, sigma, sigma_data=self.sigma_data, y=y).float()
        return (_per_sample(weight, x0).float() * (D - x0.float()).square()).mean()


def edm_vp_model(net: Net, alphas_cumprod: Tensor, *, sigma_data: float = 0.5) -> VPModel:
    """An EDM network as the samplers' ``model(x_t, t, y=None) -> x0`` over ``alphas_cumprod``:
    sigma = sqrt((1 - abar_t) / abar_t), x = x_t / sqrt(abar_t), x0 = D(x; sigma)."""
    table = DeviceTable(alphas_cumprod)

    def model(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        abar = table.abar_at(t)
        x = x_t / _per_sample(abar.sqrt(), x_t).to(x_t.device, x_t.dtype)
        sigma = sigma_of(abar).to(x_t.device, x_t.dtype)
        return edm_denoise(net, x, sigma, sigma_data=sigma_data, y=y)
    return model


# ---------------------------------------------------------------------------------------------
# Flow matching (Lipman et al. 2023; Liu et al. 2023, rectified flow; Esser et al. 2024, SD3)


def flow_interpolant(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps, t in [0, 1] broadcastable to x0 (Liu et al. 2023, eq. 1;
    Esser et al. 2024, eq. 3 with a_t = 1 - t, b_t = t): the data at t = 0, noise at t = 1."""
    return (1 - t) * x0 + t * eps


def flow_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The conditional velocity v = d x_t / dt = eps - x0 (Lipman et al. 2023, eq. 23 with
    sigma_min = 0; Liu et al. 2023, eq. 1)."""
    return eps - x0


def logit_normal_t(n: int, like: Tensor, *, mean: float = 0.0, std: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """t = sigmoid(mean + std u), u ~ N(0, 1): Esser et al. 2024, eq. 19. Shape [n], in (0, 1),
    with median sigmoid(mean); on like's device, in its dtype."""
    return torch.sigmoid(mean + std * _randn((n,), like, generator))


def shift_t(t: Tensor, shift: float) -> Tensor:
    """Esser et al. 2024, eq. 23: t' = s t / (1 + (s - 1) t); s > 1 moves t towards noise
    (larger images need more of it). s = 1 is the identity; 0 and 1 stay fixed."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_t(t_shifted: Tensor, shift: float) -> Tensor:
    """The inverse of ``shift_t``: t = t' / (s - (s - 1) t')."""
    return t_shifted / (shift - (shift - 1) * t_shifted)


def ot_pairing(x0: Tensor, eps: Tensor) -> Tensor:
    """The permutation of the noise that minimises sum_i ||x0_i - eps_perm[i]||^2 over the
    minibatch (Tong et al. 2023, "Improving and generalizing flow-based generative models with
    minibatch optimal transport", OT-CFM, Alg. 1 with the exact assignment). x0, eps: [N, ...].
    Returns long [N] on x0's device: pair x0[i] with eps[perm[i]]."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()).square().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def flow_t_of_sigma(sigma: Tensor) -> Tensor:
    """Flow time of EDM's sigma: sigma = t / (1 - t), so t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def flow_alphas_cumprod(T: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        shift: float = 1.0) -> Tensor:
    """Flow's noise levels as a VP table: T times t from t(sigma_min) (index 0) to t(sigma_max)
    (index T-1), uniform in the unshifted time u with t = shift_t(u), so the ``uniform`` spacing
    is uniform in flow time (SD3's sampling schedule for shift s). abar = (1 - t)^2 /
    ((1 - t)^2 + t^2). float64 [T]."""
    t_ends = flow_t_of_sigma(torch.tensor([sigma_min, sigma_max], dtype=torch.float64))
    u_min, u_max = unshift_t(t_ends, shift).tolist()
    t = shift_t(torch.linspace(u_min, u_max, T, dtype=torch.float64), shift)
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def _flow_v_and_target(output: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                       prediction: str) -> tuple[Tensor, Tensor]:
    """(v_pred, v_target) from the network output. v: the output is v, the target eps - x0.
    x0 (Li & He 2025, "Back to Basics", the JiT loss): v_pred = (x_t - x0_pred) / max(t, t_min)
    and v_target = (x_t - x0) / max(t, t_min), which is eps - x0 wherever t >= t_min."""
    if prediction == "v":
        return output, flow_velocity(x0, eps)
    t_clamped = t.clamp(min=FLOW_T_MIN_X0)
    return (x_t - output) / t_clamped, (x_t - x0) / t_clamped


@dataclass(frozen=True)
class FlowLoss:
    """Conditional flow matching in velocity space (Lipman et al. 2023, eq. 23; Esser et al. 2024,
    Sec. 3): t ~ logit-normal(t_mean, t_std) (eq. 19), shifted by ``shift`` (eq. 23), eps ~
    N(0, I) (re-paired with the data by minibatch OT when ``ot``), x_t = (1 - t) x0 + t eps,

        loss = ||v_pred - v||^2,  v = eps - x0,  net(x_t, 1000 t, y) -> v or x0 (``prediction``),

    averaged over the batch and the pixels.
    """

    prediction: str = "v"
    t_mean: float = 0.0
    t_std: float = 1.0
    shift: float = 1.0
    ot: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in FLOW_PREDICTIONS:
            raise ValueError(f"flow matching predicts v or x0; got prediction "
                             f"'{self.prediction}'")

    def __call__(self, net: Net, x0: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None) -> Tensor:
        t = logit_normal_t(x0.shape[0], x0, mean=self.t_mean, std=self.t_std,
                           generator=generator)
        t = _per_sample(shift_t(t, self.shift), x0)
        eps = _randn(x0.shape, x0, generator)
        if self.ot:
            eps = eps[ot_pairing(x0, eps)]
        x_t = flow_interpolant(x0, eps, t)
        output = net(x_t, FLOW_TIME_SCALE * t.flatten(), y=y).float()
        v_pred, v_target = _flow_v_and_target(output, x0.float(), eps.float(), x_t.float(),
                                              t.float(), self.prediction)
        return (v_pred - v_target).square().mean()


def flow_x0(net: Net, x_t: Tensor, t: Tensor, *, prediction: str = "v",
            y: Tensor | None = None) -> Tensor:
    """The flow network's estimate of x0 at x_t = (1 - t) x0 + t eps: x0 = x_t - t v for
    v-prediction (x_t - x0 = t v), the output itself for x0-prediction. t: [N] in (0, 1)."""
    output = net(x_t, FLOW_TIME_SCALE * t.flatten(), y=y).to(x_t.dtype)
    return x_t - _per_sample(t, x_t) * output if prediction == "v" else output


def flow_vp_model(net: Net, alphas_cumprod: Tensor, *, prediction: str = "v") -> VPModel:
    """A flow network as the samplers' ``model(x_t, t, y=None) -> x0`` over ``alphas_cumprod``:
    t_flow = sigma / (1 + sigma) with EDM's sigma of abar_t, and x = x_t sqrt(alpha^2 + sigma^2)
    with alpha = 1 - t_flow, sigma = t_flow (see the module docstring)."""
    table = DeviceTable(alphas_cumprod)

    def model(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t_flow = flow_t_of_sigma(sigma_of(table.abar_at(t)))
        scale = ((1 - t_flow) ** 2 + t_flow**2).sqrt()
        x = x_t * _per_sample(scale, x_t).to(x_t.device, x_t.dtype)
        return flow_x0(net, x, t_flow.to(x_t.device, x_t.dtype), prediction=prediction, y=y)
    return model


# ---------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020): diffusion.training_loss under the same contract


@dataclass(frozen=True, eq=False)
class DDPMLoss:
    """``diffusion.training_loss`` (DDPM's loss with eps / x0 / v targets and min-SNR) under the
    loss contract; same draws, same value. ``net(x_t, t, y)`` gets the integer timestep t."""

    alphas_cumprod: Tensor
    prediction: str = "eps"
    loss: str = "l2"
    min_snr_gamma: float = 0.0
    _on_device: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)

    def _table_on(self, device: torch.device) -> Tensor:
        """The float32 table on ``device``, copied there once: a host-to-device copy every
        step would cost the training loop a host sync."""
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.float().to(device)
        return self._on_device[device]

    def __call__(self, net: Net, x0: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None) -> Tensor:
        table = self._table_on(x0.device)
        model_kwargs = {} if y is None else {"y": y}
        return training_loss(net, x0, table, prediction=self.prediction, loss=self.loss,
                             min_snr_gamma=self.min_snr_gamma, generator=generator,
                             **model_kwargs)


def ddpm_alphas_cumprod(d: DiffusionConfig) -> Tensor:
    """DDPM's abar_t of the beta schedule in ``d``: float64 [T]."""
    return alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.timesteps, d.beta_start,
                                                d.beta_end))


# ---------------------------------------------------------------------------------------------
# The builders the training loop and the samplers are given


@dataclass(frozen=True, eq=False)
class VPBridge:
    """What the samplers need from a formulation: its noise levels as a VP table
    (``alphas_cumprod``, float64 [T]), ``wrap(net)`` -> ``model(x_t, t, y=None)``, and what that
    model returns (``prediction``, for ``samplers.make_denoiser``)."""

    alphas_cumprod: Tensor
    prediction: str
    wrap: Callable[[Net], VPModel]


_TABLES: dict[str, Callable[[DiffusionConfig], Tensor]] = {
    "ddpm": ddpm_alphas_cumprod,
    "edm": lambda d: edm_alphas_cumprod(d.timesteps, d.sigma_min, d.sigma_max),
    "flow": lambda d: flow_alphas_cumprod(d.timesteps, d.sigma_min, d.sigma_max, d.shift),
}


def _ddpm(d: DiffusionConfig, table: Tensor) -> tuple[LossFn, VPBridge]:
    loss = DDPMLoss(table, prediction=d.prediction, loss=d.loss, min_snr_gamma=d.min_snr_gamma)
    return loss, VPBridge(table, d.prediction, lambda net: net)


def _edm(d: DiffusionConfig, table: Tensor) -> tuple[LossFn, VPBridge]:
    loss = EDMLoss(sigma_data=d.sigma_data, p_mean=d.p_mean, p_std=d.p_std)
    return loss, VPBridge(table, "x0",
                          lambda net: edm_vp_model(net, table, sigma_data=d.sigma_data))


def _flow(d: DiffusionConfig, table: Tensor) -> tuple[LossFn, VPBridge]:
    loss = FlowLoss(prediction=d.prediction, t_mean=d.t_mean, t_std=d.t_std, shift=d.shift,
                    ot=d.ot)
    return loss, VPBridge(table, "x0",
                          lambda net: flow_vp_model(net, table, prediction=d.prediction))


_BUILDERS: dict[str, Callable[[DiffusionConfig, Tensor], tuple[LossFn, VPBridge]]] = {
    "ddpm": _ddpm, "edm": _edm, "flow": _flow}
FORMULATIONS = tuple(_BUILDERS)  # config.FORMULATIONS (a test keeps them equal)


def _check(d: DiffusionConfig) -> None:
    if d.formulation not in _BUILDERS:
        raise ValueError(f"unknown formulation '{d.formulation}'; "
                         f"{did_you_mean(d.formulation, FORMULATIONS)}use one of "
                         f"{', '.join(FORMULATIONS)}")


def alphas_cumprod_for(d: DiffusionConfig) -> Tensor:
    """The configured formulation's noise levels as a VP table: float64 [T] on the CPU
    (``schedule.alphas_cumprod_of`` of a whole config is this)."""
    _check(d)
    return _TABLES[d.formulation](d)


def _build(d: DiffusionConfig) -> tuple[LossFn, VPBridge]:
    table = alphas_cumprod_for(d)  # checks the name first
    return _BUILDERS[d.formulation](d, table)


def loss_for(d: DiffusionConfig) -> LossFn:
    """The training loss ``loss_fn(net, x0, generator=, y=)`` of the configured formulation
    (``d``: the validated ``diffusion`` config section)."""
    return _build(d)[0]


def bridge_for(d: DiffusionConfig) -> VPBridge:
    """The sampling side of the configured formulation: VP table, network wrapper, prediction."""
    return _build(d)[1]
