import math

import numpy as np
import pytest
import torch

from pixeldiffusion.schedule import (
    SPACINGS,
    alphas_cumprod_at,
    alphas_cumprod_from_betas,
    cosine_betas,
    linear_betas,
    make_betas,
    sampling_timesteps,
    sigma_of,
    sigmoid_betas,
    timestep_of_sigma,
)

ABAR = alphas_cumprod_from_betas(linear_betas(1000))


def test_linear_schedule_closed_form():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert betas[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999)
    abar = alphas_cumprod_from_betas(betas)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-12)
    assert abar[-1] == pytest.approx(4.036e-5, rel=1e-3)  # DDPM: x_T is almost pure noise


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    abar = alphas_cumprod_from_betas(cosine_betas(T))

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 250, 500, 900):  # Nichol & Dhariwal eq. 17, index t is time t + 1
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert (cosine_betas(T) <= 0.999).all()


def test_sigmoid_schedule_is_a_decreasing_alphas_cumprod():
    abar = alphas_cumprod_from_betas(sigmoid_betas(500))
    assert 0.99 < abar[0] < 1 and abar[-1] < 1e-5
    assert (abar[1:] < abar[:-1]).all()


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [2, 10, 4000])
def test_every_schedule_any_T(name, T):
    betas = make_betas(name, T)
    assert betas.shape == (T,) and ((betas > 0) & (betas < 1)).all()


@pytest.mark.parametrize("skip_type", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_sampling_timesteps_are_distinct_descending_and_in_range(skip_type, steps):
    seq = sampling_timesteps(1000, steps, skip_type)
    assert seq.dtype == torch.long and len(seq) == steps
    assert (seq[:-1] > seq[1:]).all() and seq[-1] >= 0 and seq[0] <= 999


def test_uniform_starts_at_T_minus_1_and_full_steps_is_every_t():
    assert sampling_timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299,
                                                    199, 99]
    assert sampling_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


def test_quadratic_matches_ddim_spacing():
    expected = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), 10) ** 2][::-1]
    assert sampling_timesteps(1000, 10, "quadratic").tolist() == expected


def test_bad_steps_raise():
    with pytest.raises(ValueError, match="steps must be in"):
        sampling_timesteps(100, 101)


# where each spacing starts and ends (the docstring of sampling_timesteps), T = 1000
ENDS = {"uniform": lambda n: (999, 1000 // n - 1 if 1000 % n == 0 else None),
        "leading": lambda n: ((n - 1) * (1000 // n), 0), "linspace": lambda n: (999, 0),
        "quadratic": lambda n: (800 if n <= 100 else None, 0), "karras": lambda n: (999, 0),
        "logsnr": lambda n: (999, 0)}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [2, 3, 10, 25, 100, 1000])
def test_every_spacing_is_strictly_decreasing_and_starts_and_ends_where_documented(spacing,
                                                                                  steps):
    seq = sampling_timesteps(1000, steps, spacing, ABAR)
    assert len(seq) == steps and bool((seq[:-1] > seq[1:]).all())
    assert seq.dtype == (torch.float64 if spacing in ("karras", "logsnr") else torch.long)
    first, last = ENDS[spacing](steps)
    assert 0 <= float(seq[-1]) and float(seq[0]) <= 999
    if first is not None:
        assert float(seq[0]) == first
    if last is not None:
        assert float(seq[-1]) == last


def test_karras_and_logsnr_follow_their_formulas():
    sigma = sigma_of(alphas_cumprod_at(ABAR, sampling_timesteps(1000, 8, "karras", ABAR)))
    lo, hi = float(sigma_of(ABAR)[0]), float(sigma_of(ABAR)[-1])
    ramp = np.linspace(0, 1, 8)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7  # EDM eq. 5
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-9)
    lambda_ = -sigma_of(alphas_cumprod_at(ABAR, sampling_timesteps(1000, 8, "logsnr", ABAR))).log()
    np.testing.assert_allclose(np.diff(lambda_.numpy()), np.diff(lambda_.numpy())[0], rtol=1e-9)


def test_alphas_cumprod_at_is_exact_on_integers_and_interpolates_log_sigma():
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(alphas_cumprod_at(ABAR, t), ABAR)
    mid = alphas_cumprod_at(ABAR, torch.tensor([10.5]))
    log_sigma = sigma_of(ABAR).log()
    expected = 1 / (1 + torch.exp(log_sigma[10] + log_sigma[11]))
    torch.testing.assert_close(mid, expected.reshape(1))
    back = timestep_of_sigma(ABAR, sigma_of(alphas_cumprod_at(ABAR, torch.tensor([3.25, 700.9]))))
    torch.testing.assert_close(back, torch.tensor([3.25, 700.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="must lie in"):
        alphas_cumprod_at(ABAR, torch.tensor([1000.0]))


def test_explicit_timesteps_are_used_as_given_and_checked():
    assert sampling_timesteps(1000, 3, [999, 500, 0]).tolist() == [999, 500, 0]
    assert sampling_timesteps(1000, 0, "999,400.5,3").tolist() == [999.0, 400.5, 3.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling_timesteps(1000, 0, [5, 500])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling_timesteps(1000, 0, [1000, 5])
    assert sampling_timesteps(1000, 100, torch.tensor([999, 5])).tolist() == [999, 5]


def test_unknown_spacing_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'logsnr'"):
        sampling_timesteps(1000, 10, "logsrn", ABAR)
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        sampling_timesteps(1000, 10, "karras")
