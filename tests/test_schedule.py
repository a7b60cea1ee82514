import math

import numpy as np
import pytest
import torch

from pixeldiffusion.schedule import (
    alphas_cumprod_from_betas,
    cosine_betas,
    linear_betas,
    make_betas,
    sampling_timesteps,
    sigmoid_betas,
)


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
