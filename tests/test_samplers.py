import inspect

import numpy as np
import pytest
import torch

from pixeldiffusion.config import SampleConfig, load_config
from pixeldiffusion.diffusion import target
from pixeldiffusion.errors import ConfigError
from pixeldiffusion.samplers import (
    SAMPLERS,
    ddim,
    ddpm,
    ddpm_posterior,
    default_spacing,
    is_stochastic,
    make_denoiser,
    option_names,
    sample,
)
from pixeldiffusion.schedule import (
    SPACINGS,
    alphas_cumprod_at,
    alphas_cumprod_from_betas,
    cosine_betas,
    linear_betas,
    sampling_timesteps,
)

ABAR = alphas_cumprod_from_betas(linear_betas(1000))


def gather(ac, t, like):
    """abar at a batch of (long or float) timesteps, shaped to broadcast against ``like``."""
    abar = alphas_cumprod_at(ac, t.detach().double().cpu())
    return abar.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def point_mass_model(c: float, prediction: str, ac=ABAR):
    """The exact model for data that is the single point c (x0 is known from x_t, t)."""
    def model(x_t, t):
        abar = gather(ac, t, x_t)
        x0 = torch.full_like(x_t, c)
        return target(prediction, x0, (x_t - abar.sqrt() * x0) / (1 - abar).sqrt(), abar)
    return model


def gaussian_model(s: float, ac=ABAR):
    """The exact eps-predictor for data ~ N(0, s^2 I): E[eps | x_t] = sqrt(1-abar)/(abar s^2 +
    1 - abar) x_t."""
    def model(x_t, t):
        abar = gather(ac, t, x_t)
        return (1 - abar).sqrt() / (abar * s**2 + 1 - abar) * x_t
    return model


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [1, 10, 1000])
def test_point_mass_is_recovered_exactly(sampler, prediction, steps):
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = sample(point_mass_model(0.25, prediction), x_T, ABAR, sampler=sampler, steps=steps,
                prediction=prediction, clip_x0=False, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0, torch.full_like(x0, 0.25), atol=1e-4, rtol=0)


