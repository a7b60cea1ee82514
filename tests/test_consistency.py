"""Consistency models: the parameterisation's boundary condition, the ECT loss and r(t) schedule
against closed forms on Gaussian data, and multistep sampling with an exact consistency function.

Gaussian data N(mu, s^2 I) under x_sigma = x0 + sigma eps has the denoiser
D(x, sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2), so the probability-flow ODE
dx/dsigma = (x - D) / sigma keeps (x - mu) / sqrt(s^2 + sigma^2) constant and the exact
consistency function (boundary at sigma_min) is

    f*(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2).
"""

import functools
import math

import pytest
import torch

from pixeldiffusion.config import DiffusionConfig
from pixeldiffusion.consistency import (
    ECT_MID_SIGMA,
    SIGMA_MAX,
    SIGMA_MIN,
    ConsistencyFunction,
    ECTLoss,
    consistency_sample,
    consistency_scalings,
    consistency_sigmas,
    ect_distance,
    ect_pair_loss,
    ect_r,
    student_function,
    teacher_denoiser,
    teacher_ode_step,
)
from pixeldiffusion.errors import ConfigError
from pixeldiffusion.formulations import bridge_for
from pixeldiffusion.guidance import guided_model
from pixeldiffusion.unet import UNet

SIGMA_DATA = 0.5


def gaussian_f_star(x, sigma, mu, s, sigma_min):
    """The exact consistency function of N(mu, s^2 I); sigma broadcastable to x."""
    return mu + (x - mu) * math.sqrt(s**2 + sigma_min**2) / (s**2 + sigma**2).sqrt()


class GaussianOracle(torch.nn.Module):
    """The raw network F whose ConsistencyFunction is f* of N(mu_y, s^2 I) exactly (up to
    rounding), recovering sigma and x from the EDM inputs c_noise = ln(sigma) / 4, x_in = c_in x.
    ``mu`` holds one mean per label (the last is the null class's); ``offset`` perturbs F."""

    def __init__(self, mu, s, sigma_min, offset=0.0):
        super().__init__()
        self.mu = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
        self.s, self.sigma_min, self.offset = s, sigma_min, offset
        self.null_class = len(self.mu) - 1

    def forward(self, x_in, c_noise, y=None):
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = consistency_scalings(sigma, self.sigma_min, SIGMA_DATA)
        x = x_in / c_in
        labels = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
        mu = self.mu[labels].to(x.dtype).reshape(-1, 1, 1, 1)
        f_star = gaussian_f_star(x, sigma, mu, self.s, self.sigma_min)
        at_boundary = c_out == 0  # f* = x there whatever F is
        return (f_star - c_skip * x) / torch.where(at_boundary, 1, c_out) + self.offset


