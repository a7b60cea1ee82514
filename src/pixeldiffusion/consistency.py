"""Consistency models: the parameterisation, the Easy Consistency Tuning loss, multistep sampling.

A consistency function f(x, sigma) maps every point x_sigma of a probability-flow ODE trajectory
to the trajectory's point at sigma_min, so one call turns noise into a sample (Song et al. 2023,
"Consistency Models"). Noise levels follow EDM (Karras et al. 2022): x_sigma = x0 + sigma eps,
x0 in [-1, 1], sigma in [sigma_min, sigma_max] = [0.002, 80].

- ``ConsistencyFunction(net)``: f(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) around
  any raw network F = ``net(x_in, c_noise, y=None)``, with f(x, sigma_min) = x exactly.
- ``ECTLoss``: Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy"), a
  training-loop loss ``loss(net, x0, generator=, y=, step=) -> 0-dim Tensor``; ``step`` is the
  optimizer step, which sets how far apart the two noise levels of each pair are. Given a
  ``teacher`` denoiser it is consistency distillation (Song et al. 2023, Alg. 2): the pair's
  second point is the teacher's ODE step from x_t (``teacher_ode_step``), not x0 + r eps.
- ``consistency_sample(f, z, sigmas)``: Song et al. 2023, Alg. 1, with
  ``consistency_sigmas(steps)`` choosing the noise levels for 1, 2 or 4 model calls.

Everything takes sigma as the time variable (EDM's t = sigma); docs/consistency.md has the
equations, the defaults and where each comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_checkpoint
from .config import TEACHER_SOLVERS
from .diffusion import x0_eps_from_output
from .errors import ConfigError
from .formulations import VPBridge, bridge_for, edm_scalings
from .schedule import DeviceTable, karras_sigmas, sigma_of

SIGMA_MIN = 0.002  # Song et al. 2023's epsilon, EDM's sigma_min
SIGMA_MAX = 80.0  # Song et al. 2023 / EDM / ECT's t_max
SIGMA_DATA = 0.5  # EDM's sigma_data: about the std of images in [-1, 1]
ECT_MID_SIGMA = 0.821  # ECT's 2-step intermediate sigma for CIFAR-10 (ct_train.py --mid_t)
KARRAS_RHO = 7.0  # EDM eq. 5

RawNet = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]


def consistency_scalings(sigma: Tensor, sigma_min: float = SIGMA_MIN,
                         sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of a consistency model at noise level ``sigma`` (any shape,
    > 0), each with sigma's shape and dtype.

    c_skip and c_out are Song et al. 2023, App. C; at sigma = sigma_min they are exactly 1 and 0,
    so f(x, sigma_min) = x. c_in and c_noise are EDM's (Karras et al. 2022, Table 1), so a raw
    network trained as an EDM denoiser sees the same inputs. With sigma_min = 0, c_skip and c_out
    are EDM's too and f is the EDM denoiser D(x; sigma); ECT fine-tunes from exactly that.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)  # Song et al. 2023, App. C
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data**2 + sigma**2).sqrt()  # App. C
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()  # EDM, Table 1
    c_noise = sigma.log() / 4  # EDM, Table 1
    return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class ConsistencyFunction:
    """f(x, sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y).

    net: the raw network F, called as ``net(x_in, c_noise, y=y)`` -> [N, C, H, W]; e.g. the
        UNet of an EDM-preconditioned teacher, whose weights a student starts from.
    sigma_min: the boundary, f(x, sigma_min) = x bit for bit; f is meant for sigma >= sigma_min.
    sigma_data: the data std of the preconditioning (EDM's 0.5).

    Call ``f(x, sigma, y=None)``: x [N, C, H, W]; sigma a number or a tensor broadcastable to [N]
    (> 0); y optional int64 [N] labels. Returns x0 estimates [N, C, H, W] in x's dtype.
    ``null_class`` is the network's, so ``guidance.guided_model(f, labels, w)`` guides f: f is
    affine in F's output, so guiding f is guiding F and keeps the boundary condition.

    Starting from a teacher, as ECT does: the student's F is the teacher's F (same weights, same
    c_in and c_noise), so at the first step f differs from the teacher's EDM denoiser only through
    sigma_min in c_skip and c_out, by O(sigma_min / sigma_data). ECT's own code trains with EDM's
    c_skip and c_out (sigma_min = 0) and samples with sigma_min = 0.003; here one f serves both.
    """

    net: RawNet
    sigma_min: float = SIGMA_MIN
    sigma_data: float = SIGMA_DATA

    @property
    def null_class(self) -> int:
        """The label meaning "no class" of a class-conditional network (for guided_model)."""
        return int(self.net.null_class)  # type: ignore[attr-defined]

    def __call__(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (
            c.reshape(-1, 1, 1, 1) for c in consistency_scalings(sigma, self.sigma_min,
                                                                  self.sigma_data))
        F_x = self.net(c_in * x, c_noise.flatten(), y=y).to(x.dtype)
        return c_skip * x + c_out * F_x  # Song et al. 2023: f = c_skip x + c_out F


# --- Any teacher as an EDM raw network ---------------------------------------------------------


def teacher_denoiser(net: RawNet, bridge: VPBridge) -> Callable[..., Tensor]:
    """The teacher's x0 estimate as EDM's denoiser ``D(x, sigma, y=None)``, whatever its
    formulation: x = x0 + sigma eps [N, C, H, W], sigma [N] > 0; returns [N, C, H, W].

    The bridge (formulations.py) gives the teacher as ``model(x_t, t, y)`` over its VP table:
    x_t = x / sqrt(1 + sigma^2) (the VP point of EDM's x at sigma), t = the table's timestep of
    sigma (``schedule.timestep_of_sigma``, fractional), then x0 from the model's prediction with
    abar = 1 / (1 + sigma^2). A sigma beyond the table's range gets the nearest end's timestep
    (timestep_of_sigma clamps; x_t keeps its own scaling), so the teacher is never asked about a
    timestep it did not learn.
    """
    table = DeviceTable(bridge.alphas_cumprod)  # look-ups on x's device, no host sync per call
    model = bridge.wrap(net)

    def D(x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = sigma.reshape(-1).to(x.dtype)
        t = table.timestep_of(sigma)
        abar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)  # VP: sigma^2 = (1 - abar) / abar
        x_t = x * abar.sqrt()
        output = model(x_t, t.to(x.device, x.dtype), y=y).to(x.dtype)
        return x0_eps_from_output(bridge.prediction, output, x_t, abar)[0]
    return D


class FrozenTeacher:
    """A teacher checkpoint's EDM denoiser ``D(x, sigma, y=None)`` (``teacher_denoiser``) from
    its EMA weights, frozen (eval mode, no gradients), moved to the device of the x it is called
    with: consistency distillation's ODE steps and progressive distillation's DDIM steps.
    ``net`` is the network: its weights also start a fresh run (``distill.start_from_teacher``),
    and progressive distillation loads each stage's teacher into it."""

    def __init__(self, path: str | Path) -> None:
        loaded = load_checkpoint(path)
        self.net = loaded.model.eval().requires_grad_(False)
        self.denoise = teacher_denoiser(self.net, bridge_for(loaded.config.diffusion))

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        if next(self.net.parameters()).device != x.device:
            self.net.to(x.device)
        return self.denoise(x, sigma, y=y)


def highest_sigma(bridge: VPBridge) -> float:
    """EDM's sigma at the noisy end of the teacher's VP table (DDPM's linear T = 1000: ~157)."""
    return float(sigma_of(bridge.alphas_cumprod[-1]))


class EDMRawNetwork:
    """A teacher of any formulation as EDM's raw network F (Karras et al. 2022, eq. 7 solved for
    F): F(c_in x, c_noise, y) = (D(x; sigma) - c_skip x) / c_out, with sigma = exp(4 c_noise)
    and EDM's c_skip, c_out, c_in of sigma_data. So ``ConsistencyFunction(EDMRawNetwork(...))``
    starts within O(sigma_min / sigma_data) of the teacher's own denoiser, as ECT's student of
    an EDM teacher does; for an EDM teacher F is the teacher's network itself (up to rounding).

    net: the network as its formulation calls it (the UNet being tuned); bridge: the teacher's
    ``formulations.bridge_for``. Called as ``F(x_in [N, C, H, W], c_noise [N], y=None)``.
    """

    def __init__(self, net: RawNet, bridge: VPBridge, sigma_data: float = SIGMA_DATA) -> None:
        self.net, self.sigma_data = net, sigma_data
        self.denoise = teacher_denoiser(net, bridge)

    @property
    def null_class(self) -> int:
        """The network's "no class" label (for guided_model)."""
        return int(self.net.null_class)  # type: ignore[attr-defined]

    def __call__(self, x_in: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = (4 * c_noise).exp().to(x_in.dtype)  # EDM: c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1)
                                  for c in edm_scalings(sigma, self.sigma_data))
        x = x_in / c_in
        return (self.denoise(x, sigma, y=y) - c_skip * x) / c_out  # EDM eq. 7 solved for F


def student_function(net: RawNet, bridge: VPBridge, *, sigma_min: float = SIGMA_MIN,
                     sigma_data: float = SIGMA_DATA) -> ConsistencyFunction:
    """The consistency function f(x, sigma, y) of a network tuned from a teacher with ``bridge``
    (``pixeldiffusion distill``): ``ConsistencyFunction`` around ``EDMRawNetwork``."""
    return ConsistencyFunction(EDMRawNetwork(net, bridge, sigma_data), sigma_min, sigma_data)


# --- Easy Consistency Tuning (Geng et al. 2024) -------------------------------------------------


def ect_sample_t(n: int, P_mean: float, P_std: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """[n] noise levels t ~ lognormal: ln t ~ N(P_mean, P_std^2) (EDM's p(sigma), with ECT's
    P_mean = -1.1, P_std = 2.0), drawn from ``generator`` (on ``device``)."""
    rnd_normal = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return (P_mean + P_std * rnd_normal).exp()


def ect_r(t: Tensor, step: int, *, q: float = 2.0, d: int = 25_000, k: float = 8.0,
          b: float = 1.0, sigma_min: float = SIGMA_MIN) -> Tensor:
    """ECT's mapping r(t) (Geng et al. 2024, p(r | t, iters)): each pair's smaller noise level.

        r = t (1 - n(t) / q^a),   n(t) = 1 + k sigmoid(-b t),   a = floor(step / d) + 1,

    then r = max(r, sigma_min), the boundary, where the target is x_r itself (the data up to
    sigma_min eps). So Delta t = t - r shrinks by q every d steps: at first most pairs reach the
    boundary (the loss is then a denoising loss, the teacher's own task) and r -> t as training
    goes on. a counts from 1 as in ECT's code (``update_schedule(stage)`` takes q^(stage + 1)
    with stage = floor(iters / d)), so even step 0 asks for some consistency at large t.

    t: [N] noise levels > sigma_min. Returns r [N] with sigma_min <= r < t, t's dtype.
    """
    a = step // d + 1
    n_t = 1 + k * torch.sigmoid(-b * t)  # ECT's sigmoid adjustment n(t)
    r = t * (1 - n_t / q**a)
    return r.clamp(min=sigma_min)


def ect_distance(delta: Tensor, c: float = 0.0) -> Tensor:
    """Per-sample distance of delta [N, ...]: sqrt(||delta||_2^2 + c^2) - c, shape [N].

    c = 0 (ECT's default) is the plain L2 norm ||delta||_2, which is ECT's adaptive weighting
    1 / (||delta||^2 + c^2)^p with p = 1/2 applied to the squared L2 loss; c > 0 is the
    pseudo-Huber loss of improved consistency training (Song & Dhariwal 2023, c = 0.00054 sqrt(D)
    for D = C H W). The norm's gradient at delta = 0 is taken as 0.
    """
    if c > 0:
        return (delta.flatten(1).square().sum(1) + c**2).sqrt() - c
    return torch.linalg.vector_norm(delta.flatten(1), dim=1)


def _same_dropout_masks(device: torch.device) -> AbstractContextManager[Any]:
    """A context whose forward pass leaves the global RNG as it found it, so that the next pass
    of the same shapes draws the same dropout masks (ECT's shared dropout mask)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _per_image(s: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1], to scale a batch of images one number each."""
    return s.reshape(-1, 1, 1, 1)


def teacher_ode_step(teacher: Callable[..., Tensor], x_t: Tensor, t: Tensor, r: Tensor, *,
                     y: Tensor | None = None, solver: str = "euler") -> Tensor:
    """x_r, one step of the teacher's probability-flow ODE from (x_t, t) down to r, [N, C, H, W]:
    consistency distillation's Phi (Song et al. 2023, Alg. 2).

    The ODE is EDM's dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with
    sigma(t) = t); ``euler`` takes one teacher call, ``heun`` two (EDM Alg. 1's second-order
    correction, skipped where r = 0 as there). teacher: ``D(x, sigma [N], y=None)``, e.g.
    ``teacher_denoiser``; x_t [N, C, H, W]; t, r [N] with 0 <= r < t. Where the data is a point
    mass the ODE paths are straight lines and both solvers are exact.
    """
    if solver not in TEACHER_SOLVERS:
        raise ConfigError(f"unknown ODE solver '{solver}' for the teacher's step; use one of "
                          f"{', '.join(TEACHER_SOLVERS)}")
    step = _per_image(r - t)
    d_t = (x_t - teacher(x_t, t, y=y)) / _per_image(t)  # EDM eq. 3: dx/dsigma
    x_r = x_t + step * d_t  # Euler
    if solver == "euler":
        return x_r
    positive = r > 0
    r_safe = torch.where(positive, r, t)  # the correction is not used where r = 0
    d_r = (x_r - teacher(x_r, r_safe, y=y)) / _per_image(r_safe)
    heun = x_t + step * (d_t + d_r) / 2  # EDM Alg. 1, line 8
    return torch.where(_per_image(positive), heun, x_r)


def ect_pair_loss(f: Callable[..., Tensor], x0: Tensor, eps: Tensor, t: Tensor, r: Tensor, *,
                  y: Tensor | None = None, c: float = 0.0, sigma_min: float = SIGMA_MIN,
                  teacher: Callable[..., Tensor] | None = None,
                  solver: str = "euler") -> Tensor:
    """The ECT loss of each pair, [N]: w(t, r) d(f(x_t, t), stopgrad f(x_r, r)).

    x_t = x0 + t eps and x_r = x0 + r eps share eps (ECT's training/loss.py);
    w(t, r) = 1 / (t - r) and d is ``ect_distance`` with ``c``. Where r = sigma_min the target
    is x_r itself (the boundary condition; with sigma_min = 0 that is x0, a denoising loss) and f
    is not called there. Both passes use the same dropout masks; the target pass runs without
    gradients. Pairs with t <= sigma_min lie inside the boundary, where f is the identity by
    definition; they count 0.

    With a ``teacher`` denoiser this is consistency distillation (Song et al. 2023, Alg. 2): x_r
    is the teacher's ODE step from x_t (``teacher_ode_step`` with ``solver``), a point on x_t's
    own trajectory as far as the teacher knows it, where x0 + r eps lies on it only as r -> t.

    f: ``f(x, sigma, y)``, a ConsistencyFunction. x0, eps: [N, C, H, W]; t, r: [N] with r from
    ``ect_r`` (r >= sigma_min, r < t).
    """
    x_t = x0 + _per_image(t) * eps  # both points on the same noise direction eps
    if teacher is None:
        x_r = x0 + _per_image(r) * eps
    else:
        with torch.no_grad():
            x_r = teacher_ode_step(teacher, x_t, t, r, y=y, solver=solver)
    with _same_dropout_masks(x0.device):
        f_t = f(x_t, t, y=y)
    at_boundary = r <= sigma_min
    with torch.no_grad():  # stopgrad
        f_r = f(x_r, torch.where(at_boundary, t, r), y=y)  # outputs at the boundary are unused
        target = torch.where(_per_image(at_boundary), x_r, f_r)  # f(x, sigma_min) = x
    inside = (t > sigma_min).to(t.dtype)
    weight = inside / (t - r).clamp(min=torch.finfo(t.dtype).tiny)  # ECT: w(t, r) = 1 / (t - r)
    return weight * ect_distance(f_t - target, c)


@dataclass(frozen=True)
class ECTLoss:
    """Easy Consistency Tuning (Geng et al. 2024), as a training-loop loss.

    ``loss(net, x0, generator=g, y=labels, step=i)``: net is the raw network (see
    ConsistencyFunction), x0 [N, C, H, W] in [-1, 1], y int64 [N] or None, ``step`` the number
    of optimizer steps done so far (a resumed run passes its restored step). Draws t (lognormal),
    then r = ect_r(t, step) and eps ~ N(0, I), all from ``generator`` (on x0's device), and
    returns the mean of ``ect_pair_loss`` over the batch, a 0-dim tensor. Deterministic given the
    generator and the global RNG (which only dropout uses).

    Defaults are ECT's for CIFAR-10 (locuslab/ect, run_ecm.sh: batch 128, 200k steps):
    P_mean -1.1, P_std 2.0, q 2, d 25,000 steps (Delta t halves 8 times), k 8, b 1, c 0
    (adaptive L2 with p = 1/2). A shorter run halves Delta t as often with d = steps / 8.
    ``sigma_max``, if given, clamps t to the highest noise level the model samples from: a
    teacher whose schedule ends below ECT's tail of t (a short DDPM table) is not asked beyond it.

    ``teacher`` (a denoiser ``D(x, sigma [N], y=None)``, frozen) makes it consistency
    distillation with ECT's r(t) schedule and weighting: each pair's x_r is the teacher's
    ``solver`` step from x_t (``teacher_ode_step``), one (euler) or two (heun) more forward
    passes a step, without gradients.
    """

    sigma_min: float = SIGMA_MIN
    sigma_data: float = SIGMA_DATA
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0
    d: int = 25_000
    k: float = 8.0
    b: float = 1.0
    c: float = 0.0
    sigma_max: float | None = None
    teacher: Callable[..., Tensor] | None = None
    solver: str = "euler"

    def __post_init__(self) -> None:
        checks = [("sigma_min", self.sigma_min >= 0, "at least 0, e.g. 0.002"),
                  ("sigma_data", self.sigma_data > 0, "positive, e.g. 0.5"),
                  ("P_std", self.P_std > 0, "positive, e.g. 2.0"),
                  ("q", self.q > 1, "above 1 (Delta t shrinks by q every d steps), e.g. 2"),
                  ("d", self.d >= 1, "a whole number of steps, at least 1, e.g. steps / 8"),
                  ("k", self.k >= 0, "at least 0, e.g. 8"),
                  ("c", self.c >= 0, "at least 0 (0 is the L2 norm)"),
                  ("solver", self.solver in TEACHER_SOLVERS, " or ".join(TEACHER_SOLVERS))]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"ECT's {name} must be {expected}; got {getattr(self, name)}")

    def consistency_function(self, net: RawNet) -> ConsistencyFunction:
        """The f this loss trains around ``net``; sample with the same one."""
        return ConsistencyFunction(net, self.sigma_min, self.sigma_data)

    def r(self, t: Tensor, step: int) -> Tensor:
        """ECT's r(t) at ``step`` with this loss's q, d, k, b (see ``ect_r``)."""
        return ect_r(t, step, q=self.q, d=self.d, k=self.k, b=self.b, sigma_min=self.sigma_min)

    def __call__(self, net: RawNet, x0: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None, step: int = 0) -> Tensor:
        t = ect_sample_t(x0.shape[0], self.P_mean, self.P_std, generator=generator,
                         device=x0.device, dtype=x0.dtype)
        if self.sigma_max is not None:
            t = t.clamp(max=self.sigma_max)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        losses = ect_pair_loss(self.consistency_function(net), x0, eps, t, self.r(t, step),
                               y=y, c=self.c, sigma_min=self.sigma_min, teacher=self.teacher,
                               solver=self.solver)
        return losses.mean()


# --- Multistep sampling (Song et al. 2023, Alg. 1) -----------------------------------------------


def consistency_sigmas(steps: int, *, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN,
                       mid_sigmas: Sequence[float] | None = None) -> list[float]:
    """The noise levels [sigma_max, sigma_1, ..., sigma_{steps-1}] of ``steps``-call sampling.

    mid_sigmas: the steps - 1 intermediate levels, descending, each in (sigma_min, sigma_max).
        None takes the defaults: ECT's 0.821 for 2 steps (tuned on CIFAR-10 with sigma_max 80;
        ECT uses 1.526 on ImageNet 64); for more steps, which the paper does not tune, and for
        2 steps below a sigma_max of 0.821 (a teacher with a short schedule), EDM's rho = 7
        spacing between sigma_max and sigma_min without its last point (4 steps: 80, 17.5,
        2.52, 0.17).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a consistency model samples in 1 or more steps (1, 2 or 4 are usual); "
                         f"got steps={steps!r}")
    if mid_sigmas is None:
        if steps == 2 and ECT_MID_SIGMA < sigma_max:
            mid_sigmas = [ECT_MID_SIGMA]
        else:
            mid_sigmas = karras_sigmas(steps + 1, sigma_max, sigma_min, KARRAS_RHO)[1:-1].tolist()
    mids = [float(s) for s in mid_sigmas]
    if len(mids) != steps - 1:
        raise ValueError(f"{steps}-step sampling takes {steps - 1} intermediate sigmas; got "
                         f"{len(mids)}: {mids}")
    sigmas = [float(sigma_max), *mids]
    descending = all(hi > lo for hi, lo in zip(sigmas[:-1], sigmas[1:], strict=True))
    if not descending or sigmas[-1] <= sigma_min:
        raise ValueError(f"sampling sigmas must descend from sigma_max and stay above sigma_min "
                         f"{sigma_min:g}; got {sigmas}")
    return sigmas


@torch.no_grad()
def consistency_sample(f: Callable[[Tensor, Tensor], Tensor], z: Tensor, sigmas: Sequence[float],
                       *, sigma_min: float = SIGMA_MIN, generator: torch.Generator | None = None,
                       callback: Callback | None = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1); one call of f per sigma.

        x = sigma_0 z;  x0 = f(x, sigma_0)
        for sigma_i in sigmas[1:]:  x = x0 + sqrt(sigma_i^2 - sigma_min^2) z_i;  x0 = f(x, sigma_i)

    f: ``f(x, sigma) -> x0`` with sigma a float [N] tensor, e.g. a ConsistencyFunction, one with
        labels bound (``functools.partial(f, y=labels)``) or ``guidance.guided_model(f, ...)``.
    z: [N, C, H, W] standard normal noise. sigmas: descending, sigmas[0] = sigma_max, the rest
        above sigma_min (``consistency_sigmas``). Fresh noise z_i comes from ``generator`` (on
        z's device). ``callback({"i", "t", "x_t", "x0"})`` after each call, t = sigma_i.
    Returns x0 [N, C, H, W], the last call's output (not clipped).
    """
    if len(sigmas) < 1:
        raise ValueError("consistency sampling needs at least one sigma (sigma_max)")
    x = float(sigmas[0]) * z
    x0 = _consistency_step(f, x, float(sigmas[0]), 0, callback)
    for i, sigma in enumerate((float(s) for s in sigmas[1:]), start=1):
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x = x0 + math.sqrt(sigma**2 - sigma_min**2) * noise  # Song et al. 2023, Alg. 1
        x0 = _consistency_step(f, x, sigma, i, callback)
    return x0


def _consistency_step(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: float, i: int,
                      callback: Callback | None) -> Tensor:
    """x0 = f(x, sigma) with sigma as a float [N] tensor, reported to ``callback``."""
    x0 = f(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype))
    if callback is not None:
        callback({"i": i, "t": sigma, "x_t": x, "x0": x0})
    return x0