GAUSSIAN_SAMPLERS = [("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}),
                     ("ddpm", {"var_type": "fixed_small"}), ("ddpm", {"var_type": "fixed_large"})]


def _gaussian_std(sampler, options, steps, s=0.5):
    x_T = torch.randn(4000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = sample(gaussian_model(s), x_T, ABAR, sampler=sampler, steps=steps, clip_x0=False,
                generator=torch.Generator().manual_seed(3), **options)
    assert abs(x0.mean().item()) < 0.02
    return x0.std().item()


@pytest.mark.parametrize("sampler, options", GAUSSIAN_SAMPLERS)
def test_gaussian_data_has_the_right_spread_at_full_steps(sampler, options):
    assert _gaussian_std(sampler, options, steps=1000) == pytest.approx(0.5, rel=0.015)


def test_skipped_steps_fixed_small_and_fixed_large_bracket_the_truth():
    """With the exact posterior mean, fixed_small drops Var(x0 | x_t) and under-disperses while
    fixed_large over-disperses (Ho et al. 2020, Sec. 3.2); the gap closes as steps grow."""
    small = _gaussian_std("ddpm", {"var_type": "fixed_small"}, steps=200)
    large = _gaussian_std("ddpm", {"var_type": "fixed_large"}, steps=200)
    assert 0.45 < small < 0.5 < large < 0.55
    assert _gaussian_std("ddim", {"eta": 0.0}, steps=200) == pytest.approx(0.5, rel=0.03)


def test_clip_false_leaves_data_outside_unit_range_alone():
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    x0 = sample(point_mass_model(7.0, "eps"), x_T, ABAR, steps=20, clip_x0=False)
    torch.testing.assert_close(x0, torch.full_like(x0, 7.0), atol=1e-3, rtol=0)
    clipped = sample(point_mass_model(7.0, "eps"), x_T, ABAR, steps=20, clip_x0=True)
    assert clipped.max().item() <= 1.0 + 1e-5


def test_ddim_with_eta_one_is_ddpm_fixed_small():
    """DDIM eq. 16 with eta = 1 is DDPM's posterior: same noise draws, same result."""
    model = gaussian_model(0.7)
    x_T = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = sample(model, x_T, ABAR, sampler="ddim", steps=25, eta=1.0, clip_x0=False,
               generator=torch.Generator().manual_seed(6))
    b = sample(model, x_T, ABAR, sampler="ddpm", steps=25, var_type="fixed_small", clip_x0=False,
               generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fixed_large_adds_more_noise_than_fixed_small():
    model = point_mass_model(0.0, "eps")
    x_T = torch.randn(2000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calls = []

    def spread(info):
        calls.append(info["x_t"].std().item())
    for var_type in ("fixed_small", "fixed_large"):
        sample(model, x_T, ABAR, sampler="ddpm", steps=10, var_type=var_type, clip_x0=False,
               generator=torch.Generator().manual_seed(1), callback=spread)
    small, large = calls[:10], calls[10:]
    assert all(b >= a for a, b in zip(small[1:], large[1:], strict=True))
    assert large[5] > small[5] * 1.01


def expected_calls(sampler, timesteps):
    """Heun evaluates every timestep but the first twice (its corrector, then its own step)."""
    ts = timesteps.tolist()
    return [ts[0], *[t for t in ts[1:] for _ in range(2)]] if sampler == "heun" else ts


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps, spacing", [(10, "uniform"), (7, "quadratic"), (1000, "uniform")])
def test_model_is_called_exactly_at_the_spacing_timesteps(sampler, steps, spacing):
    seen = []

    def model(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)
    sample(model, torch.randn(2, 3), ABAR, sampler=sampler, steps=steps, spacing=spacing)
    assert seen == expected_calls(sampler, sampling_timesteps(1000, steps, spacing))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 5, 13])
def test_every_sampler_calls_the_model_at_every_spacing(sampler, spacing, steps):
    """The off-by-one family: the model sees exactly the spacing's sequence, nothing else."""
    seen = []

    def model(x_t, t):
        assert t.shape == (x_t.shape[0],) and (t == t[0]).all()
        seen.append(float(t[0]))
        return 0.1 * x_t
    x_T = torch.randn(2, 3, dtype=torch.float64)  # float t comes in x_t's dtype
    x0 = sample(model, x_T, ABAR, sampler=sampler, steps=steps, spacing=spacing)
    assert torch.isfinite(x0).all()
    assert seen == expected_calls(sampler, sampling_timesteps(1000, steps, spacing, ABAR))


def test_callback_sees_every_step_and_the_x0_prediction():
    infos = []
    x_T = torch.randn(3, 1, 2, 2)
    sample(point_mass_model(0.5, "eps"), x_T, ABAR, steps=5, callback=infos.append)
    assert [i["i"] for i in infos] == list(range(5))
    assert infos[0]["x_t"] is x_T
    torch.testing.assert_close(infos[2]["x0"], torch.full_like(x_T, 0.5))


def test_samplers_share_one_contract():
    denoise = make_denoiser(point_mass_model(0.1, "eps"), ABAR)
    ts = sampling_timesteps(1000, 4)
    for fn in (ddim, ddpm, *SAMPLERS.values()):
        out = fn(denoise, torch.randn(2, 2), ts, ABAR, generator=None, callback=None)
        assert out.shape == (2, 2)


def test_other_schedules_and_bad_arguments():
    ac = alphas_cumprod_from_betas(cosine_betas(100))
    x0 = sample(point_mass_model(-0.5, "v", ac), torch.randn(2, 2), ac, prediction="v", steps=10)
    torch.testing.assert_close(x0, torch.full_like(x0, -0.5), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler 'unipcc'; did you mean 'unipc'"):
        sample(point_mass_model(0, "eps"), torch.randn(1, 1), ABAR, sampler="unipcc")
    with pytest.raises(ValueError, match="var_type"):
        sample(point_mass_model(0, "eps"), torch.randn(1, 1), ABAR, sampler="ddpm",
               var_type="learned")


def test_the_package_exports_the_sampling_api():
    import pixeldiffusion as pd
    assert pd.sample is sample
    x0 = pd.sample(point_mass_model(0.2, "eps"), torch.randn(2, 1, 2, 2), ABAR, steps=5)
    torch.testing.assert_close(x0, torch.full_like(x0, 0.2), atol=1e-4, rtol=0)
    with pytest.raises(AttributeError):
        pd.not_a_thing  # noqa: B018


NEW_SAMPLERS = ["euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m",
                "unipc"]


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_point_mass_is_recovered_exactly_by_every_sampler(sampler, prediction, steps):
    x_T = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = sample(point_mass_model(0.25, prediction), x_T, ABAR, sampler=sampler, steps=steps,
                prediction=prediction, clip_x0=False, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0, torch.full_like(x0, 0.25), atol=1e-6, rtol=0)


S = 0.5


def _gaussian_ode_target(x_T):
    """Data ~ N(0, S^2): the probability-flow ODE is linear, x_t = sqrt(abar_t S^2 + 1 - abar_t) z
    with z = x_T / sqrt(abar_T S^2 + 1 - abar_T). Samplers end with x_0 = E[x0 | x_t] at t = 0,
    which is sqrt(abar_0) S^2 / (abar_0 S^2 + 1 - abar_0) x_t there."""
    abar_T, abar_0 = float(ABAR[-1]), float(ABAR[0])
    z = x_T / (abar_T * S**2 + 1 - abar_T) ** 0.5
    return abar_0**0.5 * S**2 / (abar_0 * S**2 + 1 - abar_0) ** 0.5 * z


# (sampler, options, known order): Euler/DDIM 1, Heun 2 (EDM), DPM-Solver++(2M) 2, (3M) 3,
# UniPC-p: predictor order p, the corrector raises it to p + 1 (Zhao et al. 2023, Thm. 3.3)
ORDERS = [("ddim", {}, 1), ("euler", {}, 1), ("heun", {}, 2), ("dpmpp_2m", {}, 2),
          ("dpmpp_3m", {}, 3), ("unipc", {"order": 1}, 2), ("unipc", {"order": 2}, 3),
          ("unipc", {"order": 3}, 4), ("unipc", {"order": 3, "variant": "bh1"}, 4)]


@pytest.mark.parametrize("sampler, options, order", ORDERS)
def test_deterministic_samplers_converge_at_their_order(sampler, options, order):
    """Single Gaussian, exact eps: the error to the closed-form ODE solution falls like
    steps^-order (slope of log error vs log steps, logsnr spacing)."""
    x_T = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = _gaussian_ode_target(x_T)
    steps = [16, 32] if order >= 3 else [16, 32, 64]
    errors = [(sample(gaussian_model(S), x_T, ABAR, sampler=sampler, steps=n, spacing="logsnr",
                      clip_x0=False, **options) - exact).abs().max().item() for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert errors[-1] < errors[0] / 2 ** order * 1.5
    assert -(order + 1.5) < slope < -(order - 0.4), (errors, slope)


def test_ddim_is_deterministic_and_at_1000_steps_is_the_probability_flow_solution():
    x_T = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = sample(gaussian_model(S), x_T, ABAR, sampler="ddim", steps=1000, clip_x0=False,
               generator=torch.Generator().manual_seed(1))
    b = sample(gaussian_model(S), x_T, ABAR, sampler="ddim", steps=1000, clip_x0=False,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    exact = _gaussian_ode_target(x_T)
    assert (a - exact).abs().max().item() < 4e-3 * exact.abs().max().item()  # 1st order


def test_ddpm_with_all_steps_is_ancestral_sampling():
    """Ho et al. 2020, Alg. 2 written out with betas, same noise draws: identical."""
    betas = linear_betas(1000)
    model = gaussian_model(0.7)
    x_T = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ours = sample(model, x_T, ABAR, sampler="ddpm", steps=1000, clip_x0=False,
                  generator=torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(5), x_T
    for t in range(999, -1, -1):
        eps = model(x, torch.full((len(x),), t))
        beta, abar = betas[t].item(), ABAR[t].item()
        mean = (x - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        if t > 0:
            var = beta * (1 - ABAR[t - 1].item()) / (1 - abar)
            x = mean + var**0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        else:
            x = x0
    torch.testing.assert_close(ours, x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_euler_is_ddim_and_euler_ancestral_is_ddpm_posterior(spacing):
    """Karras et al. 2022, Sec. 3: DDIM is Euler in sigma; the ancestral step with eta = 1 is
    DDIM eq. 16 with eta = 1. DPM-Solver++ 2M SDE with eta = 0 is 2M."""
    model, g = gaussian_model(0.6), torch.Generator
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=g().manual_seed(0))

    def run(name, **kw):
        return sample(model, x_T, ABAR, sampler=name, steps=12, spacing=spacing, clip_x0=False,
                      generator=g().manual_seed(9), **kw)
    torch.testing.assert_close(run("euler"), run("ddim"), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run("euler_ancestral"), run("ddim", eta=1.0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(run("euler_ancestral", eta=0.0), run("euler"))
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m"))
    assert not torch.allclose(run("dpmpp_2m_sde"), run("dpmpp_2m"))
    assert not torch.allclose(run("heun", s_churn=10.0), run("heun"))


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "heun"])
def test_stochastic_samplers_have_the_right_spread(sampler):
    options = {"s_churn": 5.0} if sampler == "heun" else {}
    x_T = torch.randn(3000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = sample(gaussian_model(S), x_T, ABAR, sampler=sampler, steps=40, clip_x0=False,
                generator=torch.Generator().manual_seed(3), **options)
    assert abs(x0.mean().item()) < 0.02 and x0.std().item() == pytest.approx(S, rel=0.03)


def test_dynamic_thresholding_off_is_exact_and_on_rescales():
    x_t = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500)
    abar = ABAR[500].item()
    big = point_mass_model(3.0, "eps")
    plain = make_denoiser(big, ABAR, clip_x0=False)(x_t, 500)[0]
    torch.testing.assert_close(plain, torch.full_like(x_t, 3.0), atol=1e-5, rtol=0)
    x0, eps = make_denoiser(big, ABAR, clip_x0=False, dynamic_threshold=0.9)(x_t, 500)
    torch.testing.assert_close(x0, torch.ones_like(x0))  # clamp to [-s, s], divide by s = 3
    torch.testing.assert_close(x_t, abar**0.5 * x0 + (1 - abar) ** 0.5 * eps)
    inside = point_mass_model(0.5, "eps")
    torch.testing.assert_close(make_denoiser(inside, ABAR, dynamic_threshold=0.995)(x_t, 500)[0],
                               make_denoiser(inside, ABAR, clip_x0=False)(x_t, 500)[0])
    assert big(x_t, t).shape == x_t.shape
    with pytest.raises(ValueError, match="quantile"):
        make_denoiser(big, ABAR, dynamic_threshold=1.5)


def test_float_timesteps_reach_the_model_and_integer_ones_stay_long():
    dtypes = []

    def model(x_t, t):
        dtypes.append(t.dtype)
        return torch.zeros_like(x_t)
    sample(model, torch.randn(2, 2), ABAR, sampler="unipc", steps=6, spacing="karras")
    assert dtypes[0] == torch.long and dtypes[1] == torch.float32 and dtypes[-1] == torch.long
    dtypes.clear()
    sample(model, torch.randn(2, 2), ABAR, sampler="unipc", steps=6, spacing="999,700,0")
    assert set(dtypes) == {torch.long}


def test_sample_defaults_are_the_sample_sections_and_it_accepts_options():
    seen = []

    def model(x_t, t):
        seen.append(float(t[0]))
        return 0.1 * x_t
    defaults = SampleConfig()
    sample(model, torch.randn(2, 2, dtype=torch.float64), ABAR)
    assert seen == sampling_timesteps(1000, defaults.steps, default_spacing(defaults.sampler),
                                      ABAR).tolist()
    seen.clear()
    sample(model, torch.randn(2, 2, dtype=torch.float64), ABAR, sampler="unipc", steps=10)
    assert seen == sampling_timesteps(1000, 10, "logsnr", ABAR).tolist()
    with pytest.raises(ValueError, match="variant"):
        sample(model, torch.randn(2, 2), ABAR, sampler="unipc", variant="bh3")
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        sample(model, torch.randn(2, 2), ABAR, spacing="karas")
    with pytest.raises(ValueError, match="optimal_steps.calibrated_timesteps"):
        sample(model, torch.randn(2, 2), ABAR, spacing="optimal")


def test_the_config_accepts_exactly_the_sampler_names():
    for name in SAMPLERS:
        assert load_config(None, ["--sample.sampler", name]).sample.sampler == name
    with pytest.raises(ConfigError, match="did you mean 'dpmpp_2m'"):
        load_config(None, ["--sample.sampler", "dpmpp2m"])


def test_options_are_the_keyword_only_parameters():
    assert option_names("ddim") == ("eta",)
    assert option_names("ddpm") == ("var_type",)
    assert set(option_names("euler_ancestral")) == {"eta", "s_noise"}
    assert set(option_names("dpmpp_2m_sde")) == {"eta", "s_noise"}
    assert set(option_names("unipc")) == {"order", "variant", "corrector", "lower_order_final"}
    assert option_names("dpmpp_2m") == ()
    for name in SAMPLERS:  # every option of every sampler is accepted by it
        denoise = make_denoiser(point_mass_model(0.1, "eps"), ABAR)
        parameters = inspect.signature(SAMPLERS[name]).parameters
        options = {key: parameters[key].default for key in option_names(name)}
        SAMPLERS[name](denoise, torch.randn(2, 2), sampling_timesteps(1000, 3), ABAR, **options)
    with pytest.raises(ValueError, match="unknown sampler 'dim'; did you mean 'ddim'"):
        option_names("dim")


@pytest.mark.parametrize(("sampler", "options"), [
    *((name, {}) for name in sorted(SAMPLERS)),
    ("ddim", {"eta": 0.5}), ("euler_ancestral", {"eta": 0.0}), ("dpmpp_2m_sde", {"eta": 0.0}),
    ("heun", {"s_churn": 5.0}),
])
def test_is_stochastic_says_whether_two_runs_from_one_noise_differ(sampler, options):
    model = gaussian_model(0.6)
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = (sample(model, x_T, ABAR, sampler=sampler, steps=8, clip_x0=False,
                   generator=torch.Generator().manual_seed(seed), **options) for seed in (1, 2))
    assert is_stochastic(sampler, options) == (not torch.equal(a, b))


@pytest.mark.parametrize("t, t_prev", [(500, 499), (900, 300), (10, 0)])
def test_ddpm_posterior_is_bayes_rule_for_the_two_gaussians(t, t_prev):
    """q(x_prev | x_t, x0) ∝ N(x_prev; sqrt(abar_prev) x0, 1 - abar_prev) N(x_t; a x_prev, b^2),
    a^2 = abar_t / abar_prev, b^2 = 1 - a^2 (DDPM eq. 6-7, also for skipped steps)."""
    abar_t, abar_prev = float(ABAR[t]), float(ABAR[t_prev])
    x0, x_t = torch.tensor([0.3, -0.8], dtype=torch.float64), torch.tensor([1.2, 0.1],
                                                                           dtype=torch.float64)
    a2 = abar_t / abar_prev
    precision = 1 / (1 - abar_prev) + a2 / (1 - a2)
    mean = (abar_prev**0.5 * x0 / (1 - abar_prev) + a2**0.5 * x_t / (1 - a2)) / precision
    got_mean, got_var = ddpm_posterior(x0, x_t, abar_t, abar_prev, "fixed_small")
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    assert got_var == pytest.approx(1 / precision, rel=1e-10)
    assert ddpm_posterior(x0, x_t, abar_t, abar_prev, "fixed_large")[1] == pytest.approx(1 - a2)
    data_mean, data_var = ddpm_posterior(x0, x_t, abar_t, 1.0)
    torch.testing.assert_close(data_mean, x0)
    assert data_var == 0