def random_unet(num_classes=0, dropout=0.0):
    """A tiny UNet with every parameter random (the zero-initialised output layer included)."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), norm_groups=4, dropout=dropout, num_classes=num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return net


# --- parameterisation --------------------------------------------------------------------------


def test_scalings_are_song_et_al_app_c_with_edm_inputs():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    sd, sigma_min = SIGMA_DATA, 0.002
    c_skip, c_out, c_in, c_noise = consistency_scalings(sigma, sigma_min, sd)
    for k, s in enumerate(sigma.tolist()):
        assert c_skip[k].item() == pytest.approx(sd**2 / ((s - sigma_min) ** 2 + sd**2), rel=1e-12)
        assert c_out[k].item() == pytest.approx(sd * (s - sigma_min) / math.sqrt(sd**2 + s**2),
                                                rel=1e-12)
        assert c_in[k].item() == pytest.approx(1 / math.sqrt(sd**2 + s**2), rel=1e-12)
        assert c_noise[k].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # sigma_min = 0: EDM's own c_skip and c_out (Karras et al. 2022, Table 1)
    c_skip0, c_out0, _, _ = consistency_scalings(sigma, 0.0, sd)
    torch.testing.assert_close(c_skip0, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out0, sigma * sd / (sigma**2 + sd**2).sqrt())


@pytest.mark.parametrize("sigma_min", [0.002, 0.01])
def test_boundary_condition_is_exact_for_a_random_network(sigma_min):
    net = random_unet(num_classes=3).eval()
    f = ConsistencyFunction(net, sigma_min=sigma_min)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(f(x, sigma_min, y=y), x)
        assert torch.equal(f(x, torch.full((4,), sigma_min), y=y), x)
        away = f(x, 2 * sigma_min, y=y)
    assert not torch.allclose(away, x)  # the network does contribute above the boundary


def test_student_starts_close_to_its_edm_teacher():
    """Same raw F, same c_in / c_noise: f is EDM's D(x; sigma) exactly at sigma_min = 0 and
    within O(sigma_min / sigma_data) of it at sigma_min = 0.002."""
    net = random_unet().eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sd = SIGMA_DATA
    for s in [0.02, 0.3, 2.0, 80.0]:
        sigma = torch.full((4,), s)
        with torch.no_grad():
            F_x = net(x / math.sqrt(sd**2 + s**2), sigma.log() / 4)
            D = sd**2 / (s**2 + sd**2) * x + s * sd / math.sqrt(s**2 + sd**2) * F_x  # EDM
            torch.testing.assert_close(ConsistencyFunction(net, sigma_min=0.0)(x, sigma), D)
            gap = (ConsistencyFunction(net, sigma_min=SIGMA_MIN)(x, sigma) - D).abs().max()
        assert gap <= 3 * SIGMA_MIN / sd * (x.abs().max() + F_x.abs().max())


@pytest.mark.parametrize("formulation, prediction", [("ddpm", "eps"), ("ddpm", "v"),
                                                     ("edm", "x0"), ("flow", "v")])
def test_teacher_and_student_never_read_a_value_on_the_host(formulation, prediction):
    """The meta device has shapes but no data: any .cpu(), .item(), float(tensor) or
    bool(tensor) in a model call raises there. The teacher's denoiser, the student f and the
    bridge's sampler-facing model all run on it, so on a GPU none of them waits for the device
    per call (the timestep / abar look-ups stay on x's device: schedule.DeviceTable)."""
    bridge = bridge_for(DiffusionConfig(formulation=formulation, prediction=prediction,
                                        timesteps=100))

    def net(x, c_noise, y=None):
        return x * c_noise.reshape(-1, 1, 1, 1)
    x = torch.ones(3, 1, 4, 4, device="meta")
    sigma = torch.tensor([0.01, 0.5, 60.0], device="meta")
    out = (teacher_denoiser(net, bridge)(x, sigma), student_function(net, bridge)(x, sigma),
           bridge.wrap(net)(x, torch.tensor([99.0, 40.5, 0.0], device="meta")))
    assert all(o.device.type == "meta" and o.shape == x.shape for o in out)


# --- the ECT loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_min", [SIGMA_MIN, 0.0])
def test_ect_loss_is_zero_for_the_exact_consistency_function_of_point_masses(sigma_min):
    """For data that is one point per class (the s = 0 Gaussian), x0 + t eps and x0 + r eps lie on
    one ODE trajectory, so the exact f* has zero loss for every t, r, stage and label; this holds
    only with the shared eps and with the boundary target x_r where r reaches sigma_min."""
    mu = [0.3, -0.6, 0.0]
    x0_of_label = torch.tensor(mu[:2], dtype=torch.float64)
    y = torch.tensor([0, 1] * 16)
    x0 = x0_of_label[y].reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    loss_fn = ECTLoss(sigma_min=sigma_min, d=100)
    exact = GaussianOracle(mu, 0.0, sigma_min)
    perturbed = GaussianOracle(mu, 0.0, sigma_min, offset=0.05)
    for step in [0, 99, 100, 500, 1000]:
        generator = torch.Generator().manual_seed(step)
        loss = loss_fn(exact, x0, generator=generator, y=y, step=step)
        assert loss.ndim == 0 and loss.item() < 1e-9
        bad = loss_fn(perturbed, x0, generator=torch.Generator().manual_seed(step), y=y, step=step)
        assert bad.item() > 1e-2


def test_ect_pair_loss_matches_the_closed_form_on_a_gaussian():
    """For s > 0 the pair x0 + t eps, x0 + r eps is not on one ODE trajectory, so even f* has a
    positive loss (consistency training's estimator is only first-order right as r -> t); it
    must equal ||(x0 - mu)(a_t - a_r) + eps (t a_t - r a_r)|| / (t - r),
    a_sigma = sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2)."""
    mu, s, sigma_min = 0.3, 0.5, SIGMA_MIN
    generator = torch.Generator().manual_seed(3)
    t = torch.tensor([0.05, 0.8, 2.0, 40.0, 0.001], dtype=torch.float64)  # last: inside boundary
    r = torch.tensor([sigma_min, 0.7, 1.0, 39.0, sigma_min], dtype=torch.float64)
    x0 = mu + s * torch.randn(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    f = ConsistencyFunction(GaussianOracle([mu], s, sigma_min), sigma_min=sigma_min)

    def a(sigma):
        return (math.sqrt(s**2 + sigma_min**2) / (s**2 + sigma**2).sqrt()).reshape(-1, 1, 1, 1)

    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    delta = (x0 - mu) * (a(t) - a(r)) + eps * (t4 * a(t) - r4 * a(r))
    for c in [0.0, 0.03]:
        expected = ((delta.flatten(1).square().sum(1) + c**2).sqrt() - c) / (t - r)
        expected[-1] = 0.0
        got = ect_pair_loss(f, x0, eps, t, r, c=c, sigma_min=sigma_min)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        assert (got[:-1] > 0).all()


def gaussian_denoiser(mu, s):
    """The exact EDM denoiser D(x, sigma, y) of N(mu_y, s^2 I):
    mu + (x - mu) s^2 / (s^2 + sigma^2)."""
    means = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)

    def D(x, sigma, y=None):
        labels = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
        m = means[labels].to(x.dtype).reshape(-1, 1, 1, 1)
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return m + (x - m) * s**2 / (s**2 + sigma**2)
    return D


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("sigma_min", [SIGMA_MIN, 0.0])
def test_cd_loss_is_zero_for_the_exact_function_and_teacher_of_point_masses(solver, sigma_min):
    """Consistency distillation (``ECTLoss(teacher=)``): for one point per class the ODE paths
    are straight lines, so both solvers' steps land on them and the exact f* has zero loss."""
    mu = [0.3, -0.6, 0.0]
    y = torch.tensor([0, 1] * 16)
    x0 = torch.tensor(mu[:2], dtype=torch.float64)[y].reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    loss_fn = ECTLoss(sigma_min=sigma_min, d=100, teacher=gaussian_denoiser(mu, 0.0),
                      solver=solver)
    for step in [0, 150, 1000]:
        loss = loss_fn(GaussianOracle(mu, 0.0, sigma_min), x0.contiguous(), y=y, step=step,
                       generator=torch.Generator().manual_seed(step))
        assert loss.item() < 1e-9
        bad = loss_fn(GaussianOracle(mu, 0.0, sigma_min, offset=0.05), x0.contiguous(), y=y,
                      step=step, generator=torch.Generator().manual_seed(step))
        assert bad.item() > 1e-2


def test_cd_pair_loss_of_the_exact_function_vanishes_at_the_solvers_order():
    """On N(mu, s^2) with s > 0 and the exact teacher, the teacher's step from x_t stays on x_t's
    trajectory up to the solver's local error, O(dt^2) for Euler and O(dt^3) for Heun, so f*'s
    pair loss (weighted by 1 / dt) falls like dt and dt^2; consistency training's x0 + r eps
    is not on the trajectory and its loss tends to a positive limit instead."""
    mu, s, sigma_min = 0.3, 0.5, SIGMA_MIN
    generator = torch.Generator().manual_seed(11)
    x0 = mu + s * torch.randn(64, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(64, 1, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.full((64,), 1.0, dtype=torch.float64)
    f = ConsistencyFunction(GaussianOracle([mu], s, sigma_min), sigma_min=sigma_min)
    teacher = gaussian_denoiser([mu], s)

    def loss(dt, **kwargs):
        return ect_pair_loss(f, x0, eps, t, t - dt, sigma_min=sigma_min, **kwargs).mean().item()

    euler = [loss(dt, teacher=teacher, solver="euler") for dt in (0.02, 0.01)]
    heun = [loss(dt, teacher=teacher, solver="heun") for dt in (0.02, 0.01)]
    ct = [loss(dt) for dt in (0.1, 0.05, 0.001)]
    assert euler[0] / euler[1] == pytest.approx(2.0, rel=0.1)
    assert heun[0] / heun[1] == pytest.approx(4.0, rel=0.1)
    assert heun[0] < euler[0] / 10
    assert ct[2] > ct[0] / 2 > 10 * euler[0]  # training's estimator does not vanish


def test_teacher_ode_step_matches_edm_euler_and_heun_by_hand():
    D = gaussian_denoiser([0.2], 0.4)
    x = torch.full((2, 1, 2, 2), 1.5, dtype=torch.float64)
    t = torch.tensor([2.0, 2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    d_t = (1.5 - (0.2 + 1.3 * 0.16 / 4.16)) / 2.0
    euler = 1.5 - d_t
    x_e = torch.tensor(euler)
    d_r = (euler - (0.2 + (x_e.item() - 0.2) * 0.16 / 1.16)) / 1.0
    got = teacher_ode_step(D, x, t, r, solver="heun")
    assert got[0].flatten().tolist() == pytest.approx([1.5 - (d_t + d_r) / 2] * 4, rel=1e-12)
    assert got[1].flatten().tolist() == pytest.approx([1.5 - 2 * d_t] * 4, rel=1e-12)  # r = 0
    torch.testing.assert_close(teacher_ode_step(D, x, t, r)[0],
                               torch.full((1, 2, 2), euler, dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown ODE solver 'rk4'"):
        teacher_ode_step(D, x, t, r, solver="rk4")
    with pytest.raises(ConfigError, match="ECT's solver must be euler or heun"):
        ECTLoss(solver="rk4")


def test_ect_target_is_stopgrad():
    """With F = theta * G, d loss / d theta comes from f(x_t, t) alone:
    sum_i w_i (delta_i . c_out(t_i) G(x_t_i)) / ||delta_i|| / N."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def forward(self, x_in, c_noise, y=None):
            return self.theta * self.g(x_in, c_noise)

        @staticmethod
        def g(x_in, c_noise):
            return x_in * torch.cos(c_noise).reshape(-1, 1, 1, 1) + 0.3

    net = Scaled()
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64).clamp(-1, 1)
    eps = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.4, 3.0, 20.0], dtype=torch.float64)
    r = torch.tensor([0.3, 2.5, 10.0], dtype=torch.float64)
    f = ConsistencyFunction(net)
    ect_pair_loss(f, x0, eps, t, r).mean().backward()

    with torch.no_grad():
        t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
        delta = f(x0 + t4 * eps, t) - f(x0 + r4 * eps, r)
        _, c_out, c_in, c_noise = consistency_scalings(t4, SIGMA_MIN, SIGMA_DATA)
        d_f_t = c_out * Scaled.g(c_in * (x0 + t4 * eps), c_noise.flatten())
        per_pair = (delta * d_f_t).flatten(1).sum(1) / delta.flatten(1).norm(dim=1) / (t - r)
    torch.testing.assert_close(net.theta.grad, per_pair.mean())


def test_both_passes_share_one_dropout_mask():
    class Dropping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = torch.nn.Dropout(0.5)
            self.masks = []

        def forward(self, x_in, c_noise, y=None):
            mask = self.dropout(torch.ones_like(x_in))
            self.masks.append(mask)
            return x_in * mask

    net = Dropping().train()
    torch.manual_seed(5)
    loss = ECTLoss(d=10)(net, torch.zeros(8, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                         step=100)
    assert torch.isfinite(loss)
    assert len(net.masks) == 2 and torch.equal(net.masks[0], net.masks[1])
    assert 0 < (net.masks[0] == 0).float().mean() < 1  # dropout did drop something


def test_ect_loss_on_a_unet_is_deterministic_and_trains():
    net = random_unet(num_classes=2, dropout=0.1).train()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])  # 2 is the null class
    loss_fn = ECTLoss(d=2)

    def loss_at(seed, step=3):
        torch.manual_seed(0)  # dropout's masks come from the global RNG
        return loss_fn(net, x0, generator=torch.Generator().manual_seed(seed), y=y, step=step)

    first = loss_at(7)
    assert torch.equal(first, loss_at(7))
    assert not torch.equal(first, loss_at(8))
    first.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_ect_loss_rejects_impossible_settings():
    for kwargs, name in [({"q": 1.0}, "q"), ({"d": 0}, "d"), ({"P_std": 0.0}, "P_std"),
                         ({"c": -1.0}, "c"), ({"sigma_min": -0.1}, "sigma_min")]:
        with pytest.raises(ConfigError, match=f"ECT's {name} must be"):
            ECTLoss(**kwargs)


def test_ect_distance_is_l2_or_pseudo_huber():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(ect_distance(delta), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(ect_distance(delta, c=1.0),
                               torch.tensor([math.sqrt(26.0) - 1.0, 0.0]))
    zero = torch.zeros(2, 3, requires_grad=True)
    ect_distance(zero).sum().backward()
    assert torch.equal(zero.grad, torch.zeros(2, 3))  # no NaN where f_t equals its target


# --- the r(t) schedule --------------------------------------------------------------------------


def test_r_shrinks_delta_t_by_q_every_d_steps():
    q, d, k, b, sigma_min = 2.0, 100, 8.0, 1.0, SIGMA_MIN
    t = torch.logspace(math.log10(0.003), math.log10(200.0), 300, dtype=torch.float64)
    previous_gap = t - sigma_min
    for step in [0, 99, 100, 250, 1000, 3000]:
        r = ect_r(t, step, q=q, d=d, k=k, b=b, sigma_min=sigma_min)
        assert (r < t).all() and (r >= sigma_min).all()
        gap = t - r
        assert (gap <= previous_gap + 1e-12).all()  # Delta t never grows with training
        previous_gap = gap
    # by hand: t = 10, n(t) = 1 + 8 sigmoid(-10); a = 1 before step d, 2 from d on
    n_10 = 1 + 8 / (1 + math.exp(10))
    ten = torch.tensor([10.0], dtype=torch.float64)
    assert ect_r(ten, 0, d=d).item() == pytest.approx(10 * (1 - n_10 / 2), rel=1e-12)
    assert ect_r(ten, d, d=d).item() == pytest.approx(10 * (1 - n_10 / 4), rel=1e-12)
    # where n(t) is about 1 (large t) each stage divides Delta t by q exactly
    big = torch.tensor([60.0], dtype=torch.float64)
    gaps = [(big - ect_r(big, a * d, d=d)).item() for a in range(5)]
    for before, after in zip(gaps[:-1], gaps[1:], strict=True):
        assert before / after == pytest.approx(q, rel=1e-9)
    # stage 0: small t has n(t) > q, so r falls to the boundary (a denoising loss there)
    small = torch.tensor([0.01, 0.5, 1.5], dtype=torch.float64)
    assert torch.equal(ect_r(small, 0, d=d), torch.full((3,), sigma_min, dtype=torch.float64))
    # late in training r -> t
    late = ect_r(t, 30 * d, d=d)
    assert ((t - late) / t).max() < 1e-8


# --- multistep sampling -------------------------------------------------------------------------


def test_consistency_sigmas_defaults_and_errors():
    assert consistency_sigmas(1) == [SIGMA_MAX]
    assert consistency_sigmas(2) == [SIGMA_MAX, ECT_MID_SIGMA]
    four = consistency_sigmas(4)
    assert len(four) == 4 and four[0] == SIGMA_MAX
    assert four[1:] == pytest.approx([17.5, 2.52, 0.17], rel=0.02)
    assert consistency_sigmas(2, sigma_max=40.0, mid_sigmas=[1.5]) == [40.0, 1.5]
    for steps in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match="1 or more steps"):
            consistency_sigmas(steps)
    with pytest.raises(ValueError, match="takes 1 intermediate sigmas"):
        consistency_sigmas(2, mid_sigmas=[2.0, 1.0])
    with pytest.raises(ValueError, match="must descend"):
        consistency_sigmas(3, mid_sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="above sigma_min"):
        consistency_sigmas(2, mid_sigmas=[0.001])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampling_of_the_exact_function_draws_the_data(steps):
    mu, s = 0.3, 0.5
    f = ConsistencyFunction(GaussianOracle([mu], s, SIGMA_MIN))
    generator = torch.Generator().manual_seed(10 + steps)
    z = torch.randn(4096, 1, 4, 4, generator=generator, dtype=torch.float64)
    x0 = consistency_sample(f, z, consistency_sigmas(steps), generator=generator)
    # the data at sigma_min, N(mu, s^2 + sigma_min^2); 65,536 values: std error ~0.3%
    assert x0.mean().item() == pytest.approx(mu, abs=0.01)
    assert x0.std().item() == pytest.approx(math.sqrt(s**2 + SIGMA_MIN**2), rel=0.015)


def test_sampling_without_fresh_noise_would_shrink_the_spread():
    """The second step must re-noise x0 to sigma_1: feeding x0 back unchanged narrows the samples
    by a(sigma_1) ~ 0.52, far outside the tolerance above."""
    mu, s = 0.3, 0.5
    f = ConsistencyFunction(GaussianOracle([mu], s, SIGMA_MIN))
    z = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(11),
                    dtype=torch.float64)
    one = consistency_sample(f, z, [SIGMA_MAX])
    no_renoise = f(one, torch.full((4096,), ECT_MID_SIGMA, dtype=torch.float64))
    assert no_renoise.std().item() < 0.6 * s


def test_sampler_callback_generator_and_sigmas():
    f = ConsistencyFunction(GaussianOracle([0.0], 0.5, SIGMA_MIN))
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(12))
    sigmas = consistency_sigmas(4)
    seen = []
    out = consistency_sample(f, z, sigmas, generator=torch.Generator().manual_seed(0),
                             callback=seen.append)
    assert [e["i"] for e in seen] == [0, 1, 2, 3]
    assert [e["t"] for e in seen] == sigmas
    assert torch.equal(seen[0]["x_t"], SIGMA_MAX * z)
    assert torch.equal(seen[-1]["x0"], out) and out.shape == z.shape
    again = consistency_sample(f, z, sigmas, generator=torch.Generator().manual_seed(0))
    other = consistency_sample(f, z, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_guidance_wraps_the_consistency_function_for_the_sampler():
    """guided_model(f, labels, w) is again an f(x, sigma): w = 1 samples each label's mean,
    w = 2 combines conditional and unconditional f in one batched call, and the guided f still
    returns x at sigma_min."""
    mu = [0.5, -0.5, 0.0]  # labels 0, 1; the null class (2) has mean 0
    f = ConsistencyFunction(GaussianOracle(mu, 0.2, SIGMA_MIN))
    labels = torch.tensor([0, 1]).repeat_interleave(2048)
    z = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(13),
                    dtype=torch.float64)
    generator = torch.Generator().manual_seed(14)
    x0 = consistency_sample(guided_model(f, labels, 1.0), z, consistency_sigmas(2),
                            generator=generator)
    assert x0[:2048].mean().item() == pytest.approx(0.5, abs=0.02)
    assert x0[2048:].mean().item() == pytest.approx(-0.5, abs=0.02)

    guided = guided_model(f, labels, 2.0)
    sigma = torch.full((4096,), 3.0, dtype=torch.float64)
    x = 3.0 * z
    cond, uncond = functools.partial(f, y=labels)(x, sigma), f(x, sigma, y=torch.full_like(
        labels, 2))
    torch.testing.assert_close(guided(x, sigma), uncond + 2.0 * (cond - uncond))
    at_min = torch.full((4096,), SIGMA_MIN, dtype=torch.float64)
    torch.testing.assert_close(guided(z, at_min), z, rtol=0, atol=1e-12)
