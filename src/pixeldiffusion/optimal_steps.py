"""The ``optimal`` spacing: timesteps fitted to one model by dynamic programming over a teacher.

Few-step samplers lose most of their accuracy to where the steps are placed, and the best
placement depends on the model (Chen et al. 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling", GITS, Sec. 4; Sabour et al. 2024, "Align Your Steps"). Here, for a budget of
n model calls:

1. Teacher: the probability-flow ODE solved accurately from calibration noise x_T (not the noise
   you will sample from) with ``dpmpp_3m`` on a fine grid of ``grid`` timesteps uniform in
   lambda_ = log(alpha/sigma), keeping the state x_g and the model's x0_g at every grid point.
2. Cost of one step from grid point i to a later point j: the RMS distance between the teacher's
   x_j and the first-order exponential-integrator (DDIM) step taken from the teacher's own x_i
   with its x0_i (DPM-Solver++ eq. 9 at order 1):
       x_j^ = (sigma_j / sigma_i) x_i - alpha_j (e^{-h} - 1) x0_i,  h = lambda_j - lambda_i.
   Every grid point's x0 comes from the teacher run, so the costs need no further model calls.
3. Ending early: the samplers return the last call's x0 as the sample, so a path may end at any
   grid point g at the cost RMS(x0_g - x0_end), the distance to the teacher's final sample.
4. Dynamic programming finds the n grid points (the first at T-1) with the least total cost.
5. Check against the solver that will use them: the first-order cost does not see a multistep
   solver's own error, so when ``sampler`` is given, the fitted steps, the logsnr spacing and
   three blends of the two (in lambda_) are each run with it from the calibration noise, and
   the one ending nearest the teacher's samples wins (5 x n more model calls). So the result is
   never worse than logsnr on the calibration batch.

The result is a float64 tensor of timesteps that any sampler takes as an explicit spacing.
Calibration costs ``grid`` model calls on the calibration batch, once per model (and guidance
setting); memory is 2 x grid x the calibration batch, on the batch's device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .samplers import SAMPLERS, Denoiser, dpmpp_3m, is_stochastic
from .schedule import (
    alphas_cumprod_at,
    sampling_timesteps,
    sigma_of,
    timestep_of_sigma,
    vp_scalings,
)

GRID = 200  # teacher grid points: its error at 200 logsnr steps is far below any few-step sampler's


def calibrated_timesteps(denoise: Denoiser, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                         sampler: str | None = None, options: dict[str, Any] | None = None,
                         samples: int = 32, seed: int = 0) -> Tensor:
    """The "optimal" spacing for ``denoise``, fitted on ``samples`` fresh noise images shaped
    like ``x_T`` (seed ``seed``, so the same model always gets the same timesteps) and, for a
    deterministic ``sampler`` (a name in ``samplers.SAMPLERS``), checked with it and its
    ``options`` (``optimal_timesteps``, step 5). Pass the result to ``samplers.sample`` as its
    ``spacing``. Costs 200 + 5 x steps model calls on the calibration batch."""
    options = options or {}
    generator = torch.Generator(x_T.device).manual_seed(seed)
    noise = torch.randn((samples, *x_T.shape[1:]), generator=generator, device=x_T.device,
                        dtype=x_T.dtype)
    deterministic = sampler is not None and not is_stochastic(sampler, options)
    return optimal_timesteps(denoise, noise, alphas_cumprod, steps,
                             sampler=SAMPLERS[sampler] if deterministic else None,
                             **(options if deterministic else {}))


@torch.no_grad()
def optimal_timesteps(denoise: Denoiser, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                      sampler: Callable[..., Tensor] | None = None, grid: int | None = None,
                      chunk: int = 16, progress: Callable[[int], None] | None = None,
                      **options: Any) -> Tensor:
    """The ``steps`` timesteps (float64, descending, the first T-1) that minimise the summed
    one-step error against a ``grid``-point (default min(200, T)) teacher solution from the
    calibration noise ``x_T``.

    denoise: ``samplers.make_denoiser`` output for the model (with its guidance, clipping).
    x_T: [N, ...] standard normal calibration noise; 16-64 samples are plenty.
    alphas_cumprod: the training schedule [T]. ``progress(k)`` is called after each teacher call.
    sampler: a deterministic function of ``samplers.SAMPLERS`` (with its ``options``) to check
        the candidates with (step 5 above); None returns the dynamic programme's steps as they are.
    """
    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    T = len(alphas_cumprod)
    grid = check_steps(T, steps, grid)
    points = sampling_timesteps(T, grid, "logsnr", alphas_cumprod)
    xs: list[Tensor] = []
    x0s: list[Tensor] = []

    def keep(info: dict) -> None:
        xs.append(info["x_t"].flatten(1))
        x0s.append(info["x0"].flatten(1))
        if progress is not None:
            progress(len(xs))

    dpmpp_3m(denoise, x_T, points, alphas_cumprod, callback=keep)
    X, X0 = torch.stack(xs), torch.stack(x0s)                         # [grid, N, D]
    alpha, sigma, lambda_ = torch.tensor(
        [vp_scalings(alphas_cumprod_at(alphas_cumprod, t)) for t in points.tolist()],
        dtype=torch.float64).T
    cost = np.full((grid, grid), np.inf)
    for i in range(grid - 1):
        for j in range(i + 1, grid, chunk):  # bounded memory: chunk x N x D at a time
            k = slice(j, min(j + chunk, grid))
            a = (sigma[k] / sigma[i]).to(X).view(-1, 1, 1)
            b = (alpha[k] * torch.expm1(-(lambda_[k] - lambda_[i]))).to(X).view(-1, 1, 1)
            error = (a * X[i] - b * X0[i] - X[k]).double().pow(2).mean(dim=(1, 2)).sqrt()
            cost[i, k] = error.cpu().numpy()
    end_cost = (X0 - X0[-1]).double().pow(2).mean(dim=(1, 2)).sqrt().cpu().numpy()
    fitted = points[_cheapest_path(cost, end_cost, steps)]
    if sampler is None or steps == 1:
        return fitted
    logsnr = sampling_timesteps(T, steps, "logsnr", alphas_cumprod)
    candidates = [_blend(alphas_cumprod, logsnr, fitted, a) for a in (1.0, 0.75, 0.5, 0.25, 0.0)]
    errors = [float((sampler(denoise, x_T, c, alphas_cumprod, **options).flatten(1) - X0[-1])
                    .double().pow(2).mean()) for c in candidates]
    return candidates[int(np.argmin(errors))]


def check_steps(T: int, steps: int, grid: int | None = None) -> int:
    """The teacher's grid size for a model of ``T`` timesteps (default min(GRID, T)), or a
    ValueError saying what ``steps`` (and ``grid``) may be."""
    grid = min(GRID, T) if grid is None else grid
    if not 2 <= grid <= T:
        raise ValueError(f"grid must be in [2, {T}]; got {grid}")
    if not 1 <= steps <= grid:
        raise ValueError(f"the optimal spacing needs 1 <= steps <= grid ({grid}, the points of "
                         f"its teacher solution); got {steps}")
    return grid


def _blend(alphas_cumprod: Tensor, a: Tensor, b: Tensor, weight: float) -> Tensor:
    """Timesteps whose lambda_ is (1 - weight) lambda_(a) + weight lambda_(b), element-wise;
    strictly decreasing when a and b are, starting at T-1 when both do."""
    if weight in (0.0, 1.0):
        return (b if weight else a).clone()
    log_a = _log_sigma(alphas_cumprod, a)
    log_b = _log_sigma(alphas_cumprod, b)
    t = timestep_of_sigma(alphas_cumprod, ((1 - weight) * log_a + weight * log_b).exp())
    t[0] = a[0]
    return t


def _log_sigma(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """log of EDM's sigma (= -lambda_) at float timesteps t."""
    return sigma_of(alphas_cumprod_at(alphas_cumprod, t)).log()


def _cheapest_path(cost: np.ndarray, end_cost: np.ndarray, steps: int) -> list[int]:
    """Indices p_0 = 0 < p_1 < ... < p_{steps-1} minimising sum cost[p_k, p_k+1] +
    end_cost[p_last] (a shortest path with exactly ``steps`` nodes, by dynamic programming)."""
    grid = len(end_cost)
    best = np.full(grid, np.inf)
    best[0] = 0.0
    parents = []
    for _ in range(steps - 1):
        total = best[:, None] + cost                 # [from, to]
        parents.append(total.argmin(axis=0))
        best = total.min(axis=0)
    path = [int(np.argmin(best + end_cost))]
    for parent in reversed(parents):
        path.append(int(parent[path[-1]]))
    return path[::-1]
