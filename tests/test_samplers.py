import pytest
import torch

from pixeldiffusion.diffusion import gather, target
from pixeldiffusion.samplers import SAMPLERS, ddim, ddpm, make_denoiser, sample
from pixeldiffusion.schedule import (
    alphas_cumprod_from_betas,
    cosine_betas,
    linear_betas,
    sampling_timesteps,
)

ABAR = alphas_cumprod_from_betas(linear_betas(1000))


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


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps, skip_type", [(10, "uniform"), (7, "quadratic"), (1000, "uniform")])
def test_model_is_called_exactly_at_the_spacing_timesteps(sampler, steps, skip_type):
    seen = []

    def model(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)
    sample(model, torch.randn(2, 3), ABAR, sampler=sampler, steps=steps, skip_type=skip_type)
    assert seen == sampling_timesteps(1000, steps, skip_type).tolist()


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
    for fn in (ddim, ddpm):
        out = fn(denoise, torch.randn(2, 2), ts, ABAR, generator=None, callback=None)
        assert out.shape == (2, 2)


def test_other_schedules_and_bad_arguments():
    ac = alphas_cumprod_from_betas(cosine_betas(100))
    x0 = sample(point_mass_model(-0.5, "v", ac), torch.randn(2, 2), ac, prediction="v", steps=10)
    torch.testing.assert_close(x0, torch.full_like(x0, -0.5), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(point_mass_model(0, "eps"), torch.randn(1, 1), ABAR, sampler="euler_a")
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
