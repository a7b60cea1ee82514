import math

import numpy as np
import pytest
import torch

from pixeldiffusion.formulations import edm_alphas_cumprod, flow_alphas_cumprod
from pixeldiffusion.schedule import (
    SPACINGS,
    DeviceTable,
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


def _abar_at_on_the_cpu(alphas_cumprod, t):
    """The bridges' look-up before DeviceTable, verbatim: t to float64 on the CPU, then log
    sigma interpolated between integer steps. The reference DeviceTable must match."""
    ac = alphas_cumprod.detach().double().cpu()
    t = t.detach().double().cpu()
    low = t.floor().long()
    high = (low + 1).clamp(max=len(ac) - 1)
    frac = t - low
    log_sigma = sigma_of(ac).log()
    interpolated = log_sigma[low] * (1 - frac) + log_sigma[high] * frac
    return torch.where(frac == 0, ac[low], 1 / (1 + (2 * interpolated).exp()))


def _timestep_of_sigma_in_numpy(alphas_cumprod, sigma):
    """timestep_of_sigma before DeviceTable, verbatim: np.interp of log sigma on the CPU."""
    log_sigma = sigma_of(alphas_cumprod).log().numpy()
    target = np.log(np.asarray(sigma.double().cpu(), dtype=np.float64))
    t = np.interp(target, log_sigma, np.arange(len(log_sigma), dtype=np.float64))
    return torch.as_tensor(t, dtype=torch.float64)


TABLES = {"ddpm_linear": ABAR, "ddpm_cosine": alphas_cumprod_from_betas(cosine_betas(1000)),
          "edm": edm_alphas_cumprod(50), "flow_shift_3": flow_alphas_cumprod(1000, shift=3.0),
          "two_steps": alphas_cumprod_from_betas(linear_betas(2))}


@pytest.mark.parametrize("name", TABLES)
def test_device_table_looks_up_as_the_cpu_did_bit_for_bit(name):
    """DeviceTable (the bridges' and the consistency teacher's per-call look-up) gives exactly
    the values of the CPU code it replaced: abar at integer, fractional and end timesteps (as
    long, float64 and the samplers' float32), and the timestep of sigmas inside, at and beyond
    the table's ends."""
    ac = TABLES[name]
    T, table = len(ac), DeviceTable(ac)
    fractional = torch.cat([torch.linspace(0, T - 1, 997, dtype=torch.float64),
                            torch.tensor([0.0, 1e-9, 0.25, 0.5, T - 1.5, T - 1 - 1e-9, T - 1.0],
                                         dtype=torch.float64)])
    for t in (torch.arange(T), torch.arange(T, dtype=torch.float64), fractional,
              fractional.float(), fractional.float().clamp(max=T - 1)):
        assert torch.equal(table.abar_at(t), _abar_at_on_the_cpu(ac, t)), t.dtype
        assert torch.equal(table.abar_at(t), alphas_cumprod_at(ac, t)), t.dtype
    sigma_table = sigma_of(ac)
    sigmas = torch.cat([sigma_table, sigma_of(alphas_cumprod_at(ac, fractional)),
                        torch.logspace(-4, 3, 1001, dtype=torch.float64),
                        sigma_table[[0, -1]] * torch.tensor([0.5, 2.0], dtype=torch.float64)])
    for sigma in (sigmas, sigmas.float()):
        expected = _timestep_of_sigma_in_numpy(ac, sigma)
        torch.testing.assert_close(table.timestep_of(sigma), expected, rtol=0, atol=1e-12)
        assert torch.equal(timestep_of_sigma(ac, sigma), expected)


def test_device_table_stays_on_the_input_device_and_checks_on_the_cpu():
    """On the meta device (shapes, no data) any read of a value on the host, a .cpu(), .item()
    or bool(tensor), raises: the look-ups run there, so they never stall a GPU."""
    table = DeviceTable(ABAR)
    t = torch.tensor([999.0, 500.25, 0.0], device="meta")
    assert table.abar_at(t).device.type == "meta" and table.abar_at(t).shape == (3,)
    assert table.timestep_of(torch.ones(3, device="meta")).device.type == "meta"
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        table.abar_at(torch.tensor([1000.0]))


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
