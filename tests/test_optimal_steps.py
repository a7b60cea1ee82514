"""The ``optimal`` spacing (optimal_steps.py): its dynamic programme, its accuracy on analytic
data against the best fixed spacing and the exact model calls it causes (the CLI:
tests/test_sample_cli.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

from pixeldiffusion.optimal_steps import _cheapest_path, calibrated_timesteps, optimal_timesteps
from pixeldiffusion.samplers import SAMPLERS, make_denoiser, sample
from pixeldiffusion.schedule import (
    alphas_cumprod_at,
    alphas_cumprod_from_betas,
    linear_betas,
    sampling_timesteps,
)

ABAR = alphas_cumprod_from_betas(linear_betas(1000))


def mixture_eps(means: torch.Tensor, std: float):
    """Exact eps(x_t, t) for an equal-weight mixture of N(mean_k, std^2 I) in float64."""
    def model(x_t, t):
        abar = float(alphas_cumprod_at(ABAR, t[:1].double()))
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        var = alpha**2 * std**2 + sigma**2
        diff = x_t[:, None, :] - alpha * means[None]                       # [N, K, d]
        resp = (-0.5 * (diff**2).sum(-1) / var).softmax(dim=1)            # [N, K]
        x0 = (resp[..., None] * (means[None] + alpha * std**2 / var * diff)).sum(1)
        return (x_t - alpha * x0) / sigma
    return model


def path_cost(cost, end_cost, path):
    return sum(cost[a, b] for a, b in itertools.pairwise(path)) + end_cost[path[-1]]


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dynamic_programme_finds_the_cheapest_path_by_brute_force(steps):
    rng = np.random.default_rng(steps)
    grid = 8
    cost = np.triu(rng.random((grid, grid)), k=1)
    cost[np.tril_indices(grid)] = np.inf
    end_cost = rng.random(grid)
    best = min(([0, *rest] for rest in itertools.combinations(range(1, grid), steps - 1)),
               key=lambda p: path_cost(cost, end_cost, p))
    found = _cheapest_path(cost, end_cost, steps)
    assert found[0] == 0 and len(found) == steps and found == sorted(set(found))
    assert path_cost(cost, end_cost, found) == pytest.approx(path_cost(cost, end_cost, best))


def test_optimal_spacing_beats_the_best_fixed_spacing_on_a_mixture():
    """Fitted on separate calibration noise, it cuts UniPC's ODE error at 8 and 16 calls below
    the logsnr spacing's (the best fixed one for these solvers), by half at 16."""
    g = torch.Generator().manual_seed(0)
    model = mixture_eps((torch.rand(4, 8, generator=g, dtype=torch.float64) - 0.5) * 1.4, 0.1)
    denoise = make_denoiser(model, ABAR, clip_x0=False)
    x_T = torch.randn(200, 8, generator=g, dtype=torch.float64)
    calibration = torch.randn(32, 8, generator=g, dtype=torch.float64)
    reference = sample(model, x_T, ABAR, sampler="unipc", steps=500, spacing="logsnr",
                       clip_x0=False)
    for steps, most in ((8, 0.9), (16, 0.5)):
        fitted = optimal_timesteps(denoise, calibration, ABAR, steps, sampler=SAMPLERS["unipc"],
                                   order=2)
        assert fitted.dtype == torch.float64 and len(fitted) == steps and fitted[0] == 999
        assert bool((fitted[:-1] > fitted[1:]).all()) and float(fitted[-1]) >= 0
        errors = {}
        for name, spacing in (("logsnr", sampling_timesteps(1000, steps, "logsnr", ABAR)),
                              ("optimal", fitted)):
            x0 = SAMPLERS["unipc"](denoise, x_T, spacing, ABAR, order=2)
            errors[name] = float((x0 - reference).pow(2).mean().sqrt())
        assert errors["optimal"] < most * errors["logsnr"], (steps, errors)


def test_calibrated_timesteps_then_sample_calls_the_fit_then_exactly_its_timesteps():
    model_calls = []

    def model(x_t, t):
        model_calls.append(float(t[0]))
        return 0.1 * x_t

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    spacing = calibrated_timesteps(make_denoiser(model, ABAR), x_T, ABAR, 6, sampler="unipc")
    sample(model, x_T, ABAR, sampler="unipc", steps=6, spacing=spacing)
    fitted = optimal_timesteps(make_denoiser(model, ABAR), torch.randn(
        32, 1, 4, 4, generator=torch.Generator().manual_seed(0)), ABAR, 6,
        sampler=SAMPLERS["unipc"])
    fit = 200 + 5 * 6  # the teacher, then each of the 5 candidates checked with the sampler
    assert len(model_calls) == fit + 6 + fit  # fit + sampling, then the same fit again here
    assert model_calls[fit:fit + 6] == pytest.approx(fitted.tolist(), abs=1e-3)


def test_impossible_optimal_requests_say_what_to_do():
    denoise = make_denoiser(lambda x, t: x, ABAR)
    with pytest.raises(ValueError, match="1 <= steps <= grid"):
        optimal_timesteps(denoise, torch.randn(2, 3), ABAR, 201)
    with pytest.raises(ValueError, match="fitted to a model"):
        sampling_timesteps(1000, 10, "optimal", ABAR)
    with pytest.raises(ValueError, match="did you mean 'optimal'"):
        sampling_timesteps(1000, 10, "optimla", ABAR)
